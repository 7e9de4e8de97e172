"""Channel-coupling analysis: one walker applies the channel rules and builds the
coupling graph; its connected pieces are the pruning groups.

The walk starts at the output channel axis of every weighted producer (conv, linear)
and follows the rules' links to every port they reach.  Ports are the nodes of a
``networkx`` graph whose edges are the links; each connected component is a
:class:`PruningGroup`.  Within a group the links' index maps tie individual channels
together: channels tied directly or transitively form one *channel class*, the unit that
is kept or removed as a whole (a residual stream's channel ``c`` across all the blocks
it joins; a depthwise conv's input channel with its filters; a grouped conv's group).

A class is frozen when any of its ports is frozen (an op without a rule, a model input
or output, a normalisation over the channel axis, a parameter shared by two nodes,
an ``ignore``-d layer); it is prunable when it is not frozen and owns at least one
produced parameter slice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import numpy as np

from . import attention_rules, reshape_rules  # noqa: F401  (they register their rules)
from .graph import Graph, Node, Port
from .profile import stage
from .names import resolve_names
from .rules import Coupling, couple, seed_ports

logger = logging.getLogger(__name__)


@dataclass
class Member:
    """One node's view of one port of a group."""

    node: Node
    port: Port
    coupling: Coupling


@dataclass
class PruningGroup:
    """A connected piece of the coupling graph, with its channel classes."""

    id: int
    ports: list[Port]
    sizes: dict[Port, int]
    members: dict[Port, list[Member]]
    class_of: dict[Port, np.ndarray]
    n_classes: int
    frozen: np.ndarray  # bool per class
    reasons: dict[Port, str]
    producing: np.ndarray  # bool per class: owns a produced parameter slice

    @property
    def prunable(self) -> np.ndarray:
        return ~self.frozen & self.producing

    def nodes(self) -> list[Node]:
        seen: dict[str, Node] = {}
        for members in self.members.values():
            for m in members:
                seen.setdefault(m.node.name, m.node)
        return list(seen.values())

    @property
    def heads(self) -> bool:
        """Are the classes attention heads (the group crosses an attention op or a batched
        product on an unfrozen head axis; see :mod:`graphprune.attention_rules`)?"""
        return any(m.node.kind in attention_rules.HEAD_KINDS and m.coupling.frozen is None
                   for members in self.members.values() for m in members)

    def describe(self) -> str:
        labels = sorted({m.node.label or m.node.name for ms in self.members.values() for m in ms if m.coupling.slices})
        head = ", ".join(labels[:4]) + (f" (+{len(labels) - 4})" if len(labels) > 4 else "")
        return f"group {self.id}: {self.n_classes} channels, {int(self.prunable.sum())} prunable [{head}]"


@dataclass
class CouplingAnalysis:
    groups: list[PruningGroup]
    graph_nx: nx.Graph = field(repr=False)

    def group_of(self, port: Port) -> PruningGroup | None:
        for g in self.groups:
            if port in g.sizes:
                return g
        return None

    def frozen_reasons(self) -> dict[Port, str]:
        out: dict[Port, str] = {}
        for g in self.groups:
            out.update(g.reasons)
        return out


def analyse(graph: Graph, ignore: Iterable[str] = ()) -> CouplingAnalysis:
    """Walk the channel rules from every weighted producer and build the pruning groups.

    ``ignore`` names nodes (node names, labels, module paths or prefixes, see
    :func:`graphprune.names.resolve_names`) whose channels must stay; a name that
    matches nothing raises :class:`PassOptionError` with close matches.
    """
    with stage("coupling"):
        return _analyse(graph, ignore)


def _analyse(graph: Graph, ignore: Iterable[str]) -> CouplingAnalysis:
    ignored = resolve_names(graph, ignore)
    shared = _shared_params(graph)
    boundary = set(graph.inputs) | set(graph.outputs)
    g = nx.Graph()
    members: dict[Port, list[Member]] = {}
    reasons: dict[Port, str] = {}
    edges: list[tuple[Port, Port, np.ndarray | None]] = []

    queue: list[Port] = [p for node in graph.nodes for p in seed_ports(graph, node)]
    seen: set[Port] = set()
    while queue:
        port = queue.pop()
        if port in seen:
            continue
        seen.add(port)
        g.add_node(port)
        if port.value in boundary:
            reasons.setdefault(port, "model input or output")
        touching = ([graph.producer(port.value)] if graph.producer(port.value) else []) + graph.consumers(port.value)
        members[port] = []
        for node in _unique(touching):
            c = couple(graph, node, port)
            if c.frozen is None and node.name in ignored:
                c.frozen = f"{node} is ignored"
            if c.frozen is None and c.slices and any(node.params.get(r) in shared for r, _ in c.slices):
                key = next(node.params[r] for r, _ in c.slices if node.params.get(r) in shared)
                c.frozen = f"{node} shares parameter `{key}` with {', '.join(shared[key])}"
            members[port].append(Member(node, port, c))
            if c.frozen is not None:
                reasons.setdefault(port, c.frozen)
            for link in c.links:
                edges.append((link.a, link.b, link.map))
                for p in (link.a, link.b):
                    if p not in seen:
                        queue.append(p)
    for a, b, _ in edges:
        g.add_edge(a, b)

    groups = []
    components = sorted(nx.connected_components(g), key=lambda c: min(str(p) for p in c))
    component_of = {p: i for i, comp in enumerate(components) for p in comp}
    edges_of: list[list[tuple[Port, Port, np.ndarray | None]]] = [[] for _ in components]
    for edge in edges:  # each edge once, to the group of its ports (not a scan per group)
        edges_of[component_of[edge[0]]].append(edge)
    for i, comp in enumerate(components):
        ports = sorted(comp, key=lambda p: (p.value, p.axis))
        groups.append(_build_group(graph, i, ports, members, reasons, edges_of[i]))
    logger.debug("coupling analysis: %d groups", len(groups))
    return CouplingAnalysis(groups, g)


def _unique(nodes: list[Node]) -> list[Node]:
    out, names = [], set()
    for n in nodes:
        if n.name not in names:
            names.add(n.name)
            out.append(n)
    return out


def _shared_params(graph: Graph) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for node in graph.nodes:
        for key in node.params.values():
            users.setdefault(key, []).append(node.label or node.name)
    return {k: v for k, v in users.items() if len(v) > 1}


def _build_group(
    graph: Graph,
    gid: int,
    ports: list[Port],
    members: dict[Port, list[Member]],
    reasons: dict[Port, str],
    edges: list[tuple[Port, Port, np.ndarray | None]],
) -> PruningGroup:
    sizes = {p: graph.shape(p.value)[p.axis] for p in ports}  # type: ignore[index]
    base, total = {}, 0
    for p in ports:
        base[p] = total
        total += sizes[p]
    src, dst = [], []
    for a, b, m in edges:  # the group's own edges
        ia = base[a] + np.arange(sizes[a])
        ib = base[b] + (np.arange(sizes[a]) if m is None else np.asarray(m))
        src.append(ia)
        dst.append(ib)
    labels = _union_find(total, np.concatenate(src) if src else np.zeros(0, int), np.concatenate(dst) if dst else np.zeros(0, int))
    _, dense = np.unique(labels, return_inverse=True)
    n_classes = int(dense.max()) + 1 if total else 0
    class_of = {p: dense[base[p] : base[p] + sizes[p]] for p in ports}
    frozen = np.zeros(n_classes, bool)
    producing = np.zeros(n_classes, bool)
    group_reasons = {}
    for p in ports:
        if p in reasons:
            frozen[class_of[p]] = True
            group_reasons[p] = reasons[p]
        if any(m.coupling.role in ("produce", "norm") and m.coupling.slices for m in members.get(p, [])):
            producing[class_of[p]] = True
    return PruningGroup(gid, ports, sizes, {p: members.get(p, []) for p in ports}, class_of, n_classes, frozen, group_reasons, producing)


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` items under edges (a[i], b[i]): the smallest item
    of each component labels it (min-label propagation with pointer jumping)."""
    labels = np.arange(n)
    if len(a) == 0:
        return labels
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        new = labels.copy()
        np.minimum.at(new, la, low)
        np.minimum.at(new, lb, low)
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # pointer jumping: point every item at its label's label
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new
