"""Removing channel classes: the exact rewrite, its projection, and provable zeros.

Given, per pruning group, a boolean ``keep`` per channel class:

* :func:`channel_projection` zeroes, for every removed class, every parameter slice
  the rules attach to its ports (filters, biases, norm scales and shifts, consumer
  columns, constants).  This is the projected reference.
* :func:`remove_channels` deletes those same slices and lets each touched op update
  its attributes (groups, split sizes, reshape sizes).  Because every op on the way is
  per channel (see :mod:`graphprune.rules`), the result equals the projected reference.
* :func:`provably_zero_classes` finds classes whose removal changes nothing: every
  consumer of the class reads a channel that is identically zero in the input model
  (or its column is already zero).
"""
from __future__ import annotations

from typing import Collection, Mapping

import numpy as np

from .coupling import CouplingAnalysis, PruningGroup
from .graph import Graph, Node, Port
from .projection import Projection
from .rules import RESIZES


def kept_indices(group: PruningGroup, keep: np.ndarray) -> dict[Port, np.ndarray]:
    """Per port of ``group``: the indices that survive, for ports that lose any."""
    out = {}
    for port in group.ports:
        mask = keep[group.class_of[port]]
        if not mask.all():
            out[port] = np.nonzero(mask)[0]
    return out


def channel_projection(graph: Graph, analysis: CouplingAnalysis, keep: Mapping[int, np.ndarray]) -> Projection:
    """The projection zeroing every parameter slice of the removed classes."""
    proj = Projection()
    for group in analysis.groups:
        if group.id in keep:
            group_projection(graph, group, keep[group.id], proj)
    return proj


def group_projection(graph: Graph, group: PruningGroup, keep: np.ndarray, proj: Projection | None = None) -> Projection:
    """Add to ``proj`` (or a new projection) the zeroed slices of ``group``'s removed
    classes (``keep`` False): the same slices :func:`remove_channels` deletes."""
    proj = Projection() if proj is None else proj
    for port in group.ports:
        mask = keep[group.class_of[port]]
        if mask.all():
            continue
        removed_list = np.flatnonzero(~mask).tolist()
        for m in group.members[port]:
            for role, axis in m.coupling.slices:
                key = m.node.params[role]
                proj.zero(key, tuple(graph.param(key).shape), axis, removed_list)
    return proj


def reindex_params(
    graph: Graph,
    group: PruningGroup,
    index: Mapping[Port, np.ndarray],
    done: set[tuple[str, int]] | None = None,
    skip: Collection[str] = (),
) -> None:
    """For each port in ``index``, take ``index`` (kept channels, or a permutation) along
    every parameter axis the rules attach to that port.  Each ``(key, axis)`` is taken
    once, so a parameter reached through several ports is not indexed twice."""
    done = set() if done is None else done
    for port, idx in index.items():
        for m in group.members[port]:
            for role, axis in m.coupling.slices:
                key = m.node.params[role]
                if key in skip or (key, axis) in done:
                    continue
                done.add((key, axis))
                graph.slice_param(key, axis, idx)


def remove_channels(graph: Graph, analysis: CouplingAnalysis, keep: Mapping[int, np.ndarray]) -> int:
    """Delete the removed classes from ``graph`` (edited in place, then committed).

    Returns the number of channels removed, summed over ports.
    """
    removed = 0
    done: set[tuple[str, int]] = set()
    touched: dict[str, tuple[Node, dict[Port, np.ndarray]]] = {}
    for group in analysis.groups:
        if group.id not in keep:
            continue
        kept = kept_indices(group, keep[group.id])
        reindex_params(graph, group, kept, done)
        for port, idx in kept.items():
            removed += group.sizes[port] - len(idx)
            for m in group.members[port]:
                touched.setdefault(m.node.name, (m.node, {}))[1][port] = idx
    resized = {}
    for node, kept_by_port in touched.values():
        fn = RESIZES.get(node.kind)
        if fn is not None:
            fn(graph, node, kept_by_port)
        resized.update({port: len(idx) for port, idx in kept_by_port.items()})
    graph.commit(resized)
    return removed


def unread_classes(group: PruningGroup) -> np.ndarray:
    """Prunable classes that no op reads: none of their ports is consumed by a weighted op
    (conv/linear input columns) and none is frozen (an output, an op without a rule).  A
    slice that drops channels leaves them so; removing them changes nothing."""
    read = np.zeros(group.n_classes, bool)
    for port, members in group.members.items():
        if any(m.coupling.role == "consume" for m in members):
            read[group.class_of[port]] = True
    return group.prunable & ~read


# ------------------------------------------------------------ provable zeros
_PASS_ZERO = {"identity", "pool", "pad", "permute", "transpose", "flatten", "reshape", "concat", "split", "reduce"}


def _slice_zero(graph: Graph, node: Node, role: str, axis: int) -> np.ndarray | None:
    t = graph.node_param(node, role)
    if t is None:
        return None
    moved = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
    return (moved == 0).all(1)


def provably_zero_classes(graph: Graph, group: PruningGroup) -> np.ndarray:
    """Classes whose removal leaves the model's function unchanged (see module doc)."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}

    def producer_rank(p: Port) -> int:
        prod = graph.producer(p.value)
        return order[prod.name] if prod is not None else -1

    zero: dict[Port, np.ndarray] = {}
    for port in sorted(group.ports, key=producer_rank):
        zero[port] = _port_zero(graph, group, port, zero)

    ok = np.ones(group.n_classes, bool)
    for port, members in group.members.items():
        for m in members:
            if m.coupling.role != "consume":
                continue
            col_zero = np.ones(group.sizes[port], bool)
            for role, axis in m.coupling.slices:
                z = _slice_zero(graph, m.node, role, axis)
                col_zero &= z if z is not None else False
            fine = zero[port] | col_zero
            bad = group.class_of[port][~fine]
            ok[bad] = False
    return ok & group.prunable


def _port_zero(graph: Graph, group: PruningGroup, port: Port, zero: dict[Port, np.ndarray]) -> np.ndarray:
    """Is channel i of ``port`` identically zero in the input model?"""
    size = group.sizes[port]
    node = graph.producer(port.value)
    none = np.zeros(size, bool)
    if node is None:
        return none
    coupling = next((m.coupling for m in group.members[port] if m.node.name == node.name), None)
    if coupling is None or coupling.frozen:
        return none
    if coupling.role in ("produce", "norm"):
        z = np.ones(size, bool)
        roles = [r for r, _ in coupling.slices if r in ("weight", "bias", "value")]
        if coupling.role == "norm" and not {"weight", "bias"} <= set(roles):
            return none
        for role, axis in coupling.slices:
            if role in ("weight", "bias", "value"):
                sz = _slice_zero(graph, node, role, axis)
                z &= sz if sz is not None else False
        return z
    inputs = _linked_inputs(group, node, port, zero)
    kind = node.kind
    if kind == "act" and not node.attrs.get("zero_preserving", False):
        return none
    if not inputs:
        return none
    states = np.stack([s for s, _ in inputs])
    covered = np.stack([c for _, c in inputs])
    if kind in _PASS_ZERO or kind in ("act", "add", "sub"):
        if kind in ("add", "sub"):
            tied = len({v for v in node.inputs if v})
            if len(inputs) < tied or node.attrs.get("scalar") not in (None, 0.0):
                return none
        return (states | ~covered).all(0) & covered.any(0)
    if kind == "mul":
        return (states & covered).any(0) | (node.attrs.get("scalar") == 0.0)
    return none


def _linked_inputs(group: PruningGroup, node: Node, port: Port, zero: dict[Port, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zero state of each input operand mapped onto ``port``'s indices, with the
    indices that operand covers (a concat input covers only its slice)."""
    out = []
    for in_port, members in group.members.items():
        if in_port.value not in node.inputs or in_port not in zero or in_port == port:
            continue
        if node.kind == "div" and node.inputs.index(in_port.value) != 0:
            continue
        for m in members:
            if m.node.name != node.name:
                continue
            for link in m.coupling.links:
                mapped = _map_state(link, in_port, port, zero[in_port], group.sizes[port])
                if mapped is not None:
                    out.append(mapped)
    return out


def _map_state(link, src: Port, dst: Port, state: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Carry a per-index state across one link from ``src`` to ``dst``."""
    if link.a == src and link.b == dst:
        if link.map is None:
            return state.copy(), np.ones(size, bool)
        res = np.ones(size, bool)
        covered = np.zeros(size, bool)
        np.logical_and.at(res, link.map, state)
        covered[link.map] = True
        return res & covered, covered
    if link.a == dst and link.b == src:
        if link.map is None:
            return state.copy(), np.ones(size, bool)
        return state[link.map], np.ones(size, bool)
    return None
