"""The reshape channel rule: axes matched by running products, split axes as coordinates.

A reshape pairs minimal runs of input and output axes with equal products (ignoring
size-1 axes, which carry no channels).  In a run where one side is a single axis of size
``M`` (the *merged* side) and the other has axes ``a_1 .. a_k`` (the *split* side,
row-major), merged index ``m`` has coordinate ``(m // inner_j) % a_j`` on split axis ``j``,
``inner_j = a_{j+1} * ... * a_k``.  So a port on split axis ``j`` is linked to the merged
axis by that map: removing index ``h`` of axis ``j`` removes exactly the merged indices
whose ``j`` coordinate is ``h``, and the reshape stays valid with ``a_j`` one smaller.

From the merged side one split axis is chosen to carry the channels (linking it to
several would tie every index together):

* when the reshape *merges* (``flatten``, heads merged back into the embedding), the
  leading axis: output feature ``f`` belongs to input channel ``f // inner``;
* when it *splits*, the first axis that is not a *stack* axis (selected or unbound index
  by index afterwards, or split into single slices that are squeezed, as ONNX spells
  ``unbind``: the 3 of a fused ``qkv`` reshape) and not an *inner* axis (merged
  back later in a non-leading position: the group axis of a channel shuffle
  ``view(n, g, c/g, h, w).transpose(1, 2).view(n, c, h, w)``).  So a fused in-projection
  is split into heads, and a shuffle's input channel ``b * c/g + a`` is tied to every
  ``b' * c/g + a``: the shuffle stays a permutation with ``g`` groups after pruning.

A run with several non-unit axes on both sides ties its leading axes when one covers a
whole number of the other's indices (``(C, H, W) -> (G, C/G*H*W)``: channel ``c`` is group
``c // (C/G)``, the ONNX group-norm pattern); its other axes freeze.
"""
from __future__ import annotations

import math

import numpy as np

from .graph import Graph, Node, Port
from .rules import Coupling, Link, _rank, _reshape_segments, frozen, norm_axis, permutation, rule

__all__ = ["reshape_rule", "axis_carries_channels"]

_PASS_THROUGH = {"identity", "act", "batchnorm"}


@rule("reshape")
def reshape_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Reshape (see the module docstring): identity for an axis kept whole, a coordinate
    map between a split axis and its merged axis, leading-to-leading for regrouped runs."""
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = graph.shape(x), graph.shape(y)
    if sx is None or sy is None:
        return frozen(f"{node} has unknown shapes")
    segments = _reshape_segments(sx, sy)
    if segments is None:
        return frozen(f"{node} reorders elements in a way no rule covers")
    mine_x = port.value == x
    for (i0, i1), (j0, j1) in segments:
        if mine_x and i0 <= port.axis <= i1 or not mine_x and j0 <= port.axis <= j1:
            break
    else:
        return frozen(f"{node}: axis {port.axis} not matched")
    xa = [a for a in range(i0, i1 + 1) if sx[a] != 1]
    ya = [a for a in range(j0, j1 + 1) if sy[a] != 1]
    mine = xa if mine_x else ya
    if port.axis not in mine:
        if not xa and not ya and i0 == i1 and j0 == j1:
            return Coupling(links=[Link(Port(x, i0), Port(y, j0))])
        return Coupling()  # a size-1 axis carries no channels
    if len(xa) == 1 and len(ya) == 1:
        return Coupling(links=[Link(Port(x, xa[0]), Port(y, ya[0]))])
    if len(xa) > 1 and len(ya) > 1:
        return _regroup(node, port, x, y, sx, sy, xa, ya)
    merged, m_axis, split, s_axes, s_shape = (x, xa[0], y, ya, sy) if len(xa) == 1 else (y, ya[0], x, xa, sx)
    size = (sx if merged == x else sy)[m_axis]
    if port.value == split:
        return Coupling(links=[_coordinate_link(Port(merged, m_axis), Port(split, port.axis), size, s_shape, s_axes)])
    carrier = s_axes[0] if split == x else _split_carrier(graph, y, s_axes)
    if carrier is None:
        return frozen(f"{node} splits axis {port.axis} into axes that all stack or merge back")
    return Coupling(links=[_coordinate_link(port, Port(split, carrier), size, s_shape, s_axes)])


def _coordinate_link(merged: Port, split: Port, size: int, shape: tuple[int, ...], axes: list[int]) -> Link:
    """Merged index m -> its coordinate on split axis ``split.axis`` (row-major)."""
    inner = math.prod(shape[a] for a in axes if a > split.axis)
    return Link(merged, split, (np.arange(size) // inner) % shape[split.axis])


def _regroup(node: Node, port: Port, x: str, y: str, sx: tuple[int, ...], sy: tuple[int, ...],
             xa: list[int], ya: list[int]) -> Coupling:
    """Leading axes of a regrouped run, when one's index blocks nest in the other's."""
    if port.axis != (xa[0] if port.value == x else ya[0]):
        return frozen(f"{node} regroups axis {port.axis} in a non-leading position")
    inner_x = math.prod(sx[a] for a in xa[1:])
    inner_y = math.prod(sy[a] for a in ya[1:])
    px, py = Port(x, xa[0]), Port(y, ya[0])
    if inner_y % inner_x == 0:  # each output index covers whole input channels
        return Coupling(links=[Link(px, py, (np.arange(sx[xa[0]]) * inner_x) // inner_y)])
    if inner_x % inner_y == 0:
        return Coupling(links=[Link(py, px, (np.arange(sy[ya[0]]) * inner_y) // inner_x)])
    return frozen(f"{node} regroups axis {port.axis} across channel boundaries")


def _split_carrier(graph: Graph, value: str, axes: list[int]) -> int | None:
    """The first split axis that carries channels downstream (see module doc)."""
    for a in axes:
        if axis_carries_channels(graph, value, a):
            return a
    return None


def axis_carries_channels(graph: Graph, value: str, axis: int, depth: int = 8) -> bool:
    """False when every use of ``value``'s axis ``axis`` (followed through layout ops) is a
    selection of single indices or a merge into a non-leading position; True otherwise."""
    users = graph.consumers(value)
    if not users or depth == 0:
        return True
    return any(_use_carries(graph, u, value, axis, depth) for u in users)


def _use_carries(graph: Graph, node: Node, value: str, axis: int, depth: int) -> bool:
    kind = node.kind
    if not node.outputs or not node.outputs[0] or node.inputs[0] != value:
        return True
    rank = _rank(graph, value)
    if kind in ("select", "unbind"):
        sel = norm_axis(int(node.attrs["axis"]), rank)
        if sel == axis:
            return False
        nxt = axis - (sel < axis)
        return any(axis_carries_channels(graph, v, nxt, depth - 1) for v in node.outputs if v)
    if kind == "split" and norm_axis(int(node.attrs["axis"]), rank) == axis:
        outs = [v for v in node.outputs if v]
        return not all((graph.shape(v) or (0,) * rank)[axis] == 1 for v in outs) or not all(
            c.kind == "squeeze" for v in outs for c in graph.consumers(v))  # split into single slices
    if kind in _PASS_THROUGH:
        return axis_carries_channels(graph, node.outputs[0], axis, depth - 1)
    if kind in ("permute", "transpose"):
        return axis_carries_channels(graph, node.outputs[0], permutation(node, rank).index(axis), depth - 1)
    if kind == "squeeze":
        removed = [norm_axis(int(a), rank) for a in node.attrs.get("axes", [])]
        return axis in removed or axis_carries_channels(graph, node.outputs[0], axis - sum(a < axis for a in removed), depth - 1)
    if kind == "unsqueeze":
        out_rank = _rank(graph, node.outputs[0])
        inserted = sorted(norm_axis(int(a), out_rank) for a in node.attrs.get("axes", []))
        out = axis
        for a in inserted:
            out += a <= out
        return axis_carries_channels(graph, node.outputs[0], out, depth - 1)
    if kind == "reshape":
        return not _merged_inner(graph, node, axis)
    return True


def _merged_inner(graph: Graph, node: Node, axis: int) -> bool:
    """Does reshape ``node`` merge its input axis ``axis`` in a non-leading position?"""
    sx, sy = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    segments = _reshape_segments(sx, sy) if sx is not None and sy is not None else None
    for (i0, i1), (j0, j1) in segments or []:
        if i0 <= axis <= i1:
            xa = [a for a in range(i0, i1 + 1) if sx[a] != 1]  # type: ignore[index]
            ya = [a for a in range(j0, j1 + 1) if sy[a] != 1]  # type: ignore[index]
            return len(xa) > 1 and len(ya) == 1 and axis != xa[0]
    return False
