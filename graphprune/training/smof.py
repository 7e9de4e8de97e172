"""SMOF ("Squeezing More Out of Filters") gates: train so that ``shrink-kernels{lossless=true}``
and ``prune-channels{lossless=true}`` remove kernel rings and channels exactly.

No public code exists for SMOF; these are graphprune's design choices, stated here.

Gates are ``torch.nn.utils.parametrize`` parametrizations, so the model keeps its module
structure and :func:`graphprune.bake` makes them permanent.

Ring gates (one conv weight ``W: F x C x kh x kw``, odd kernel sizes).  The centre tap
``(c_h, c_w)`` is never gated (a ``1x1`` kernel is the channel gates' business).  With
gates ``g_1..g_R`` (``R = (k-1)/2``, ``g_1`` the innermost ring) the multiplier of a tap
at Chebyshev distance ``d = max(|i-c_h|, |j-c_w|)`` is

    M(d) = prod_{j=1..d} g_j        (M(0) = 1),

so ring ``d`` is scaled by the gates of every ring from 1 out to ``d``: setting ``g_d = 0``
zeroes ring ``d`` *and every ring outside it*, and no setting zeroes an inner ring while
an outer ring stays.  That is exactly the order in which ``shrink-kernels`` can drop rings
(``k -> k-2`` only ever removes the outermost ring), so every zero pattern the gates can
produce is removable.  ``per_axis=True`` gives each spatial axis its own nested gates,
``M(i, j) = Mh(|i-c_h|) * Mw(|j-c_w|)``: ``gh_d = 0`` zeroes rows at distance ``>= d``,
which ``shrink-kernels{per_axis=true}`` removes as ``3x3 -> 1x3``.  Without ``per_axis``
the kernel must be square.

Channel gates (one gate ``c_f`` per output channel ``f`` of a conv).  A zero filter alone
does not make a channel removable when a batch norm follows (its output is then the
constant ``beta - gamma * mean / std``), so the gate multiplies the scale and shift of the
batch norm that alone reads the conv (``gamma_f * c_f``, ``beta_f * c_f``: with
``c_f = 0`` the channel is exactly 0), or, without such a norm, the conv's weight and bias.
Only convs whose output channels are removable on their own get channel gates: the
conv must be the only producer in its coupling group (a conv feeding a residual add shares
its channels with the stream; zeroing it alone removes nothing), and the group must not be
frozen.

Penalty (:func:`smof_penalty`): ``sum_gates cost_g * |g|``, an L1 on the gates weighted by
what each gate saves when it reaches zero, normalised by the model's total:

* ``weight="macs"`` (from the graph's shapes): ring gate ``d`` saves the MACs of ring ``d``
  (``out_positions * F * C * taps(d)``; per axis, rows or columns at distance ``d``);
  channel gate ``f`` saves the conv's MACs per filter plus every consumer's MACs per input
  channel;
* ``weight="latency"``: the same savings measured in onnxruntime (CPU, one thread):
  each conv alone at its input shape, kernel ``k`` against ``k-2`` (pads ``p-1``) for
  rings, ``F`` against ``F - step`` filters (and ``C`` against ``C - step`` input channels
  for consumers) for channels, divided by ``step`` (``latency_channel_step``, default 1;
  a larger step averages out timer noise on small convs).  Negative differences (noise)
  count as 0.  Timings are cached per configuration in memory and, with
  ``latency_cache=PATH``, in a JSON file.

The gate's weight is the *marginal* saving of its own ring (not the rings outside it that
it also zeroes): the outer gates carry the outer rings' cost, and the cumulative product
already makes an inner gate's zero remove them.

Thresholding (:func:`smof_threshold`): every gate with ``|g| < tau`` is set to exactly 0,
then the parametrizations are baked: zero rings and channels become exact zeros
(``w * 0 == 0`` in floating point), which the lossless passes remove exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from graphprune.cost import node_macs
from graphprune.coupling import analyse
from graphprune.graph import Graph, Node, Port
from graphprune.projection import bake

__all__ = ["ChannelGate", "RingGate", "SMOFGates", "baked_state_dict", "smof_gates", "smof_penalty", "smof_threshold",
           "LatencyTable"]

logger = logging.getLogger(__name__)


# ===================================================================== gates
class RingGate(nn.Module):
    """Parametrization ``W -> W * M`` with nested ring gates (see module doc).

    ``gates`` has shape ``(R,)`` (rings) or ``(2, R)`` (per axis: height, width), innermost
    first; ``cost`` (same shape, a buffer) is each gate's saving for the penalty."""

    def __init__(self, kernel: Sequence[int], per_axis: bool = False) -> None:
        super().__init__()
        kh, kw = (int(k) for k in kernel)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"ring gates need odd kernel sizes, got {kh}x{kw}")
        if not per_axis and kh != kw:
            raise ValueError(f"ring gates on a {kh}x{kw} kernel need per_axis=True")
        self.kernel = (kh, kw)
        self.per_axis = per_axis
        shape = (2, max(kh, kw) // 2) if per_axis else (kh // 2,)
        self.gates = nn.Parameter(torch.ones(shape))
        self.register_buffer("cost", torch.zeros(shape))
        dh = (torch.arange(kh) - kh // 2).abs()
        dw = (torch.arange(kw) - kw // 2).abs()
        self.register_buffer("dist_h", dh, persistent=False)
        self.register_buffer("dist_w", dw, persistent=False)

    @staticmethod
    def _nested(g: torch.Tensor) -> torch.Tensor:
        """``[1, g_1, g_1 g_2, ...]``: the multiplier per distance from the centre."""
        return torch.cat([g.new_ones(1), torch.cumprod(g, 0)])

    def multiplier(self) -> torch.Tensor:
        """The ``kh x kw`` multiplier ``M``."""
        if self.per_axis:
            mh = self._nested(self.gates[0])[self.dist_h]
            mw = self._nested(self.gates[1])[self.dist_w]
            return mh[:, None] * mw[None, :]
        d = torch.maximum(self.dist_h[:, None], self.dist_w[None, :])
        return self._nested(self.gates)[d]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.multiplier().to(w.dtype)


class ChannelGate(nn.Module):
    """Parametrization ``t -> t * c`` along axis 0 (one gate per output channel), shared
    by every tensor of the channel it is registered on (a norm's scale and shift, or a
    conv's weight and bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gates = nn.Parameter(torch.ones(channels))
        self.register_buffer("cost", torch.zeros(channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.gates.to(t.dtype).reshape(-1, *(1,) * (t.dim() - 1))


def _gate_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (RingGate, ChannelGate))]


def smof_gates(model: nn.Module) -> list[nn.Parameter]:
    """Every gate parameter of ``model`` (e.g. for their own optimiser parameter group)."""
    return [m.gates for m in _gate_modules(model)]


def smof_penalty(model: nn.Module) -> torch.Tensor:
    """``sum_g cost_g * |g|`` over every gate of ``model`` (0 without gates)."""
    terms = [(m.cost * m.gates.abs()).sum() for m in _gate_modules(model)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@torch.no_grad()
def smof_threshold(model: nn.Module, tau: float, keep_one_channel: bool = True) -> dict[str, int]:
    """Set every gate with ``|g| < tau`` to exactly 0, then bake every parametrization of
    ``model`` (in place).  ``keep_one_channel`` keeps each channel gate's largest gate
    (a layer with no channel left would cut the network).  Returns counts of zeroed ring
    and channel gates."""
    rings = channels = 0
    for m in _gate_modules(model):
        small = m.gates.abs() < tau
        if isinstance(m, ChannelGate) and keep_one_channel and bool(small.all()):
            small[int(m.gates.abs().argmax())] = False
        m.gates[small] = 0.0
        if isinstance(m, RingGate):
            rings += int(small.sum())
        else:
            channels += int(small.sum())
    bake(model)
    return {"rings": rings, "channels": channels}


@torch.no_grad()
def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``bake(model)`` would have, without modifying ``model``: every
    parametrized tensor at its current (gated) value under its plain key, gate parameters
    dropped.  Load it into an ungated instance of the architecture to try thresholds
    without copying the gated model (a deep copy of a parametrized module shares its
    generated class with the original, so baking one breaks the other)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in f".{key}":
            out[key] = value.clone()
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations.keys():
                out[f"{name}.{attr}" if name else attr] = getattr(module, attr).detach().clone()
    return out


# =============================================================== latency table
class LatencyTable:
    """Measured onnxruntime CPU latency (ms, one thread, median) of single convs, cached
    per configuration (in memory, and in ``path`` as JSON when given)."""

    def __init__(self, path: str | None = None, runs: int = 30) -> None:
        from graphprune.passes.group_convs import ConvTimer

        self.path = path
        self._timer = ConvTimer(runs=runs)
        self._cache: dict[str, float] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self._cache = {k: float(v) for k, v in json.load(f).items()}

    def conv(self, x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int], pads: Sequence[int], bias: bool = False) -> float:
        args = (tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape), 1,
                tuple(int(v) for v in stride), tuple(int(v) for v in dilation),
                tuple(int(v) for v in pads), bool(bias))
        key = repr(args)
        if key not in self._cache:
            self._cache[key] = self._timer._measure(*args)
            self._save()
        return self._cache[key]

    def _save(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._cache, f)
        os.replace(tmp, self.path)

    def graph_latency(self, graph: Graph) -> float:
        """Sum of the measured latencies of every conv of ``graph`` (each alone, at its
        shapes and group count): the latency currency of the SMOF benchmark."""
        total = 0.0
        for node in graph.nodes:
            if node.kind != "conv" or graph.shape(node.inputs[0]) is None:
                continue
            if int(node.attrs.get("groups", 1)) == 1:
                w = graph.param(node.params["weight"])
                total += self.conv(graph.shape(node.inputs[0]), w.shape, *_geometry(node, w), "bias" in node.params)  # type: ignore[arg-type]
            else:
                total += self._timer.node(graph, node)
        return total


def _geometry(node: Node, w: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    nd = len(w.shape) - 2
    return (tuple(node.attrs.get("stride", (1,) * nd)), tuple(node.attrs.get("dilation", (1,) * nd)),
            tuple(node.attrs.get("pads", (0,) * 2 * nd)))


# ================================================================ attachment
@dataclass
class _ConvInfo:
    node: Node
    module: nn.Conv2d
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class SMOFGates:
    """Attach ring and channel gates to ``model``'s convs (in place) and price them.

    ``example``: an input for the capture (shapes for the costs); ``rings``/``channels``:
    which gates; ``per_axis``: separate height and width ring gates; ``layers``: qualified
    conv names (or a predicate ``(name, module) -> bool``) to consider; ``weight``:
    ``macs`` or ``latency``; ``latency_cache``: JSON file for measured timings.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, rings: bool = True, channels: bool = True,
                 per_axis: bool = False, layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
                 weight: str = "macs", latency_cache: str | None = None, latency_channel_step: int = 1) -> None:
        import graphprune as gp

        if weight not in ("macs", "latency"):
            raise ValueError(f"SMOF: weight must be macs or latency, got `{weight}`")
        self.model = model
        self.weight = weight
        self.step = max(1, int(latency_channel_step))
        self.latency = LatencyTable(latency_cache) if weight == "latency" else None
        was = model.training
        model.eval()
        graph = gp.trace(model, example)
        model.train(was)
        self.graph = graph
        self.ring_gates: dict[str, RingGate] = {}
        self.channel_gates: dict[str, ChannelGate] = {}
        self.skipped: dict[str, str] = {}
        convs = self._convs(graph, layers)
        total = self._total(graph)
        if rings:
            for name, info in convs.items():
                self._attach_ring(name, info, per_axis, total)
        if channels:
            analysis = analyse(graph)
            for name, info in convs.items():
                self._attach_channel(graph, analysis, name, info, total)

    # ------------------------------------------------------------- selection
    def _convs(self, graph: Graph, layers: Any) -> dict[str, _ConvInfo]:
        names = set(layers) if layers is not None and not callable(layers) else None
        out: dict[str, _ConvInfo] = {}
        for node in graph.nodes:
            if node.kind != "conv" or "weight" not in node.params:
                continue
            key = node.params["weight"]
            module, attr = _owner(self.model, key)
            name = key.rpartition(".")[0]
            if not isinstance(module, nn.Conv2d) or attr != "weight" or module.transposed:
                continue
            if names is not None and name not in names:
                continue
            if callable(layers) and not layers(name, module):
                continue
            x, y = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
            if x is None or y is None:
                self.skipped[name] = "unknown shapes"
                continue
            out[name] = _ConvInfo(node, module, tuple(x), tuple(y))
        return out

    def _total(self, graph: Graph) -> float:
        if self.weight == "macs":
            return float(sum(node_macs(graph, n) for n in graph.nodes)) or 1.0
        assert self.latency is not None
        return self.latency.graph_latency(graph) or 1.0

    # ------------------------------------------------------------------ rings
    def _attach_ring(self, name: str, info: _ConvInfo, per_axis: bool, total: float) -> None:
        kh, kw = info.module.kernel_size
        if max(kh, kw) < 3:
            return
        if kh % 2 == 0 or kw % 2 == 0 or (not per_axis and kh != kw):
            self.skipped[name] = f"ring gates need odd{'' if per_axis else ', square'} kernels, got {kh}x{kw}"
            return
        gate = RingGate((kh, kw), per_axis)
        with torch.no_grad():
            gate.cost.copy_(self._ring_costs(info, gate) / total)
        parametrize.register_parametrization(info.module, "weight", gate)
        self.ring_gates[name] = gate

    def _ring_costs(self, info: _ConvInfo, gate: RingGate) -> torch.Tensor:
        kh, kw = gate.kernel
        F_, C = int(info.module.out_channels), int(info.module.in_channels // info.module.groups)
        positions = math.prod(info.y_shape) // F_
        cost = torch.zeros_like(gate.cost)
        if self.weight == "macs":
            unit = positions * F_ * C
            if gate.per_axis:
                for axis, (k, other) in enumerate(((kh, kw), (kw, kh))):
                    for d in range(1, k // 2 + 1):
                        cost[axis, d - 1] = unit * 2 * other  # two rows (columns) of `other` taps
            else:
                for d in range(1, kh // 2 + 1):
                    cost[d - 1] = unit * ((2 * d + 1) ** 2 - (2 * d - 1) ** 2)
            return cost
        assert self.latency is not None
        stride, dilation, pads = _geometry(info.node, info.module.weight)
        bias = info.module.bias is not None
        nd = 2

        def timed(kernel: tuple[int, int]) -> float:
            cut = [(k0 - k) // 2 * d for k0, k, d in zip((kh, kw), kernel, dilation)]
            p = [max(0, pads[a] - cut[a % nd]) for a in range(2 * nd)]
            return self.latency.conv(info.x_shape, (F_, C, *kernel), stride, dilation, p, bias)  # type: ignore[union-attr]

        if gate.per_axis:
            for axis, k in enumerate((kh, kw)):
                for d in range(1, k // 2 + 1):
                    big = [kh, kw]
                    big[axis] = 2 * d + 1
                    small = list(big)
                    small[axis] = 2 * d - 1
                    cost[axis, d - 1] = max(0.0, timed(tuple(big)) - timed(tuple(small)))  # type: ignore[arg-type]
        else:
            for d in range(1, kh // 2 + 1):
                cost[d - 1] = max(0.0, timed((2 * d + 1,) * 2) - timed((2 * d - 1,) * 2))
        return cost

    # --------------------------------------------------------------- channels
    def _attach_channel(self, graph: Graph, analysis: Any, name: str, info: _ConvInfo, total: float) -> None:
        port = Port(info.node.outputs[0], 1)
        group = analysis.group_of(port)
        if group is None:
            self.skipped[name] = "its output channels are in no pruning group"
            return
        producers = {m.node.name for ms in group.members.values() for m in ms if m.coupling.role == "produce"}
        if producers != {info.node.name}:
            others = sorted(producers - {info.node.name})
            self.skipped[name] = f"its channels are shared with {', '.join(others) or 'other producers'} (e.g. a residual add)"
            return
        if not bool(group.prunable.all()):
            self.skipped[name] = "some of its channels are frozen"
            return
        F_ = int(info.module.out_channels)
        gate = ChannelGate(F_)
        consumers = [m.node for ms in group.members.values() for m in ms
                     if m.coupling.role == "consume" and m.node.kind in ("conv", "linear")]
        with torch.no_grad():
            gate.cost.fill_(self._channel_cost(graph, info, consumers) / total)
        targets = self._channel_targets(graph, info)
        for module, attr in targets:
            parametrize.register_parametrization(module, attr, gate)
        self.channel_gates[name] = gate

    def _channel_targets(self, graph: Graph, info: _ConvInfo) -> list[tuple[nn.Module, str]]:
        """The norm's scale and shift when a batch norm alone reads the conv, else the
        conv's weight and bias."""
        users = graph.consumers(info.node.outputs[0])
        if len(users) == 1 and users[0].kind == "batchnorm" and info.node.outputs[0] not in graph.outputs:
            bn = users[0]
            keys = [bn.params.get("weight"), bn.params.get("bias")]
            if all(keys):
                return [_owner(self.model, k) for k in keys]  # type: ignore[arg-type]
        out = [(info.module, "weight")]
        if info.module.bias is not None:
            out.append((info.module, "bias"))
        return out

    def _channel_cost(self, graph: Graph, info: _ConvInfo, consumers: list[Node]) -> float:
        F_ = int(info.module.out_channels)
        if self.weight == "macs":
            saved = node_macs(graph, info.node) / F_
            for c in consumers:
                cin = graph.shape(c.inputs[0])
                saved += node_macs(graph, c) / (cin[1] if c.kind == "conv" else cin[-1])  # type: ignore[index]
            return float(saved)
        assert self.latency is not None
        s = min(self.step, F_ - 1) or 1
        w = info.module.weight
        geo = _geometry(info.node, w)
        bias = info.module.bias is not None
        C = int(w.shape[1])
        full = self.latency.conv(info.x_shape, (F_, C, *w.shape[2:]), *geo, bias)
        less = self.latency.conv(info.x_shape, (F_ - s, C, *w.shape[2:]), *geo, bias)
        saved = max(0.0, full - less) / s
        for c in consumers:
            if c.kind != "conv" or int(c.attrs.get("groups", 1)) != 1:
                continue
            cw = graph.param(c.params["weight"])
            cx = tuple(graph.shape(c.inputs[0]))  # type: ignore[arg-type]
            cgeo = _geometry(c, cw)
            cb = "bias" in c.params
            cin = int(cw.shape[1])
            sc = min(s, cin - 1) or 1
            full_c = self.latency.conv(cx, cw.shape, *cgeo, cb)
            less_c = self.latency.conv((cx[0], cin - sc, *cx[2:]), (cw.shape[0], cin - sc, *cw.shape[2:]), *cgeo, cb)
            saved += max(0.0, full_c - less_c) / sc
        return float(saved)

    # ----------------------------------------------------------------- API
    def parameters(self) -> list[nn.Parameter]:
        return [g.gates for g in (*self.ring_gates.values(), *self.channel_gates.values())]

    def penalty(self) -> torch.Tensor:
        return smof_penalty(self.model)
