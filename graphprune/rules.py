"""Channel rules: how the channels of one axis flow through one op.

A rule is called with a node and one :class:`~graphprune.graph.Port` (an axis of one of
the node's inputs or outputs) and returns a :class:`Coupling`:

* ``links`` — other ports whose indices are tied to this one.  ``Link(a, b, map)``
  says channel ``i`` of ``a`` is the same channel as channel ``map[i]`` of ``b``
  (``map=None``: identity).  Maps may be many-to-one (flatten: feature ``f`` of the
  output is channel ``f // HW`` of the input), so a rule may link in either direction.
* ``slices`` — the node's parameters indexed by this port's channels, as ``(role, axis)``.
  Removing channel ``i`` of the port removes index ``i`` of each such parameter axis.
* ``frozen`` — a reason why these channels cannot be removed exactly, or ``None``.
* ``role`` — ``"produce"`` when the port is an output computed per channel from the
  sliced parameters (conv/linear filters, a constant), ``"consume"`` when it is an input
  absorbed by sliced parameters (conv/linear input columns), ``"norm"`` for per-channel
  affine normalisations, otherwise ``None``.

Every op in a pruning group must have a rule and every rule must be per channel: channel
``i`` of each output depends on channel ``i`` of the linked inputs only (or on sliced
parameters).  Then zeroing all sliced parameters of a channel class (the projection) and
deleting the class (the rewrite) compute the same function, which is the invariant every
pass keeps.  A port whose op has no rule freezes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np

from .graph import Graph, Node, Port


@dataclass
class Link:
    a: Port
    b: Port
    map: np.ndarray | None = None


@dataclass
class Coupling:
    links: list[Link] = field(default_factory=list)
    slices: list[tuple[str, int]] = field(default_factory=list)
    frozen: str | None = None
    role: str | None = None


Rule = Callable[[Graph, Node, Port], Coupling]
RULES: dict[str, Rule] = {}
F = TypeVar("F", bound=Callable[..., Any])


def _registrar(table: dict[str, Any]) -> Callable[..., Callable[[F], F]]:
    """A decorator factory that files a function under op kinds in ``table``."""

    def by_kinds(*kinds: str) -> Callable[[F], F]:
        def register(fn: F) -> F:
            for kind in kinds:
                table[kind] = fn
            return fn

        return register

    return by_kinds


rule = _registrar(RULES)
"""``@rule("conv", ...)``: register a channel rule for op kinds."""


def frozen(reason: str) -> Coupling:
    return Coupling(frozen=reason)


def _rank(graph: Graph, value: str) -> int:
    shape = graph.shape(value)
    return len(shape) if shape is not None else 0


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _present(node: Node, *roles: str) -> list[str]:
    return [r for r in roles if r in node.params]


def _same_axis(graph: Graph, node: Node, port: Port, others: list[str]) -> list[Link]:
    """Identity links from ``port`` to the same axis of ``others`` where sizes agree."""
    size = graph.shape(port.value)[port.axis]  # type: ignore[index]
    links = []
    for v in others:
        shape = graph.shape(v)
        if v and v != port.value and shape is not None and port.axis < len(shape) and shape[port.axis] == size:
            links.append(Link(port, Port(v, port.axis)))
    return links


def channel_axis_only(graph: Graph, node: Node, port: Port, what: str) -> Coupling | None:
    if graph.shape(port.value) is None:
        return frozen(f"{node} has an output whose shape is unknown")
    return None


# ------------------------------------------------------------- weighted ops
def _block_links(port: Port, size: int, unit: int, other: Port, other_unit: int) -> list[Link]:
    """Tie each block of ``unit`` channels of ``port`` together and to block ``other``."""
    idx = np.arange(size)
    block = idx // unit
    return [Link(port, port, block * unit), Link(port, other, block * other_unit)]


@rule("conv")
def conv_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Conv: output channels index filters (weight axis 0, bias); input channels index
    weight axis 1.  A grouped conv keeps its groups whole: each group's input channels
    and filters form one unit, and removing units lowers ``groups`` (depthwise convs are
    the case of one input channel per group)."""
    x, y = node.inputs[0], node.outputs[0]
    if port.axis != 1:
        return frozen(f"{node} mixes axis {port.axis} (only channel axis 1 can be pruned)")
    groups = int(node.attrs.get("groups", 1))
    C, Fo = graph.shape(x)[1], graph.shape(y)[1]  # type: ignore[index]
    if groups == 1:
        if port.value == y:
            return Coupling(slices=[("weight", 0)] + [(r, 0) for r in _present(node, "bias")], role="produce")
        return Coupling(slices=[("weight", 1)], role="consume")
    cpg, fpg = C // groups, Fo // groups
    if port.value == y:
        links = _block_links(port, Fo, fpg, Port(x, 1), cpg)
        return Coupling(links=links, slices=[("weight", 0)] + [(r, 0) for r in _present(node, "bias")], role="produce")
    return Coupling(links=_block_links(port, C, cpg, Port(y, 1), fpg), role=None)


@rule("conv_transpose")
def conv_transpose_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Transposed conv: weight is (C_in, F/groups, k...); input channels index weight axis
    0, output channels index axis 1 and the bias.  Grouped transposed convs freeze."""
    if port.axis != 1:
        return frozen(f"{node} mixes axis {port.axis}")
    if int(node.attrs.get("groups", 1)) != 1:
        return frozen(f"{node} is a grouped transposed conv")
    if port.value == node.outputs[0]:
        return Coupling(slices=[("weight", 1)] + [(r, 0) for r in _present(node, "bias")], role="produce")
    return Coupling(slices=[("weight", 0)], role="consume")


@rule("linear")
def linear_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Linear on (..., D): the last output axis indexes the weight's output axis and the
    bias, the last input axis its input axis; leading axes pass through unchanged.  The
    weight is (out, in) unless ``attrs["weight_axes"]`` says otherwise (an ONNX MatMul's
    constant operand is (in, out): ``weight_axes=(1, 0)``)."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(graph, port.value)
    if port.axis != rank - 1:
        other = y if port.value == x else x
        return Coupling(links=_same_axis(graph, node, port, [other]))
    out_axis, in_axis = node.attrs.get("weight_axes", (0, 1))
    if port.value == y:
        return Coupling(slices=[("weight", out_axis)] + [(r, 0) for r in _present(node, "bias")], role="produce")
    return Coupling(slices=[("weight", in_axis)], role="consume")


@rule("batchnorm")
def batchnorm_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Batch/instance norm: y_c = (x_c - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c,
    per channel, so channel c of the output is channel c of the input and indexes every
    per-channel parameter and statistic."""
    x, y = node.inputs[0], node.outputs[0]
    other = y if port.value == x else x
    links = _same_axis(graph, node, port, [other])
    if port.axis != 1:
        return Coupling(links=links)
    roles = _present(node, "weight", "bias", "running_mean", "running_var")
    return Coupling(links=links, slices=[(r, 0) for r in roles], role="norm" if port.value == y else None)


@rule("groupnorm")
def groupnorm_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Group norm normalises within groups of C/G channels: removing a whole group keeps
    the other groups' statistics, so groups are pruned whole (``num_groups`` drops)."""
    x, y = node.inputs[0], node.outputs[0]
    other = y if port.value == x else x
    links = _same_axis(graph, node, port, [other])
    if port.axis != 1:
        return Coupling(links=links)
    C = graph.shape(x)[1]  # type: ignore[index]
    cpg = C // int(node.attrs["num_groups"])
    links.append(Link(port, port, (np.arange(C) // cpg) * cpg))
    roles = _present(node, "weight", "bias")
    return Coupling(links=links, slices=[(r, 0) for r in roles], role="norm" if port.value == y else None)


@rule("layernorm")
def layernorm_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Layer norm: the normalised (trailing) axes share one mean and variance, so their
    channels cannot be removed exactly; leading axes pass through."""
    rank = _rank(graph, port.value)
    if port.axis >= rank - int(node.attrs.get("normalized_ndim", 1)):
        return frozen(f"{node} normalises over axis {port.axis}: removing a channel changes its statistics")
    x, y = node.inputs[0], node.outputs[0]
    return Coupling(links=_same_axis(graph, node, port, [y if port.value == x else x]))


@rule("constant")
def constant_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """A constant tensor (layer scale, per-channel offset): its axis is sliced directly."""
    return Coupling(slices=[("value", port.axis)], role="produce")


# --------------------------------------------------------------- per-channel
@rule("act", "identity")
def unary_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Elementwise unary ops act on each element alone: every axis passes through.
    PReLU with one slope per channel slices its weight along the channel axis."""
    x, y = node.inputs[0], node.outputs[0]
    links = _same_axis(graph, node, port, [y if port.value == x else x])
    slices: list[tuple[str, int]] = []
    if "weight" in node.params and port.axis == 1:
        w = graph.node_param(node, "weight")
        if w is not None and w.size > 1:
            slices = [("weight", 0)]
    return Coupling(links=links, slices=slices)


@rule("pool", "pad")
def spatial_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Pooling, resizing and spatial padding act on each (batch, channel) plane alone:
    batch and channel axes pass through; spatial axes change size and freeze."""
    x, y = node.inputs[0], node.outputs[0]
    if port.axis >= 2:
        return frozen(f"{node} works across spatial axis {port.axis}")
    if node.kind == "pad" and len(node.attrs.get("pads", [])) > 2 * (_rank(graph, x) - 2):
        return frozen(f"{node} pads the channel axis")
    return Coupling(links=_same_axis(graph, node, port, [y if port.value == x else x]))


@rule("softmax")
def softmax_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Softmax normalises over one axis (frozen); the others pass through."""
    x, y = node.inputs[0], node.outputs[0]
    if port.axis == norm_axis(int(node.attrs["axis"]), _rank(graph, x)):
        return frozen(f"{node} normalises over axis {port.axis}")
    return Coupling(links=_same_axis(graph, node, port, [y if port.value == x else x]))


@rule("add", "sub", "mul", "div")
def binary_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Elementwise binary ops with broadcasting: right-aligned axes of equal size are one
    channel set (the residual add rule: all operands and the sum keep the same channels);
    a size-1 (broadcast) operand axis is not coupled.  A divisor's channels freeze."""
    y = node.outputs[0]
    ry = _rank(graph, y)
    out_axis = port.axis + ry - _rank(graph, port.value)
    size = graph.shape(y)[out_axis]  # type: ignore[index]
    if graph.shape(port.value)[port.axis] != size:  # type: ignore[index]
        return Coupling()  # a broadcast axis carries no channels of its own
    if node.kind == "div":
        positions = node.attrs.get("tensor_positions", [0, 1])
        for value, pos in zip(node.inputs, positions):
            if value == port.value and pos == 1:
                return frozen(f"{node} divides by these channels")
    links = []
    for v in [*node.inputs, y]:
        if v == port.value:
            continue
        shape = graph.shape(v)
        if shape is None:
            return frozen(f"{node} has an operand of unknown shape")
        axis = out_axis - (ry - len(shape))
        if axis >= 0 and shape[axis] == size:
            links.append(Link(port, Port(v, axis)))
    return Coupling(links=links)


# ------------------------------------------------------------- layout ops
@rule("concat")
def concat_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Concat along axis d: input k's channel i is output channel offset_k + i; along the
    other axes all inputs and the output share indices."""
    y = node.outputs[0]
    axis = norm_axis(int(node.attrs["axis"]), _rank(graph, y))
    if port.axis != axis:
        return Coupling(links=_same_axis(graph, node, port, [*node.inputs, y]))
    links, offset = [], 0
    for v in node.inputs:
        n = graph.shape(v)[axis]  # type: ignore[index]
        links.append(Link(Port(v, axis), Port(y, axis), offset + np.arange(n)))
        offset += n
    return Coupling(links=links)


@rule("split")
def split_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Split along axis d: output k's channel i is input channel offset_k + i.  A chunk
    (``attrs["equal"]``: the code splits into equal parts of whatever width it gets) also
    ties channel i of every part to channel i of the first, so the parts stay equal."""
    x = node.inputs[0]
    axis = norm_axis(int(node.attrs["axis"]), _rank(graph, x))
    outs = [v for v in node.outputs if v]
    if any(graph.shape(v) is None for v in outs) or len(outs) != len(node.outputs):
        return frozen(f"{node} has outputs that are not all used as tensors")
    if port.axis != axis:
        return Coupling(links=_same_axis(graph, node, port, [x, *outs]))
    links, offset = [], 0
    for v in node.outputs:
        n = graph.shape(v)[axis]  # type: ignore[index]
        links.append(Link(Port(v, axis), Port(x, axis), offset + np.arange(n)))
        offset += n
    sizes = {graph.shape(v)[axis] for v in outs}  # type: ignore[index]
    if node.attrs.get("equal") and len(sizes) == 1:
        links += [Link(Port(v, axis), Port(outs[0], axis)) for v in outs[1:]]
    return Coupling(links=links)


@rule("permute", "transpose")
def permute_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Permute: output axis i is input axis perm[i], index for index."""
    x, y = node.inputs[0], node.outputs[0]
    perm = permutation(node, _rank(graph, x))
    if port.value == x:
        return Coupling(links=[Link(port, Port(y, perm.index(port.axis)))])
    return Coupling(links=[Link(port, Port(x, perm[port.axis]))])


def permutation(node: Node, rank: int) -> list[int]:
    if node.kind == "transpose":
        a, b = (norm_axis(int(v), rank) for v in node.attrs["axes"])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return [norm_axis(int(p), rank) for p in node.attrs["perm"]]


@rule("reduce")
def reduce_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Reductions (mean/sum/max) over some axes: reduced axes freeze, the others pass."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _rank(graph, x)
    axes = node.attrs.get("axes")
    axes = list(range(rank)) if axes is None else ([axes] if isinstance(axes, int) else list(axes))
    reduced = sorted(norm_axis(int(a), rank) for a in axes)
    keep = bool(node.attrs.get("keepdim", False))
    if port.value == x:
        if port.axis in reduced:
            return frozen(f"{node} reduces over axis {port.axis}")
        out_axis = port.axis if keep else port.axis - sum(a < port.axis for a in reduced)
        return Coupling(links=[Link(port, Port(y, out_axis))])
    kept_axes = [a for a in range(rank) if keep or a not in reduced]
    in_axis = kept_axes[port.axis]
    if in_axis in reduced:
        return Coupling()
    return Coupling(links=[Link(port, Port(x, in_axis))])


@rule("flatten")
def flatten_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Flatten axes s..e: input channel c of axis s becomes output features
    c*inner .. c*inner + inner - 1 (inner = product of sizes s+1..e)."""
    x, y = node.inputs[0], node.outputs[0]
    shape = graph.shape(x)
    rank = len(shape)  # type: ignore[arg-type]
    s, e = norm_axis(int(node.attrs["start"]), rank), norm_axis(int(node.attrs["end"]), rank)
    return _merge_link(port, x, y, shape, s, e)  # type: ignore[arg-type]


def _merge_link(port: Port, x: str, y: str, shape: tuple[int, ...], s: int, e: int) -> Coupling:
    """Links for an op that merges input axes s..e into output axis s (row-major)."""
    inner = math.prod(shape[s + 1 : e + 1])
    if port.value == x:
        if port.axis < s:
            return Coupling(links=[Link(port, Port(y, port.axis))])
        if port.axis > e:
            return Coupling(links=[Link(port, Port(y, port.axis - (e - s)))])
        if port.axis == s:
            size = shape[s] * inner
            return Coupling(links=[Link(Port(y, s), port, np.arange(size) // inner)])
        return frozen(f"axis {port.axis} is merged into a non-leading position")
    if port.axis < s:
        return Coupling(links=[Link(port, Port(x, port.axis))])
    if port.axis > s:
        return Coupling(links=[Link(port, Port(x, port.axis + (e - s)))])
    return Coupling(links=[Link(port, Port(x, s), np.arange(shape[s] * inner) // inner)])


@rule("reshape")
def reshape_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Reshape: axes are matched by running products.  A port on an axis kept whole is an
    identity; one merged as the leading axis of a flatten is an expand; an output axis
    split off an input axis as its leading part is the inverse.  Anything else freezes."""
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = graph.shape(x), graph.shape(y)
    if sx is None or sy is None:
        return frozen(f"{node} has unknown shapes")
    segments = _reshape_segments(sx, sy)
    if segments is None:
        return frozen(f"{node} reorders elements in a way no rule covers")
    for (i0, i1), (j0, j1) in segments:
        if port.value == x and i0 <= port.axis <= i1 or port.value == y and j0 <= port.axis <= j1:
            break
    else:
        return frozen(f"{node}: axis {port.axis} not matched")
    leading = port.axis == (i0 if port.value == x else j0)
    if not leading:
        return frozen(f"{node} merges or splits axis {port.axis} in a non-leading position")
    inner_x, inner_y = math.prod(sx[i0 + 1 : i1 + 1]), math.prod(sy[j0 + 1 : j1 + 1])
    if inner_x != 1 and inner_y != 1:
        return frozen(f"{node} regroups axis {port.axis}")
    px, py = Port(x, i0), Port(y, j0)
    if inner_x == 1 and inner_y == 1:
        return Coupling(links=[Link(px, py)])
    if inner_y == 1:  # merge: output feature f comes from input channel f // inner_x
        return Coupling(links=[Link(py, px, np.arange(sy[j0]) // inner_x)])
    return Coupling(links=[Link(px, py, np.arange(sx[i0]) // inner_y)])


def _reshape_segments(sx: tuple[int, ...], sy: tuple[int, ...]) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Pair minimal runs of input and output axes with equal products; size-1 axes left
    over at the end (the dynamo exporter's ``view`` of a pooled ``(N, C, 1, 1)`` as
    ``(N, C)``) join the last run."""
    segs = []
    i = j = 0
    while i < len(sx) and j < len(sy):
        i0, j0 = i, j
        px, py = sx[i], sy[j]
        while px != py:
            if px < py:
                i += 1
                if i >= len(sx):
                    return None
                px *= sx[i]
            else:
                j += 1
                if j >= len(sy):
                    return None
                py *= sy[j]
        segs.append(((i0, i), (j0, j)))
        i += 1
        j += 1
    if not segs or any(d != 1 for d in (*sx[i:], *sy[j:])):
        return None
    if i < len(sx) or j < len(sy):  # trailing size-1 axes, (1, 512, 1, 1) -> (1, 512): they join the last run
        (a0, _), (b0, _) = segs[-1]
        segs[-1] = ((a0, len(sx) - 1), (b0, len(sy) - 1))
    return segs


@rule("squeeze")
def squeeze_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Squeeze removes size-1 axes ``attrs["axes"]`` (input numbering): input axis a that
    stays becomes output axis a - #{removed axes < a}, index for index.  A removed axis
    has size 1 and carries no channels."""
    x, y = node.inputs[0], node.outputs[0]
    removed = sorted(norm_axis(int(a), _rank(graph, x)) for a in node.attrs.get("axes", []))
    if port.value == x:
        if port.axis in removed:
            return Coupling()
        return Coupling(links=[Link(port, Port(y, port.axis - sum(a < port.axis for a in removed)))])
    kept = [a for a in range(_rank(graph, x)) if a not in removed]
    return Coupling(links=[Link(port, Port(x, kept[port.axis]))])


@rule("unsqueeze")
def unsqueeze_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Unsqueeze inserts size-1 axes ``attrs["axes"]`` (output numbering): output axis j
    that is not inserted is input axis j - #{inserted axes < j}, index for index."""
    x, y = node.inputs[0], node.outputs[0]
    inserted = sorted(norm_axis(int(a), _rank(graph, y)) for a in node.attrs.get("axes", []))
    if port.value == y:
        if port.axis in inserted:
            return Coupling()
        return Coupling(links=[Link(port, Port(x, port.axis - sum(a < port.axis for a in inserted)))])
    kept = [j for j in range(_rank(graph, y)) if j not in inserted]
    return Coupling(links=[Link(port, Port(y, kept[port.axis]))])


@rule("slice")
def slice_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Slice keeps a range of indices on the axes ``attrs["axes"]`` it cuts: those freeze
    (which channels survive depends on their position); every other axis passes through."""
    x, y = node.inputs[0], node.outputs[0]
    cut = {norm_axis(int(a), _rank(graph, x)) for a in node.attrs.get("axes", [])}
    if port.axis in cut:
        return frozen(f"{node} slices axis {port.axis}")
    return Coupling(links=_same_axis(graph, node, port, [y if port.value == x else x]))


@rule("gather")
def gather_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Gather with a constant index along axis a: output channel i is input channel
    index[i] (a folded permutation, a crop); other axes pass through unchanged."""
    x, y = node.inputs[0], node.outputs[0]
    axis = norm_axis(int(node.attrs["axis"]), _rank(graph, x))
    index = _gather_index(graph, node)
    if port.value not in (x, y):
        return frozen(f"{node}: its index is not a channel tensor")
    if port.axis != axis:
        return Coupling(links=_same_axis(graph, node, port, [y if port.value == x else x]))
    if index is None:
        return frozen(f"{node} gathers with an index that is not a constant")
    return Coupling(links=[Link(Port(y, axis), Port(x, axis), index)])


def _gather_index(graph: Graph, node: Node) -> np.ndarray | None:
    src = graph.producer(node.inputs[1]) if len(node.inputs) > 1 else None
    if src is None or src.kind != "constant":
        return None
    return graph.node_param(src, "value").reshape(-1).astype(np.int64)  # type: ignore[union-attr]


@rule("mha")
def mha_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    return frozen(f"{node}: multi-head attention keeps its embedding channels")


def couple(graph: Graph, node: Node, port: Port) -> Coupling:
    """Apply the rule for ``node`` to ``port``; unknown ops and unknown shapes freeze."""
    fn = RULES.get(node.kind)
    if fn is None:
        return frozen(f"`{node.label or node.name}` ({node.target}) has no channel rule")
    if graph.shape(port.value) is None:
        return frozen(f"{node} has a value of unknown shape")
    return fn(graph, node, port)


def seed_ports(graph: Graph, node: Node) -> list[Port]:
    """The channel ports where pruning can start: outputs of weighted producers."""
    if node.kind in ("conv", "conv_transpose"):
        return [Port(node.outputs[0], 1)]
    if node.kind == "linear":
        return [Port(node.outputs[0], _rank(graph, node.outputs[0]) - 1)]
    return []


# ------------------------------------------------------ attribute updates
Resize = Callable[[Graph, Node, "dict[Port, np.ndarray]"], None]
RESIZES: dict[str, Resize] = {}
resize = _registrar(RESIZES)
"""``@resize("split", ...)``: register the attribute update an op needs after its ports lost channels."""


@resize("conv")
def conv_resize(graph: Graph, node: Node, kept: dict[Port, np.ndarray]) -> None:
    """A grouped conv that lost whole groups: groups = kept filters / filters per group."""
    groups = int(node.attrs.get("groups", 1))
    out = Port(node.outputs[0], 1)
    if groups > 1 and out in kept:
        fpg = graph.shape(node.outputs[0])[1] // groups  # type: ignore[index]
        graph.set_attr(node, "groups", len(kept[out]) // fpg)


@resize("groupnorm")
def groupnorm_resize(graph: Graph, node: Node, kept: dict[Port, np.ndarray]) -> None:
    """Group norm that lost whole groups: num_groups = kept channels / channels per group."""
    port = Port(node.inputs[0], 1)
    if port in kept:
        cpg = graph.shape(node.inputs[0])[1] // int(node.attrs["num_groups"])  # type: ignore[index]
        graph.set_attr(node, "num_groups", len(kept[port]) // cpg)


@resize("split")
def split_resize(graph: Graph, node: Node, kept: dict[Port, np.ndarray]) -> None:
    """Split sizes become the kept counts of each output along the split axis."""
    axis = norm_axis(int(node.attrs["axis"]), _rank(graph, node.inputs[0]))
    if Port(node.inputs[0], axis) not in kept:
        return
    sizes = []
    for v in node.outputs:
        p = Port(v, axis)
        sizes.append(len(kept[p]) if p in kept else graph.shape(v)[axis])  # type: ignore[index]
    graph.set_attr(node, "sizes", sizes)


@resize("gather")
def gather_resize(graph: Graph, node: Node, kept: dict[Port, np.ndarray]) -> None:
    """Renumber a gather's index after its input and output lost channels:
    new_index[j] = position of index[kept_out[j]] among the kept input channels."""
    x, y = node.inputs[0], node.outputs[0]
    axis = norm_axis(int(node.attrs["axis"]), _rank(graph, x))
    pin, pout = Port(x, axis), Port(y, axis)
    if pin not in kept and pout not in kept:
        return
    index = _gather_index(graph, node)
    src = graph.producer(node.inputs[1])
    assert index is not None and src is not None
    kept_in = kept.get(pin, np.arange(graph.shape(x)[axis]))  # type: ignore[index]
    kept_out = kept.get(pout, np.arange(len(index)))
    position = np.full(graph.shape(x)[axis], -1)  # type: ignore[index]
    position[kept_in] = np.arange(len(kept_in))
    new = position[index[kept_out]]
    old = graph.node_param(src, "value")
    graph.set_param(src.params["value"], np.asarray(new, dtype=old.dtype))  # type: ignore[union-attr]


@resize("reshape")
def reshape_resize(graph: Graph, node: Node, kept: dict[Port, np.ndarray]) -> None:
    """A reshape whose input lost channels: each resized output axis gets its new size."""
    y = node.outputs[0]
    updates = {p.axis: len(idx) for p, idx in kept.items() if p.value == y}
    if updates:
        graph.set_attr(node, "shape", updates)
