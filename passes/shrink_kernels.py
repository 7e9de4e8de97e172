"""`shrink-kernels`: drop the outer rings of conv kernels exactly (SMOF, "Squeezing More
Out of Filters").

The identity.  Along one spatial axis, a conv with kernel size ``k``, stride ``s``,
dilation ``d`` and pads ``b`` (begin) / ``e`` (end) computes output ``o`` from the input
positions ``o*s - b + i*d`` for taps ``i = 0..k-1`` (positions outside ``[0, H)`` read
the padding, zero).  If taps ``0`` and ``k-1`` are zero, the kernel with taps
``1..k-2`` (size ``k-2``) and pads ``b-d`` / ``e-d`` reads ``o*s - (b-d) + i'*d =
o*s - b + (i'+1)*d`` with the same weights, for every ``o`` and any stride; the output
length ``floor((H + b + e - d*(k-1) - 1) / s) + 1`` is unchanged because ``b + e`` and
``d*(k-1)`` both drop by ``2d``.  The identity holds for odd and even ``k >= 3``, per axis,
and for asymmetric pads.  Applied to every axis at once it removes the kernel's outer
ring (the weights at Chebyshev distance ``(k-1)/2`` from the centre); applied to one axis
it removes two rows or two columns (``3x3 -> 1x3``).  It repeats: ``7 -> 5 -> 3 -> 1``.

When a new pad ``b - d`` is negative (the padding is smaller than the shrink needs) the
input is cropped: ``-(b - d)`` leading positions go (likewise at the end), and the conv
keeps pad 0 there.  Exact, because the kept taps never read the cropped positions: the
first output's first tap now reads ``-b + d >= 0``.  The crop is a gather of the kept
positions along that spatial axis (``Graph.insert_gather``, which both frontends
implement); with ``crop=false`` such a step is not taken and the layer records why.
A gather has no channel rule yet, so a later ``prune-channels`` keeps the channels of a
cropped conv's input.

Decide: a ring's *energy share* is the sum of its squared weights over the layer's
original sum of squares.

* ``lossless=true`` (the default when no budget is given): drop only rings that are
  exactly zero; the output equals the input model's.
* ``energy=t``: drop rings while the layer's total dropped share stays ``<= t``.
* ``macs=m``: keep at most ``m`` of the model's MACs, each step taken on the layer
  whose next ring has the least energy share per MAC it saves.

``per_axis=true`` also considers one axis at a time (its two end rows or columns),
scored the same way, so a ``3x3`` whose side columns are negligible becomes ``3x1``.

A depthwise conv that shrinks to ``1x1`` (stride 1, no padding) is the per-channel map
``y_f = w_f x_{f//m} + b_f``; with ``fold=true`` it is folded into the input columns of
the conv that alone reads it (possibly through identity ops):
``W2'[g, c] = sum_j W2[g, c*m+j] w_{c*m+j}`` and ``b2' = b2 + sum_{f,taps} W2[g, f] b_f``
(the bias fold needs a consumer without padding, or a zero bias).  Folding into a
neighbouring batch norm needs an edit that bypasses a node, which the graph contract
does not offer yet; such layers stay as a ``1x1`` depthwise conv.

Projection (the reference): the dropped taps of each weight zeroed (a mask).

Handled: ``conv`` of any dimension, any groups, stride, dilation and pads.  Refused
(recorded in ``skipped``): transposed convs, convs without a weight parameter or whose
weight is shared by several nodes (a module called twice), ``ignore``-d layers, crops
when ``crop=false``.  Kernels already below 3 on every axis are not considered.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphprune.cost import graph_cost
from graphprune.layers import candidate_layers
from graphprune.graph import Graph, NewNode, Node
from graphprune.pass_api import BudgetError, Pass, PassOptionError, PassResult, register_pass
from graphprune.projection import Projection

__all__ = ["ShrinkKernels", "ShrinkResult"]

logger = logging.getLogger(__name__)


@dataclass
class ShrinkResult(PassResult):
    """A :class:`PassResult` that also says why layers were left alone."""

    skipped: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ layer state
@dataclass
class _Step:
    """Dropping one ring along ``axes``: its energy share and the MACs it saves."""

    axes: tuple[int, ...]
    share: float
    saved: int
    zero: bool

    def price(self) -> tuple[float, int]:
        """Energy share per MAC saved, ties broken towards larger savings."""
        return (self.share / max(self.saved, 1), -self.saved)


@dataclass
class _Layer:
    """One conv and the rings decided so far (``drop[a]`` rings on spatial axis ``a``)."""

    node: Node
    weight: np.ndarray
    out_numel: int
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    drop: list[int]
    energy: np.ndarray  # per tap: sum of squared weights over filters and channels (float64)
    dropped: float = 0.0
    blocked: str = ""

    @property
    def total(self) -> float:
        return float(self.energy.sum())

    @property
    def nd(self) -> int:
        return self.weight.ndim - 2

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    def new_kernel(self, drop: list[int] | None = None) -> tuple[int, ...]:
        drop = self.drop if drop is None else drop
        return tuple(k - 2 * r for k, r in zip(self.kernel, drop))

    def new_pads(self, drop: list[int] | None = None) -> tuple[int, ...]:
        """ONNX-order pads after dropping ``drop`` rings: both ends lose ``r*d``."""
        drop = self.drop if drop is None else drop
        cut = [r * d for r, d in zip(drop, self.dilation)]
        return tuple(p - c for p, c in zip(self.pads, cut + cut))

    def macs(self, drop: list[int] | None = None) -> int:
        return self.out_numel * int(self.weight.shape[1]) * math.prod(self.new_kernel(drop))

    def window(self, drop: list[int] | None = None) -> np.ndarray:
        """The kept taps of the weight."""
        return _narrow(self.weight, 2, self.drop if drop is None else drop)

    def ring_energy(self, axes: tuple[int, ...]) -> np.ndarray:
        """Per-tap energy of the taps that dropping one ring along ``axes`` removes."""
        window = _narrow(self.energy, 0, self.drop)
        inner = np.ones(window.shape, dtype=bool)
        _narrow(inner, 0, [1 if a in axes else 0 for a in range(self.nd)])[...] = False
        return window[inner]

    def mask(self) -> np.ndarray:
        """1 on the kept taps, 0 on the dropped rings, shaped like the weight."""
        m = np.zeros(self.weight.shape, dtype=np.float32)
        _narrow(m, 2, self.drop)[...] = 1.0
        return m

    def steps(self, per_axis: bool, crop: bool) -> list[_Step]:
        """The next rings this layer can drop: all shrinkable axes together, and (with
        ``per_axis``) each axis alone."""
        axes = [a for a, k in enumerate(self.new_kernel()) if k >= 3]
        if not axes:
            return []
        options = [tuple(axes)]
        if per_axis and len(axes) > 1:
            options += [(a,) for a in axes]
        out = []
        for option in options:
            step = self._step(option, crop)
            if step is not None:
                out.append(step)
        return out

    def _step(self, axes: tuple[int, ...], crop: bool) -> _Step | None:
        drop = list(self.drop)
        for a in axes:
            drop[a] += 1
        if not crop and min(self.new_pads(drop)) < 0:
            self.blocked = (
                f"padding {self.pads} is smaller than dropping a ring needs "
                f"(pads would become {self.new_pads(drop)}) and crop=false"
            )
            return None
        ring = self.ring_energy(axes)
        removed = float(ring.sum())
        share = removed / self.total if self.total > 0 else 0.0
        return _Step(axes, share, self.macs() - self.macs(drop), bool((ring == 0).all()))

    def take(self, step: _Step) -> None:
        for a in step.axes:
            self.drop[a] += 1
        self.dropped += step.share


# ------------------------------------------------------------------------ pass
@register_pass
@dataclass(frozen=True)
class ShrinkKernels(Pass):
    """Drop outer kernel rings (``k -> k-2``, pads ``p -> p-d``) where they are zero,
    negligible, or cheapest to lose under a MAC budget.

    Options:
        energy: per layer, drop rings while their share of the squared weights stays at
            most this, in [0, 1).
        macs: keep at most this fraction of the model's MACs, in (0, 1]; the ring with the
            least energy share per MAC saved goes first.
        per_axis: also drop two rows or two columns alone (3x3 -> 1x3).
        crop: allow steps that need a crop of the input (padding smaller than the shrink).
        fold: fold a depthwise conv shrunk to 1x1 into the conv that reads it.
        ignore: layers left alone (node names, module paths or prefixes).
        lossless: drop only rings that are exactly zero (the default without energy or macs).
    """

    name = "shrink-kernels"
    energy: float | None = None
    macs: float | None = None
    per_axis: bool = False
    crop: bool = True
    fold: bool = True
    ignore: tuple[str, ...] = ()
    lossless: bool = False

    def validate(self) -> None:
        if self.energy is not None and not 0.0 <= self.energy < 1.0:
            raise PassOptionError(f"{self.name}: energy must be in [0, 1), got {self.energy}")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise PassOptionError(f"{self.name}: macs must be in (0, 1], got {self.macs}")
        if self.energy is not None and self.macs is not None:
            raise PassOptionError(f"{self.name}: give energy or macs, not both")

    @property
    def is_lossless(self) -> bool:
        return self.lossless or (self.energy is None and self.macs is None)

    # ------------------------------------------------------------------ call
    def call(self, graph: Graph) -> ShrinkResult:
        layers, skipped = self._layers(graph)
        if self.macs is not None and not self.is_lossless:
            self._decide_macs(graph, layers)
        else:
            for layer in layers:
                self._decide_layer(layer)
        chosen = [layer for layer in layers if any(layer.drop)]
        for layer in layers:
            if layer.blocked and not any(layer.drop):
                skipped[_label(layer.node)] = layer.blocked
        projection = Projection()
        for layer in chosen:
            projection.mask(layer.node.params["weight"], layer.mask())
        work = graph.copy()
        records = [self._record(graph, layer) for layer in chosen]
        if chosen:
            for layer in chosen:
                _crop_input(work, layer)
            for layer in chosen:
                _rewrite(work, work.node(layer.node.name), layer)
            work.commit()
            if self.fold:
                self._fold_all(work, chosen, records, skipped)
        logger.info("shrink-kernels: shrank %d of %d convs", len(chosen), len(layers))
        for rec in records:
            logger.debug("shrink-kernels: %s %s -> %s", rec["layer"], rec["old_kernel"], rec["new_kernel"])
        return ShrinkResult(work, bool(chosen), graph, projection, records, skipped=skipped)

    def _layers(self, graph: Graph) -> tuple[list[_Layer], dict[str, str]]:
        layers: list[_Layer] = []
        skipped: dict[str, str] = {}
        reason = "transposed conv: shrinking its kernel changes the output size"
        for node, w in candidate_layers(graph, ("conv",), self.ignore, skipped, reason):
            if max(w.shape[2:], default=1) < 3:
                continue  # nothing to drop: not worth a record
            nd = w.ndim - 2
            y = graph.shape(node.outputs[0])
            layers.append(_Layer(
                node=node, weight=w, out_numel=math.prod(y) if y else 0,
                pads=tuple(int(p) for p in node.attrs.get("pads", (0,) * 2 * nd)),
                dilation=tuple(int(d) for d in node.attrs.get("dilation", (1,) * nd)),
                groups=int(node.attrs.get("groups", 1)), drop=[0] * nd,
                energy=np.square(w.astype(np.float64)).sum((0, 1)),
            ))
        return layers, skipped

    # ---------------------------------------------------------------- decide
    def _qualifies(self, layer: _Layer, step: _Step) -> bool:
        if self.is_lossless:
            return step.zero
        return layer.dropped + step.share <= self.energy  # type: ignore[operator]

    def _decide_layer(self, layer: _Layer) -> None:
        """Drop rings of one layer while one qualifies, the cheapest (per MAC) first."""
        while True:
            steps = [s for s in layer.steps(self.per_axis, self.crop) if self._qualifies(layer, s)]
            if not steps:
                return
            layer.take(min(steps, key=_Step.price))

    def _decide_macs(self, graph: Graph, layers: list[_Layer]) -> None:
        """Greedy: take the globally cheapest step (energy share per MAC saved) until the
        graph's MACs fit the budget."""
        base = graph_cost(graph, with_params=False).macs
        target = self.macs * base  # type: ignore[operator]
        current = base
        while current > target:
            best: tuple[tuple[float, int], _Layer, _Step] | None = None
            for layer in layers:
                for step in layer.steps(self.per_axis, self.crop):
                    if best is None or step.price() < best[0]:
                        best = (step.price(), layer, step)
            if best is None:
                raise BudgetError(
                    f"{self.name}: cannot reach macs={self.macs}: shrinking every kernel as far as it "
                    f"goes leaves {current / base:.3f} of the MACs ({current:,} of {base:,}); the rest is "
                    "in layers without kernels to shrink"
                    + ("" if self.crop else " (crop=false keeps convs with small padding)")
                )
            _, layer, step = best
            layer.take(step)
            current -= step.saved

    def _record(self, graph: Graph, layer: _Layer) -> dict[str, Any]:
        return {
            "layer": _label(layer.node),
            "old_kernel": layer.kernel,
            "new_kernel": layer.new_kernel(),
            "old_pads": layer.pads,
            "new_pads": layer.new_pads(),
            "crop": tuple(_crops(layer)) if min(layer.new_pads()) < 0 else None,
            "energy_dropped": layer.dropped,
            "macs_saved": layer.macs([0] * layer.nd) - layer.macs(),
            "folded_into": None,
        }

    # ---------------------------------------------------------------- fold
    def _fold_all(self, work: Graph, chosen: list[_Layer], records: list[dict[str, Any]], skipped: dict[str, str]) -> None:
        folded = 0
        for layer, rec in zip(chosen, records):
            if not _is_pointwise_depthwise(layer):
                continue
            node = work.node(layer.node.name)
            target, reason = _fold_target(work, node)
            if target is None:
                skipped[rec["layer"]] = f"shrunk to 1x1 but not folded: {reason}"
                continue
            reason = _fold_into_conv(work, node, target)
            if reason:
                skipped[rec["layer"]] = f"shrunk to 1x1 but not folded: {reason}"
                continue
            rec["folded_into"] = _label(target)
            folded += 1
        if folded:
            work.commit()
            logger.info("shrink-kernels: folded %d pointwise depthwise convs", folded)


# ----------------------------------------------------------------- rewrite
def _label(node: Node) -> str:
    return node.label or node.name


def _narrow(t: np.ndarray, first: int, drop: list[int]) -> np.ndarray:
    """``t`` without ``drop[a]`` leading and trailing entries on axis ``first + a`` (a view)."""
    index: list[slice] = [slice(None)] * t.ndim
    for a, r in enumerate(drop):
        index[first + a] = slice(r, t.shape[first + a] - r)
    return t[tuple(index)]


def _crops(layer: _Layer) -> list[tuple[int, int]]:
    """Per spatial axis, the input positions to crop (begin, end): the negative part of
    the new pads."""
    pads, nd = layer.new_pads(), layer.nd
    return [(max(0, -pads[a]), max(0, -pads[a + nd])) for a in range(nd)]


def _crop_input(work: Graph, layer: _Layer) -> None:
    """Feed the conv a crop of its input where its new pads are negative: a gather of
    positions ``begin .. size - end`` along each such axis (committed per axis, since each
    gather reads the previous one's output)."""
    for a, (begin, end) in enumerate(_crops(layer)):
        if begin or end:
            node = work.node(layer.node.name)
            x = node.inputs[0]
            size = work.shape(x)[2 + a]  # type: ignore[index]
            work.insert_gather(x, 2 + a, range(begin, size - end), [node])
            work.commit()


def _rewrite(work: Graph, node: Node, layer: _Layer) -> None:
    """Realise ``layer.drop`` on ``node`` (its input already cropped where needed): slice
    the kernel and lower the pads to ``max(p - r*d, 0)``; pads a conv module may not hold
    (begin != end) go through ``replace_node``."""
    key = node.params["weight"]
    pads = tuple(max(p, 0) for p in layer.new_pads())
    nd = layer.nd
    if pads[:nd] == pads[nd:]:
        for a, r in enumerate(layer.drop):
            if r:
                work.slice_param(key, 2 + a, range(r, layer.kernel[a] - r))
        work.set_attr(node, "pads", pads)
        return
    params = {"weight": np.ascontiguousarray(layer.window())}
    bias = work.node_param(node, "bias")
    if bias is not None:
        params["bias"] = bias.copy()
    attrs = {
        "stride": tuple(node.attrs.get("stride", (1,) * nd)),
        "dilation": layer.dilation,
        "groups": layer.groups,
        "pads": pads,
    }
    work.replace_node(node, [NewNode("conv", [node.inputs[0]], attrs, params)])


def _is_pointwise_depthwise(layer: _Layer) -> bool:
    """A depthwise conv (one input channel per group) now ``1x1``, stride 1, unpadded."""
    node = layer.node
    return (
        int(layer.weight.shape[1]) == 1
        and layer.groups > 1
        and all(k == 1 for k in layer.new_kernel())
        and all(int(s) == 1 for s in node.attrs.get("stride", ()))
        and all(p == 0 for p in layer.new_pads())
    )


def _fold_target(work: Graph, node: Node) -> tuple[Node | None, str]:
    """The ungrouped conv that alone reads ``node``'s output (through identity ops)."""
    value = node.outputs[0]
    while True:
        users = work.consumers(value)
        if value in work.outputs or len(users) != 1:
            return None, "its output has several readers"
        user = users[0]
        if user.kind == "identity":
            value = user.outputs[0]
            continue
        if user.kind == "conv" and int(user.attrs.get("groups", 1)) == 1 and user.inputs[0] == value:
            if "weight" not in user.params:
                return None, f"{user} has no weight parameter"
            return user, ""
        return None, f"its reader {user} is not an ungrouped conv"


def _fold_into_conv(work: Graph, dw: Node, conv: Node) -> str:
    """Replace ``conv`` by one reading ``dw``'s input with the per-channel map folded in;
    ``dw`` is then dead.  Returns a reason if the fold is not exact."""
    w = work.node_param(dw, "weight")
    b = work.node_param(dw, "bias")
    w2 = work.node_param(conv, "weight")
    b2 = work.node_param(conv, "bias")
    assert w is not None and w2 is not None
    has_bias = b is not None and bool((b != 0).any())
    if has_bias and any(int(p) != 0 for p in conv.attrs.get("pads", ())):
        return f"its bias cannot fold through the padding of {conv}"
    G, F_ = int(w2.shape[0]), int(w2.shape[1])
    C = int(work.shape(dw.inputs[0])[1])  # type: ignore[index]
    m = F_ // C
    scale = w.reshape(F_).astype(w2.dtype)
    spatial = (1,) * (w2.ndim - 2)
    new_w = (w2 * scale.reshape(1, F_, *spatial)).reshape(G, C, m, *w2.shape[2:]).sum(2)
    new_b = b2.copy() if b2 is not None else None
    if has_bias:
        w64, b64 = w2.astype(np.float64), b.astype(np.float64)  # type: ignore[union-attr]
        shift = (w64 * b64.reshape(1, F_, *spatial)).sum(axis=tuple(range(1, w2.ndim)))
        new_b = (shift if new_b is None else new_b.astype(np.float64) + shift).astype(w2.dtype)
    params = {"weight": np.ascontiguousarray(new_w)}
    if new_b is not None:
        params["bias"] = new_b
    nd = w2.ndim - 2
    attrs = {
        "stride": tuple(conv.attrs.get("stride", (1,) * nd)),
        "dilation": tuple(conv.attrs.get("dilation", (1,) * nd)),
        "groups": 1,
        "pads": tuple(conv.attrs.get("pads", (0,) * 2 * nd)),
    }
    work.replace_node(conv, [NewNode("conv", [dw.inputs[0]], attrs, params)])
    return ""
