"""`factorize`: replace a conv or linear by two thinner layers from a truncated SVD
(TRP, "Trained Rank Pruning").

Each layer's weight is read as a matrix ``M``, decomposed ``M = U diag(s) V^T``, and
truncated to rank ``r``: ``M_r = (U_r sqrt(s_r)) (sqrt(s_r) V_r^T) = A B``.  The
decomposition comes from the eigendecomposition of the smaller Gram matrix (``M M^T``
or ``M^T M``) in float64: ``s_i^2`` are its eigenvalues, ``U_r`` its top eigenvectors and
``M_r = U_r U_r^T M``; this resolves singular values down to about ``1e-8 * s_1`` (enough
for every rank rule below) at a fraction of the cost of an SVD.  The two factors become
two layers whose composition computes ``M_r`` exactly:

* ``scheme=channel`` (conv ``W: F x C x kh x kw``): ``M = W.reshape(F, C*kh*kw)``
  (row ``f``, column ``(c, i, j)``).  ``B`` reshaped to ``(r, C, kh, kw)`` is a ``kh x kw``
  conv ``C -> r`` with the original stride, pads and dilation; ``A`` reshaped to
  ``(F, r, 1, 1)`` is a ``1x1`` conv ``r -> F`` with the bias.  Because
  ``y_f = sum_k A[f,k] sum_{c,i,j} B[k,(c,i,j)] x[c, o*s - p + i*d, ...]``.
* ``scheme=spatial`` (2-d convs): ``M[(c, i), (j, f)] = W[f, c, i, j]``, i.e.
  ``W.permute(1, 2, 3, 0).reshape(C*kh, kw*F)``.  ``A`` (``C*kh x r``) becomes a ``kh x 1``
  conv ``C -> r`` with the vertical stride, pads and dilation (horizontal: stride 1, no
  pad), ``B`` (``r x kw*F``) a ``1 x kw`` conv ``r -> F`` with the horizontal stride,
  pads, dilation and the bias (vertical: stride 1, no pad).  The first conv acts on each
  input column alone, so a column of padding stays a column of zeros and the second
  conv's horizontal padding is the original's.
* linear (``W: out x in``; an ONNX MatMul weight stored ``in x out`` is transposed):
  ``B`` is a linear ``in -> r``, ``A`` a linear ``r -> out`` with the bias.

Rank (``s`` sorted descending, ``E = sum s_i^2``):

* ``energy=e``: the smallest ``r`` with ``sum_{i<r} s_i^2 >= e * E``;
* ``rank=R``: ``r = min(R, rank(M))``;
* ``macs=m``: keep at most ``m`` of the model's MACs; greedily lower the rank of the
  layer that loses the least energy share per MAC saved (a layer's first step jumps to
  the largest rank at which the two layers are cheaper than the one);
* ``lossless=true`` (the default when no budget is given): drop only singular values
  that are zero to float32 precision, ``s_i <= max(rows, cols) * eps32 * s_1``.

A layer is never factorized where the two layers cost as many MACs as the one or more.
Per output position the channel scheme costs ``r * (C*kh*kw + F)`` against
``F*C*kh*kw``; the spatial scheme's first conv runs on every input column of the output
rows, ``r * C*kh * (Ho*W_in) + r * F*kw * (Ho*Wo)`` against ``F*C*kh*kw * Ho*Wo``.

Projection: for each factorized weight, a function computing ``M_r`` (in float64, then
cast back) from the current weight, so :meth:`Projection.apply` gives the reference and
:meth:`PassResult.projected_model` keeps the weight at rank ``r`` while fine-tuning
(TRP's periodic projection).

Refused (recorded in ``skipped``): grouped convs (depthwise included), transposed convs,
the spatial scheme on non-2-d convs, weights that are not parameters or are shared by
several nodes, ``ignore``-d layers, layers where no rank saves MACs.
"""
from __future__ import annotations

import contextlib
import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from graphprune.arrays import is_torch_tensor
from graphprune.cost import graph_cost
from graphprune.layers import candidate_layers
from graphprune.graph import Graph, NewNode, Node
from graphprune.pass_api import BudgetError, Pass, PassOptionError, PassResult, register_pass
from graphprune.projection import Projection

__all__ = ["Factorize", "FactorizeResult", "TruncatedSVD"]

logger = logging.getLogger(__name__)

EPS32 = float(np.finfo(np.float32).eps)
SCHEMES = ("channel", "spatial")


@dataclass
class FactorizeResult(PassResult):
    """A :class:`PassResult` that also says why layers were left alone."""

    skipped: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ array ops
class _NumpyOps:
    """The few array operations the SVD math needs, on numpy arrays.  The pass works in
    numpy; :class:`_TorchOps` gives the same operations on torch tensors, so the
    projection function stays differentiable inside ``projected_model`` while training."""

    @staticmethod
    def permute(w: Any, axes: tuple[int, ...]) -> Any:
        return np.transpose(w, axes)

    @staticmethod
    def f64(m: Any) -> Any:
        return np.asarray(m, dtype=np.float64)

    @staticmethod
    def eigh(m: Any) -> tuple[Any, Any]:
        return np.linalg.eigh(m)

    @staticmethod
    def eigvalsh(m: Any) -> Any:
        return np.linalg.eigvalsh(m)

    @staticmethod
    def flip(x: Any, axis: int) -> Any:
        return np.flip(x, axis)

    @staticmethod
    def sqrt0(x: Any) -> Any:
        """``sqrt(max(x, 0))``."""
        return np.sqrt(np.maximum(x, 0.0))

    @staticmethod
    def root_or_one(s: Any) -> Any:
        """``sqrt(s)`` where ``s > 0``, else 1."""
        return np.where(s > 0, np.sqrt(np.maximum(s, 0.0)), 1.0)

    @staticmethod
    def like(x: Any, w: Any) -> Any:
        """``x`` in ``w``'s dtype, contiguous."""
        return np.ascontiguousarray(x.astype(w.dtype, copy=False))


class _TorchOps:
    """:class:`_NumpyOps` on torch tensors (imported only when a tensor is projected)."""

    @staticmethod
    def permute(w: Any, axes: tuple[int, ...]) -> Any:
        return w.permute(*axes)

    @staticmethod
    def f64(m: Any) -> Any:
        return m.double()

    @staticmethod
    def eigh(m: Any) -> tuple[Any, Any]:
        import torch

        return torch.linalg.eigh(m)

    @staticmethod
    def eigvalsh(m: Any) -> Any:
        import torch

        return torch.linalg.eigvalsh(m)

    @staticmethod
    def flip(x: Any, axis: int) -> Any:
        return x.flip(axis)

    @staticmethod
    def sqrt0(x: Any) -> Any:
        return x.clamp_min(0).sqrt()

    @staticmethod
    def root_or_one(s: Any) -> Any:
        import torch

        return torch.where(s > 0, s.clamp_min(0).sqrt(), torch.ones_like(s))

    @staticmethod
    def like(x: Any, w: Any) -> Any:
        return x.to(w.dtype).contiguous()


def _ops(x: Any) -> Any:
    return _TorchOps if is_torch_tensor(x) else _NumpyOps


# ------------------------------------------------------------- weight layouts
def to_matrix(w: Any, layout: str) -> Any:
    """The matrix a layout factorizes (see module doc); numpy arrays or torch tensors."""
    if layout == "channel":
        return w.reshape(w.shape[0], -1)
    if layout == "spatial":
        f, c, kh, kw = w.shape
        return _ops(w).permute(w, (1, 2, 3, 0)).reshape(c * kh, kw * f)
    if layout == "linear":
        return w
    if layout == "linear_t":
        return w.T
    raise ValueError(f"unknown layout `{layout}`")


def from_matrix(m: Any, layout: str, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`to_matrix`."""
    if layout == "channel":
        return m.reshape(shape)
    if layout == "spatial":
        f, c, kh, kw = shape
        return _ops(m).permute(m.reshape(c, kh, kw, f), (3, 0, 1, 2))
    if layout == "linear":
        return m
    if layout == "linear_t":
        return m.T
    raise ValueError(f"unknown layout `{layout}`")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK eigensolvers on one thread (when threadpoolctl is installed).  The Gram
    matrices here are at most a few thousand wide, where threads gain little, and a
    threaded solver slows down by orders of magnitude when the cores are oversubscribed
    (parallel test workers, other jobs)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def singular_values(m: Any) -> Any:
    """Singular values of ``m`` (descending, float64; numpy in, numpy out, or torch in,
    torch out), as square roots of the eigenvalues of the smaller Gram matrix (``m m^T``
    or ``m^T m``).  Float64 Gram matrices resolve singular values down to about
    ``1e-8 * s_1``, far below any tolerance used here."""
    ops = _ops(m)
    m = ops.f64(m)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    with _one_thread():
        lam = ops.eigvalsh(gram)
    return ops.sqrt0(ops.flip(lam, 0))


def truncated_factors(m: Any, r: int) -> tuple[Any, Any]:
    """``(A, B)`` with ``A @ B = M_r``, the best rank-``r`` approximation of ``m``.

    With ``U_r`` the top-``r`` eigenvectors of ``m m^T`` (left singular vectors),
    ``M_r = U_r U_r^T m``; balanced as ``A = U_r sqrt(s_r)``, ``B = U_r^T m / sqrt(s_r)``
    (``B = sqrt(s_r) V_r^T``).  When ``m`` is tall the same is done on ``m^T``.  Float64;
    numpy arrays, or torch tensors (differentiable) for a projection while training.
    """
    ops = _ops(m)
    m = ops.f64(m)
    tall = m.shape[0] > m.shape[1]
    if tall:
        m = m.T
    with _one_thread():
        lam, u = ops.eigh(m @ m.T)
    u = ops.flip(u, 1)[:, :r]
    s = ops.sqrt0(ops.flip(lam, 0)[:r])
    root = ops.root_or_one(s)
    a, b = u * root, (u.T @ m) / root[:, None]
    return (b.T, a.T) if tall else (a, b)


@dataclass(frozen=True)
class TruncatedSVD:
    """Projection function ``W -> from_matrix(M_r)``: the best rank-``rank`` approximation
    of the weight's matrix in its layout (computed in float64, returned in W's dtype).
    Takes numpy arrays (the graph's weights) or torch tensors (``projected_model``,
    differentiable)."""

    rank: int
    layout: str
    known: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def __call__(self, w: Any) -> Any:
        if self.known is not None and isinstance(w, np.ndarray) and _same(w, self.known[0]):
            return self.known[1].copy()  # the weight the pass decided on: result cached
        a, b = truncated_factors(to_matrix(w, self.layout), self.rank)
        return _ops(w).like(from_matrix(a @ b, self.layout, tuple(w.shape)), w)

    @classmethod
    def from_factors(cls, w: np.ndarray, layout: str, a: np.ndarray, b: np.ndarray) -> "TruncatedSVD":
        """The projection of rank ``a.shape[1]``, remembering its value ``a @ b`` on ``w``."""
        value = _NumpyOps.like(from_matrix(a @ b, layout, tuple(w.shape)), w)
        return cls(int(a.shape[1]), layout, (w.copy(), value))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


# ------------------------------------------------------------------ candidates
@dataclass
class _Layer:
    """One factorizable layer: its matrix's singular values and its MAC model.

    ``macs(r) = per_rank * r`` for the factorized pair, ``orig`` for the layer itself.
    """

    node: Node
    layout: str
    weight: np.ndarray
    s: np.ndarray  # singular values, descending (float64)
    orig: int
    per_rank: int
    rank: int | None = None  # chosen rank; None = keep the layer

    @property
    def full_rank(self) -> int:
        return int(self.s.size)

    @property
    def max_rank(self) -> int:
        """The largest rank at which the pair is strictly cheaper than the layer."""
        if self.per_rank <= 0:
            return 0
        return min(self.full_rank, (self.orig - 1) // self.per_rank)

    def macs(self, r: int | None) -> int:
        return self.orig if r is None else self.per_rank * r

    def share_lost(self, r: int) -> float:
        """Energy share of the dropped singular values ``s_r, s_{r+1}, ...``."""
        e = np.square(self.s)
        total = float(e.sum())
        return float(e[r:].sum()) / total if total > 0 else 0.0


def _conv_macs_model(graph: Graph, node: Node, w: np.ndarray, layout: str) -> tuple[int, int]:
    """(original MACs, MACs per unit of rank) of a conv in ``layout``."""
    x, y = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    assert x is not None and y is not None
    f, c = int(w.shape[0]), int(w.shape[1])
    k = math.prod(w.shape[2:])
    out = math.prod(y) // f  # output positions (batch included)
    orig = out * f * c * k
    if layout == "channel":
        return orig, out * (c * k + f)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    mid = y[0] * y[2] * x[3]  # first conv's output positions: output rows x input columns
    return orig, mid * c * kh + out * f * kw


def _linear_macs_model(graph: Graph, node: Node, out_f: int, in_f: int) -> tuple[int, int]:
    y = graph.shape(node.outputs[0])
    assert y is not None
    rows = math.prod(y) // out_f
    return rows * out_f * in_f, rows * (in_f + out_f)


# ------------------------------------------------------------------------ pass
@register_pass
@dataclass(frozen=True)
class Factorize(Pass):
    """Replace convs and linears by two thinner layers from a truncated SVD.

    Options:
        energy: per layer, the smallest rank keeping this fraction of the squared
            singular values, in (0, 1].
        rank: per layer, this rank (or the layer's rank if lower).
        macs: keep at most this fraction of the model's MACs, in (0, 1]; ranks are lowered
            where the least energy is lost per MAC saved.
        scheme: `channel` (k x k conv then 1x1) or `spatial` (k x 1 conv then 1 x k; 2-d convs).
        ignore: layers left alone (node names, module paths or prefixes).
        lossless: drop only singular values that are zero to float32 precision (the
            default when no energy, rank or macs is given).
    """

    name = "factorize"
    energy: float | None = None
    rank: int | None = None
    macs: float | None = None
    scheme: str = "channel"
    ignore: tuple[str, ...] = ()
    lossless: bool = False

    def validate(self) -> None:
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise PassOptionError(f"{self.name}: energy must be in (0, 1], got {self.energy}")
        if self.rank is not None and self.rank < 1:
            raise PassOptionError(f"{self.name}: rank must be at least 1, got {self.rank}")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise PassOptionError(f"{self.name}: macs must be in (0, 1], got {self.macs}")
        given = [n for n in ("energy", "rank", "macs") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PassOptionError(f"{self.name}: give one of energy, rank, macs (got {', '.join(given)})")
        if self.scheme not in SCHEMES:
            raise PassOptionError(f"{self.name}: scheme must be one of {', '.join(SCHEMES)}, got `{self.scheme}`")

    @property
    def is_lossless(self) -> bool:
        return self.lossless or (self.energy is None and self.rank is None and self.macs is None)

    # ------------------------------------------------------------------ call
    def call(self, graph: Graph) -> FactorizeResult:
        layers, skipped = self._layers(graph)
        if self.macs is not None and not self.is_lossless:
            self._decide_macs(graph, layers)
        else:
            for layer in layers:
                self._decide_layer(layer, skipped)
        chosen = [layer for layer in layers if layer.rank is not None]
        projection = Projection()
        work = graph.copy()
        records = []
        for layer in chosen:
            r = int(layer.rank)  # type: ignore[arg-type]
            a, b = truncated_factors(to_matrix(layer.weight, layer.layout), r)
            projection.functions[layer.node.params["weight"]] = TruncatedSVD.from_factors(layer.weight, layer.layout, a, b)
            _rewrite(work, work.node(layer.node.name), layer, a, b)
            records.append(_record(layer, r))
        if chosen:
            work.commit()
        logger.info("factorize: factorized %d of %d layers", len(chosen), len(layers))
        for rec in records:
            logger.debug("factorize: %s rank %d/%d, MACs %d -> %d", rec["layer"], rec["rank"], rec["full_rank"], rec["macs_before"], rec["macs_after"])
        return FactorizeResult(work, bool(chosen), graph, projection, records, skipped=skipped)

    def _layers(self, graph: Graph) -> tuple[list[_Layer], dict[str, str]]:
        layers: list[_Layer] = []
        skipped: dict[str, str] = {}
        for node, w in candidate_layers(graph, ("conv", "linear"), self.ignore, skipped, "transposed conv: not factorized"):
            label = _label(node)
            layer_or_reason = self._layer(graph, node, w)
            if isinstance(layer_or_reason, str):
                skipped[label] = layer_or_reason
            else:
                layers.append(layer_or_reason)
        return layers, skipped

    def _layer(self, graph: Graph, node: Node, w: np.ndarray) -> _Layer | str:
        if node.kind == "linear":
            axes = tuple(node.attrs.get("weight_axes", (0, 1)))
            if w.ndim != 2 or axes not in ((0, 1), (1, 0)):
                return f"linear weight of shape {tuple(w.shape)} with weight_axes {axes}"
            layout = "linear" if axes == (0, 1) else "linear_t"
            out_f, in_f = to_matrix(w, layout).shape
            orig, per_rank = _linear_macs_model(graph, node, int(out_f), int(in_f))
        else:
            if int(node.attrs.get("groups", 1)) != 1:
                return "grouped conv: not factorized"
            if self.scheme == "spatial" and w.ndim != 4:
                return f"the spatial scheme needs a 2-d conv, this one is {w.ndim - 2}-d"
            layout = self.scheme
            orig, per_rank = _conv_macs_model(graph, node, w, layout)
        s = singular_values(to_matrix(w, layout))
        layer = _Layer(node, layout, w, s, orig, per_rank)
        if layer.max_rank < 1:
            return "no rank makes two layers cheaper than one"
        return layer

    # ---------------------------------------------------------------- decide
    def _target_rank(self, layer: _Layer) -> int:
        s = layer.s
        if self.is_lossless:
            rows, cols = to_matrix(layer.weight, layer.layout).shape
            tol = max(rows, cols) * EPS32 * float(s[0]) if s.size else 0.0
            return int((s > tol).sum())
        if self.rank is not None:
            return min(self.rank, layer.full_rank)
        e = np.square(s)
        total = float(e.sum())
        if total == 0.0:
            return 0
        cum = np.cumsum(e)
        return int((cum < self.energy * total * (1 - 1e-12)).sum()) + 1  # type: ignore[operator]

    def _decide_layer(self, layer: _Layer, skipped: dict[str, str]) -> None:
        r = max(self._target_rank(layer), 1)
        if r > layer.max_rank:
            if not self.is_lossless or r < layer.full_rank:
                skipped[_label(layer.node)] = (
                    f"rank {r} of {layer.full_rank} would cost {layer.macs(r):,} MACs, "
                    f"not less than the layer's {layer.orig:,}"
                )
            return
        layer.rank = r

    def _decide_macs(self, graph: Graph, layers: list[_Layer]) -> None:
        """Greedy over rank steps, cheapest energy share per MAC saved first."""
        base = graph_cost(graph, with_params=False).macs
        target = self.macs * base  # type: ignore[operator]
        current = base
        heap: list[tuple[float, int, int]] = []
        for i, layer in enumerate(layers):
            heapq.heappush(heap, (*_next_price(layer), i))
        while current > target:
            if not heap:
                raise BudgetError(
                    f"{self.name}: cannot reach macs={self.macs}: factorizing every layer to rank 1 leaves "
                    f"{current / base:.3f} of the MACs ({current:,} of {base:,})"
                )
            _, _, i = heapq.heappop(heap)
            layer = layers[i]
            new = layer.max_rank if layer.rank is None else layer.rank - 1
            current -= layer.macs(layer.rank) - layer.macs(new)
            layer.rank = new
            if new > 1:
                heapq.heappush(heap, (*_next_price(layer), i))


def _next_price(layer: _Layer) -> tuple[float, int]:
    """(energy share lost per MAC saved, -MACs saved) of the layer's next rank step."""
    if layer.rank is None:
        new = layer.max_rank
        lost = layer.share_lost(new)
    else:
        new = layer.rank - 1
        lost = layer.share_lost(new) - layer.share_lost(layer.rank)
    saved = layer.macs(layer.rank) - layer.macs(new)
    return lost / max(saved, 1), -saved


# ----------------------------------------------------------------- rewrite
def _label(node: Node) -> str:
    return node.label or node.name


def _rewrite(work: Graph, node: Node, layer: _Layer, a: np.ndarray, b: np.ndarray) -> None:
    """Replace ``node`` by the two layers of the factors ``A`` (rows x r), ``B`` (r x cols)."""
    w = layer.weight
    r = int(a.shape[1])
    bias = work.node_param(node, "bias")
    x = node.inputs[0]
    dtype = w.dtype
    if layer.layout in ("linear", "linear_t"):
        first = NewNode("linear", [x], {}, {"weight": np.ascontiguousarray(b.astype(dtype))})
        second_params = {"weight": np.ascontiguousarray(a.astype(dtype))}
        if bias is not None:
            second_params["bias"] = bias.copy()
        work.replace_node(node, [first, NewNode("linear", ["%0"], {}, second_params)])
        return
    nd = w.ndim - 2
    stride = tuple(int(v) for v in node.attrs.get("stride", (1,) * nd))
    dilation = tuple(int(v) for v in node.attrs.get("dilation", (1,) * nd))
    pads = tuple(int(v) for v in node.attrs.get("pads", (0,) * 2 * nd))
    f, c = int(w.shape[0]), int(w.shape[1])
    if layer.layout == "channel":
        w1 = b.reshape(r, c, *w.shape[2:])
        w2 = a.reshape(f, r, *(1,) * nd)
        attrs1 = {"stride": stride, "dilation": dilation, "groups": 1, "pads": pads}
        attrs2 = {"stride": (1,) * nd, "dilation": (1,) * nd, "groups": 1, "pads": (0,) * 2 * nd}
    else:
        kh, kw = int(w.shape[2]), int(w.shape[3])
        w1 = a.T.reshape(r, c, kh, 1)
        w2 = np.transpose(b.reshape(r, kw, f), (2, 0, 1))[:, :, None]
        (sh, sw), (dh, dw) = stride, dilation
        ph0, pw0, ph1, pw1 = pads
        attrs1 = {"stride": (sh, 1), "dilation": (dh, 1), "groups": 1, "pads": (ph0, 0, ph1, 0)}
        attrs2 = {"stride": (1, sw), "dilation": (1, dw), "groups": 1, "pads": (0, pw0, 0, pw1)}
    params2: dict[str, np.ndarray] = {"weight": np.ascontiguousarray(w2.astype(dtype))}
    if bias is not None:
        params2["bias"] = bias.copy()
    work.replace_node(node, [
        NewNode("conv", [x], attrs1, {"weight": np.ascontiguousarray(w1.astype(dtype))}),
        NewNode("conv", ["%0"], attrs2, params2),
    ])


def _record(layer: _Layer, r: int) -> dict[str, Any]:
    return {
        "layer": _label(layer.node),
        "kind": layer.node.kind,
        "scheme": layer.layout,
        "shape": tuple(layer.weight.shape),
        "rank": r,
        "full_rank": layer.full_rank,
        "energy_kept": 1.0 - layer.share_lost(r),
        "macs_before": layer.orig,
        "macs_after": layer.macs(r),
        "macs_saved": layer.orig - layer.macs(r),
    }
