"""TRP ("Trained Rank Pruning", Xu et al.): train so that ``factorize{lossless=true}``
removes rank exactly.

A hook for the user's own training loop::

    trp = TRP(model, energy=0.9, lam=1e-4, every=20)
    for step, (x, y) in enumerate(loader):
        trp.before_forward(step)          # every `every` steps: hard low-rank projection
        loss = criterion(model(x), y)
        opt.zero_grad(); loss.backward()
        trp.after_backward()              # grad += lam * U_r V_r^T  (nuclear-norm sub-gradient)
        opt.step()
    trp.finalize(calibration_loader)      # last projection + BN recalibration
    slim = gp.run(gp.trace(model, x), "factorize{lossless=true}").graph.to_module()

The math.  Each eligible weight ``W`` is read as a matrix ``M`` in the layout of
:mod:`graphprune.passes.factorize` (``scheme=channel``: ``M = W.reshape(F, C*kh*kw)``;
``scheme=spatial``: ``M[(c, i), (j, f)] = W[f, c, i, j]``, ``C*kh x kw*F``; linear:
``M = W``).  With ``M = U diag(s) V^T`` (``s`` descending, ``E = sum_i s_i^2``):

* rank: the smallest ``r`` with ``sum_{i<r} s_i^2 >= energy * E``;
* projection (every ``every`` steps, before the forward pass): ``M <- U_r diag(s_r) V_r^T``,
  the best rank-``r`` approximation in Frobenius norm (Eckart-Young), with the rank taken
  afresh each time from the current spectrum (so it tends to fall during training: each
  projection keeps ``energy`` of what the previous one kept plus what training added).  Computed in float64
  and cast back, so the float32 weight's trailing singular values are at rounding level,
  far below ``factorize``'s lossless threshold ``max(rows, cols) * eps32 * s_1``;
* regulariser: ``lam * ||M||_*`` (nuclear norm), whose sub-gradient at a rank-``r`` matrix
  ``U_r diag(s_r) V_r^T`` is ``U_r V_r^T`` (+ any ``U_perp X V_perp^T`` with
  ``||X||_2 <= 1``; we take ``X = 0``).  :meth:`TRP.after_backward` adds
  ``lam * from_matrix(U_r V_r^T)`` to ``W.grad``: reshapes and permutations are
  isometries, so the gradient in ``W``'s layout is the matrix gradient mapped back.

Cost.  No SVD runs in the forward pass (unlike :meth:`PassResult.projected_model` of
``factorize``, which re-projects on every forward).  The sub-gradient is taken at the last
projection and reused until the next (``subgradient="cached"``, default);
``subgradient="fresh"`` recomputes it from the current weight on every step (an SVD per
layer per step, at the rank fixed at the last projection).

DDP.  Under ``DistributedDataParallel`` the gradients are all-reduced, so every rank holds
the same weights and the projection (a deterministic function of the weights) gives the
same result; to be safe against LAPACK differences between ranks, the projected weights
and cached sub-gradients are broadcast from rank 0 after each projection.
:meth:`after_backward` runs after ``loss.backward()``, i.e. after the all-reduce, and adds
the same term on every rank.

Layers: ``layers=None`` takes every ungrouped ``nn.Conv*`` (not transposed) and every
``nn.Linear``; a list of qualified module names or a predicate ``(name, module) -> bool``
selects fewer.  The spatial scheme applies to 2-d convs only (linears keep their matrix).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from graphprune.passes.factorize import from_matrix, to_matrix

from .loop import recalibrate_bn

__all__ = ["TRP", "energy_rank", "low_rank_projection", "recalibrate_bn"]

logger = logging.getLogger(__name__)

LayerSelector = None | Sequence[str] | Callable[[str, nn.Module], bool]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest ``r >= 1`` with ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2``
    (``s`` descending); 0 for an all-zero matrix."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    return min(int((cum < energy * total * (1 - 1e-12)).sum()) + 1, int(s.numel()))


def low_rank_projection(m: torch.Tensor, energy: float | None = None, rank: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(M_r, U_r V_r^T, r)`` for matrix ``m`` (float64 results), ``r`` from ``rank`` or
    from ``energy`` (see :func:`energy_rank`)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    r = rank if rank is not None else energy_rank(s, energy if energy is not None else 1.0)
    r = max(0, min(int(r), int(s.numel())))
    ur, vr = u[:, :r], vh[:r]
    return (ur * s[:r]) @ vr, ur @ vr, r


@dataclass
class _Entry:
    name: str
    module: nn.Module
    layout: str
    rank: int | None = None
    subgrad: torch.Tensor | None = None  # in the weight's layout and dtype


def _is_eligible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.transposed and module.groups == 1
    return False


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and isinstance(inner, nn.Module):
        return inner
    return model


def _select(model: nn.Module, layers: LayerSelector, scheme: str) -> list[_Entry]:
    out = []
    names = set(layers) if layers is not None and not callable(layers) else None
    for name, module in model.named_modules():
        if not _is_eligible(module):
            continue
        if names is not None and name not in names:
            continue
        if callable(layers) and not layers(name, module):
            continue
        if isinstance(module, nn.Linear):
            layout = "linear"
        elif scheme == "spatial" and module.weight.dim() == 4:
            layout = "spatial"
        else:
            layout = "channel"
        out.append(_Entry(name, module, layout))
    if names is not None:
        missing = names - {e.name for e in out}
        if missing:
            raise ValueError(f"TRP: not an ungrouped conv or linear of the model: {', '.join(sorted(missing))}")
    return out


class TRP:
    """Trained Rank Pruning hook (see the module docstring for the math).

    ``energy``: kept share of squared singular values per layer; ``lam``: nuclear-norm
    weight; ``every``: projection period in steps; ``layers``: which layers; ``scheme``:
    ``channel`` or ``spatial`` (must match the ``factorize`` scheme used afterwards);
    ``subgradient``: ``cached`` or ``fresh``; ``broadcast``: broadcast from rank 0 after
    projecting when ``torch.distributed`` is initialised.
    """

    def __init__(self, model: nn.Module, energy: float = 0.9, lam: float = 1e-4, every: int = 20,
                 layers: LayerSelector = None, scheme: str = "channel", subgradient: str = "cached",
                 broadcast: bool = True) -> None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"TRP: energy must be in (0, 1], got {energy}")
        if every < 1:
            raise ValueError(f"TRP: every must be at least 1, got {every}")
        if scheme not in ("channel", "spatial"):
            raise ValueError(f"TRP: scheme must be channel or spatial, got `{scheme}`")
        if subgradient not in ("cached", "fresh"):
            raise ValueError(f"TRP: subgradient must be cached or fresh, got `{subgradient}`")
        self.model = _unwrap(model)
        self.energy, self.lam, self.every = float(energy), float(lam), int(every)
        self.scheme, self.subgradient, self.broadcast = scheme, subgradient, broadcast
        self.entries = _select(self.model, layers, scheme)
        self.projections = 0

    @property
    def ranks(self) -> dict[str, int | None]:
        """Rank per layer at the last projection (``None`` before the first)."""
        return {e.name: e.rank for e in self.entries}

    # ---------------------------------------------------------------- hooks
    def before_forward(self, step: int) -> bool:
        """Project when ``step % every == 0``; returns whether it projected."""
        if step % self.every == 0:
            self.project()
            return True
        return False

    @torch.no_grad()
    def project(self) -> dict[str, int]:
        """Replace every eligible weight by its truncated SVD at the energy rank; cache the
        sub-gradient ``U_r V_r^T``; broadcast from rank 0 under torch.distributed."""
        for e in self.entries:
            w = e.module.weight
            m_r, uv, r = low_rank_projection(to_matrix(w.detach(), e.layout), self.energy)
            w.copy_(from_matrix(m_r, e.layout, w.shape).to(w.dtype))
            e.rank = r
            e.subgrad = from_matrix(uv, e.layout, w.shape).to(w.dtype).contiguous()
        self._broadcast()
        self.projections += 1
        return {e.name: int(e.rank or 0) for e in self.entries}

    def _broadcast(self) -> None:
        if not self.broadcast:
            return
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for e in self.entries:
            dist.broadcast(e.module.weight.data, src=0)
            assert e.subgrad is not None
            dist.broadcast(e.subgrad, src=0)

    @torch.no_grad()
    def after_backward(self) -> None:
        """``W.grad += lam * U_r V_r^T`` for every projected layer (call after backward,
        before the optimiser step).  Layers not yet projected get nothing."""
        if self.lam == 0.0:
            return
        for e in self.entries:
            w = e.module.weight
            if e.rank is None:
                continue
            if self.subgradient == "fresh":
                _, uv, _ = low_rank_projection(to_matrix(w.detach(), e.layout), rank=e.rank)
                sub = from_matrix(uv, e.layout, w.shape).to(w.dtype)
            else:
                sub = e.subgrad
            assert sub is not None
            if w.grad is None:
                w.grad = self.lam * sub.clone()
            else:
                w.grad.add_(sub, alpha=self.lam)

    def finalize(self, loader: Iterable[Any] | None = None, batches: int | None = None) -> dict[str, int]:
        """Final projection, then (with ``loader``) BN statistics recomputed on it
        (:func:`graphprune.training.loop.recalibrate_bn`, averaged over ranks under DDP),
        since the projection changed every layer's output distribution."""
        ranks = self.project()
        if loader is not None:
            recalibrate_bn(self.model, loader, batches=batches)
        return ranks
