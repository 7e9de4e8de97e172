"""Channel rules for attention: heads are channels of the head axis.

Multi-head attention at the op level is: projections (``linear``) to q, k, v (or one
fused in-projection), a reshape that splits the embedding into ``(heads, head_dim)``
(:mod:`graphprune.reshape_rules` maps embedding channel ``c`` to head ``c // head_dim``),
a permute that moves heads to axis 1, scaled dot-product attention per head, the inverse
permute and reshape, and the out-projection.  Head ``h`` of the output depends on head
``h`` of q and on head ``h // r`` of k and v only (``r = Hq / Hkv``; ``r = 1`` without
grouped-query attention), so the head axis is a channel axis tied across q, k, v and the
output, and a channel class is one head (with GQA: one key/value head with its ``r``
query heads, so the grouping survives pruning).  Zeroing a head's q, k, v projection rows
and out-projection columns zeroes its contribution, and deleting it computes the same:
the softmax of every other head is unchanged.

``attention`` (fused scaled dot-product attention): inputs q, k, v (..., H, N, d) and an
optional additive/boolean mask broadcast against (..., H, N, N); the head axis is rank-3.
``matmul`` (a product of two activations, ``q @ k^T`` and ``p @ v``): leading (batch)
axes broadcast like an elementwise op and are tied; the two matrix axes freeze (the
contraction mixes them).  ``select``/``unbind`` pick single indices of an axis (the q, k, v
of a fused projection): the picked axis freezes, the others shift.

Head dimensions are not pruned: the default scale 1/sqrt(d) would change.
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node, Port
from .rules import Coupling, Link, _rank, frozen, norm_axis, rule

__all__ = ["attention_rule", "matmul_rule", "select_rule", "shape_rule", "HEAD_KINDS"]

HEAD_KINDS = ("attention", "matmul")
"""Ops whose unfrozen batch/head ports make a group's classes attention heads."""


@rule("attention")
def attention_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """Scaled dot-product attention: the head axis (rank-3) ties q, output and mask heads
    index for index, and k, v heads to query head ``h`` as ``h // (Hq / Hkv)``; leading
    (batch) axes pass through; token and head-dim axes freeze."""
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    mask = node.inputs[3] if len(node.inputs) > 3 else ""
    rank = _rank(graph, port.value)
    if port.value not in (q, k, v, y, mask):
        return frozen(f"{node}: unexpected operand")
    if port.axis >= rank - 2:
        return frozen(f"{node} mixes axis {port.axis} (tokens or head dimension)")
    head_axis = rank - 3
    if port.axis != head_axis:
        return Coupling(links=_batch_links(graph, node, port))
    hq, hkv = graph.shape(q)[head_axis], graph.shape(k)[head_axis]  # type: ignore[index]
    if hq % hkv or graph.shape(v)[head_axis] != hkv:  # type: ignore[index]
        return frozen(f"{node}: {hq} query heads do not group over {hkv} key/value heads")
    group = np.arange(hq) // (hq // hkv)
    links = [Link(Port(q, head_axis), Port(y, head_axis)), Link(Port(q, head_axis), Port(k, head_axis), group),
             Link(Port(k, head_axis), Port(v, head_axis))]
    mshape = graph.shape(mask) if mask else None
    if mshape is not None and len(mshape) >= 3 and mshape[len(mshape) - 3] == hq:
        links.append(Link(Port(q, head_axis), Port(mask, len(mshape) - 3)))
    return Coupling(links=links)


def _batch_links(graph: Graph, node: Node, port: Port) -> list[Link]:
    """Identity links between equal-size leading axes, right-aligned against the output
    (the broadcast batch axes of a batched matrix product)."""
    y = node.outputs[0]
    ry = _rank(graph, y)
    out_axis = port.axis + ry - _rank(graph, port.value)
    size = graph.shape(port.value)[port.axis]  # type: ignore[index]
    links = []
    for v in [*node.inputs, y]:
        shape = graph.shape(v)
        if not v or v == port.value or shape is None:
            continue
        axis = out_axis - (ry - len(shape))
        if 0 <= axis < len(shape) - 2 and shape[axis] == size:
            links.append(Link(port, Port(v, axis)))
    return links


@rule("matmul")
def matmul_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """A product of two activations (rank >= 3): batch axes tie across both operands and
    the result (broadcast axes of size 1 carry nothing); the matrix axes freeze."""
    rank = _rank(graph, port.value)
    if "einsum" in node.attrs:
        return frozen(f"{node} is an einsum (its subscripts are not analysed)")
    if len([v for v in node.inputs if v]) != 2 or rank < 3 or any(_rank(graph, v) < 2 for v in node.inputs):
        return frozen(f"{node} is not a batched product of two tensors")
    if port.axis >= rank - 2:
        return frozen(f"{node} mixes axis {port.axis} (a matrix axis)")
    ry = _rank(graph, node.outputs[0])
    if graph.shape(port.value)[port.axis] != graph.shape(node.outputs[0])[port.axis + ry - rank]:  # type: ignore[index]
        return Coupling()  # a broadcast axis
    return Coupling(links=_batch_links(graph, node, port))


@rule("select", "unbind")
def select_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """``x.select(a, i)`` / ``x.unbind(a)``: the picked axis freezes (which index each
    output is fixed); input axis ``b != a`` is output axis ``b - [b > a]``."""
    x = node.inputs[0]
    rank = _rank(graph, x)
    a = norm_axis(int(node.attrs["axis"]), rank)
    outs = [v for v in node.outputs if v]
    if port.value == x:
        if port.axis == a:
            return frozen(f"{node} picks single indices of axis {a}")
        return Coupling(links=[Link(port, Port(v, port.axis - (port.axis > a))) for v in outs])
    in_axis = port.axis + (port.axis >= a)
    return Coupling(links=[Link(port, Port(x, in_axis))])


@rule("shape")
def shape_rule(graph: Graph, node: Node, port: Port) -> Coupling:
    """``Shape(x)`` reads sizes, not values: an axis of ``x`` whose size no use of the
    result picks (a slice or single-index pick of other positions; the head-dim lookup
    of an exported ``1 / sqrt(d)``) carries nothing through it; any other use freezes."""
    x, y = node.inputs[0], node.outputs[0]
    if port.value != x:
        return frozen(f"{node}: a shape is not a channel tensor")
    position = port.axis - int(node.attrs.get("start", 0))
    for use in graph.consumers(y):
        if use.kind == "reshape" and use.attrs.get("shape_of") == x:
            continue  # the reshape takes x's whole (pruned) shape; its own rule ties the channels
        if use.kind == "select" and int(use.attrs.get("index", -1)) != position:
            continue
        bounds = use.attrs.get("ranges", {}).get(0) if use.kind == "slice" else None
        if bounds is not None and int(bounds[2]) == 1 and not bounds[0] <= position < bounds[1]:
            continue
        return frozen(f"{node}: `{use.label or use.name}` reads the size of axis {port.axis}")
    return Coupling()

