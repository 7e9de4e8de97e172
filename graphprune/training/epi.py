"""EPI ("When to Prune? A Policy towards Early Structural Pruning"): prune as soon as the
dominant sub-network stops changing.

Called once per epoch from the user's loop, :class:`EarlyPruningIndicator`

1. captures the current model (``gp.trace``, so the current weights), scores its channel
   classes with ``criterion`` and takes the sub-network ``prune-channels{macs=budget}``
   would keep (the same MAC-budget decision: one global ranking, removal until the
   budget is met);
2. records that sub-network's *architecture* ``a_t``: the kept class count of every
   prunable pruning group (for a plain conv, its kept filters; for a residual stream,
   the channels kept in every block it joins);
3. computes the indicator over the last ``W = window`` architectures::

       d(a, b) = sum_l |a_l - b_l| / sum_l (a_l + b_l)          (in [0, 1])
       EPI_t   = 1 - (1/W) sum_{k=1..W} d(a_t, a_{t-k})          (defined once t >= W)

   ``d`` is the fraction of kept channels that moved between groups; ``EPI_t = 1`` when
   the last ``W + 1`` architectures are identical;
4. returns ``EPI_t >= threshold`` (the first time, :attr:`triggered_at` records the step).

The decision of the last step is exposed (:attr:`decision`, per group a keep mask over
its classes): :meth:`pruning_pass` returns a ``prune-channels`` pass that applies exactly
that sub-network, so ``gp.run(gp.trace(model, x), epi.pruning_pass())`` prunes what was
recorded, not a re-scored variant.

Under ``torch.distributed`` rank 0's decision, architecture and trigger are broadcast, so
every rank prunes at the same step and the same channels (the replicas hold the same
weights under DDP anyway; this removes any doubt from floating-point reductions).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.coupling import CouplingAnalysis, analyse
from graphprune.graph import Graph, GraphError
from graphprune.importance import Importance
from graphprune.passes.prune_channels import PruneChannels

from . import distributed as dist
from .loop import unwrap

__all__ = ["EarlyPruningIndicator", "RecordedChannels", "architecture_distance", "epi_indicator"]


def architecture_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """``sum |a_l - b_l| / sum (a_l + b_l)``: the fraction of kept channels that differ."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    total = float((a_ + b_).sum())
    return float(np.abs(a_ - b_).sum() / total) if total > 0 else 0.0


def epi_indicator(history: Sequence[Sequence[float]], window: int) -> float | None:
    """``1 - mean_{k=1..W} d(a_t, a_{t-k})`` over the last ``window + 1`` architectures,
    or ``None`` while fewer have been recorded."""
    if len(history) <= window:
        return None
    last = history[-1]
    return 1.0 - float(np.mean([architecture_distance(last, history[-1 - k]) for k in range(1, window + 1)]))


@dataclass(frozen=True)
class RecordedChannels(PruneChannels):
    """``prune-channels`` applying a recorded decision (per group id, a keep mask over
    its classes) instead of scoring; refuses a graph whose groups differ."""

    recorded: tuple[tuple[int, tuple[bool, ...]], ...] = ()

    def validate(self) -> None:  # the budget was met when the decision was taken
        pass

    def _decide(self, graph: Graph, analysis: CouplingAnalysis, data: Any = None) -> dict[int, np.ndarray]:
        groups = {g.id: g for g in analysis.groups}
        keep = {}
        for gid, mask in self.recorded:
            g = groups.get(gid)
            if g is None or g.n_classes != len(mask):
                raise GraphError(
                    f"{self.name}: the recorded decision does not fit this graph (group {gid}"
                    f"{' is missing' if g is None else f' has {g.n_classes} classes, recorded {len(mask)}'})"
                )
            keep[gid] = np.asarray(mask, bool)
        return keep


@dataclass(frozen=True)
class _ScoredBy(PruneChannels):
    """``prune-channels`` whose importance is a given callable (not a registered name)."""

    score_fn: Any = field(default=None, compare=False, repr=False)

    def importance(self, data: Any = None) -> Importance:
        return self.score_fn


class EarlyPruningIndicator:
    """Per-epoch early pruning indicator (see the module docstring for the formula).

    ``model_or_graph``: an ``nn.Module`` (possibly DDP-wrapped; ``example`` inputs are
    then required and the module is captured afresh at every call), a :class:`Graph`
    (scored as it is), or a zero-argument callable returning a ``Graph``.  ``criterion``
    is a criterion name of ``prune-channels`` (``kl``/``taylor`` with ``data``) or an
    :class:`~graphprune.importance.Importance` callable.  Use it as a hook:
    ``epi(epoch, model)`` calls :meth:`step`.
    """

    def __init__(
        self,
        model_or_graph: nn.Module | Graph | Callable[[], Graph],
        budget: float,
        criterion: str | Importance = "l1",
        window: int = 5,
        threshold: float = 0.9,
        example: torch.Tensor | Sequence[torch.Tensor] | None = None,
        ignore: Sequence[str] = (),
        data: Any = None,
        min_keep: int = 1,
    ) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if isinstance(model_or_graph, nn.Module) and example is None:
            raise ValueError("capturing a module needs example inputs (example=...)")
        self.source = model_or_graph
        self.budget = budget
        self.criterion = criterion
        self.window = window
        self.threshold = threshold
        self.example = example
        self.data = data
        self._pass: PruneChannels = (
            PruneChannels(macs=budget, criterion=criterion, ignore=tuple(ignore), min_keep=min_keep)
            if isinstance(criterion, str)
            else _ScoredBy(macs=budget, ignore=tuple(ignore), min_keep=min_keep, score_fn=criterion)
        )
        self._pass.validate()
        self.history: list[list[int]] = []
        self.indicators: list[float | None] = []
        self.decisions: list[dict[int, np.ndarray]] = []
        self.triggered_at: int | None = None

    # ------------------------------------------------------------- capture
    def capture(self) -> Graph:
        src = self.source
        if isinstance(src, Graph):
            return src
        if isinstance(src, nn.Module):
            from graphprune.frontends.capture import trace

            module = unwrap(src)
            if any(parametrize.is_parametrized(m) for m in module.modules()):
                module = _plain_copy(module)  # a projected model: capture its current projected weights
            return trace(module, self.example)  # type: ignore[arg-type]
        return src()

    def _decide(self, graph: Graph) -> tuple[dict[int, np.ndarray], list[int]]:
        analysis = analyse(graph, ignore=self._pass.ignore)
        keep = self._pass.decide(graph, analysis, self.data)
        groups = [g for g in analysis.groups if g.prunable.any()]
        arch = [int(keep[g.id].sum()) if g.id in keep else g.n_classes for g in groups]
        full = {g.id: keep.get(g.id, np.ones(g.n_classes, bool)) for g in groups}
        return full, arch

    # ---------------------------------------------------------------- step
    def step(self) -> bool:
        """Record the current dominant sub-network; True when the indicator reaches the
        threshold (the same answer on every rank)."""
        graph = self.capture()
        if dist.rank() == 0 or not dist.active():
            keep, arch = self._decide(graph)
            payload: Any = (keep, arch)
        else:
            payload = None
        keep, arch = dist.broadcast_object(payload, src=0)
        self.history.append(arch)
        self.decisions.append(keep)
        ind = epi_indicator(self.history, self.window)
        self.indicators.append(ind)
        fire = ind is not None and ind >= self.threshold
        if fire and self.triggered_at is None:
            self.triggered_at = len(self.history) - 1
        return fire

    def __call__(self, epoch: int, model: nn.Module | None = None) -> bool:
        return self.step()

    # ------------------------------------------------------------ decision
    @property
    def decision(self) -> dict[int, np.ndarray]:
        """The sub-network of the last step: per prunable group id, a keep mask."""
        if not self.decisions:
            raise RuntimeError("EarlyPruningIndicator.step() has not run yet")
        return self.decisions[-1]

    @property
    def architecture(self) -> list[int]:
        return self.history[-1]

    def pruning_pass(self, step: int | None = None) -> RecordedChannels:
        """A ``prune-channels`` pass that applies the recorded sub-network of ``step``
        (default: the last one)."""
        keep = self.decisions[-1 if step is None else step]
        recorded = tuple((gid, tuple(bool(v) for v in mask)) for gid, mask in sorted(keep.items()) if not mask.all())
        return RecordedChannels(macs=self.budget, ignore=self._pass.ignore, recorded=recorded)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of a parametrized ``model`` with plain parameters holding the current
    parametrized values.  (``parametrize.remove_parametrizations`` on a deep copy would
    delete the property from the parametrized class the copy shares with ``model``.)"""
    out = copy.deepcopy(model)
    for sub in out.modules():
        if not parametrize.is_parametrized(sub):
            continue
        values = {name: getattr(sub, name).detach().clone() for name in sub.parametrizations.keys()}
        sub.__class__ = sub.__class__.__bases__[0]
        del sub._modules["parametrizations"]
        for name, value in values.items():
            sub._parameters[name] = nn.Parameter(value)
    return out
