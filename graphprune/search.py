"""Incremental MAC counting for budget searches.

A budget search (``prune-channels{macs=m}``: bisect on how many channel classes to
remove) prices many candidate prunings of one graph.  Re-costing the whole graph per
candidate walks every node and its shapes; but a channel pruning changes only the sizes
of the ports of its pruning groups, and every weighted op's MACs are a product of port
sizes (:mod:`graphprune.cost`):

* conv:            ``prod(y) * x[1] * prod(k)``  (grouped: ``prod(y) * C_in/g * prod(k)``)
* transposed conv: ``prod(x) * y[1] * prod(k)``  (ungrouped)
* linear / matmul: ``prod(y) * x[-1]``

so with ``s_p`` the current and ``s0_p`` the original size of port ``p``, a node's MACs
are ``macs0 * prod_p s_p / prod_p s0_p`` over the pruned ports among its factors (the
division is exact: those sizes are factors of ``macs0``).  :class:`MacCounter` keeps one
such term per node that touches a pruned port and, for a new assignment of port sizes,
recomputes only the terms of the ports whose size changed: the cost of pricing a
candidate is a scan of the pruned ports' sizes plus the terms that changed, not a walk
over the graph's nodes and shapes.  Nodes whose MACs are not
such a product (a grouped transposed conv, attention) are re-costed with
:func:`graphprune.cost.node_macs` when one of their ports changes.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

from .cost import node_macs
from .graph import Graph, Node, Port

__all__ = ["MacCounter", "mac_factors"]


def mac_factors(graph: Graph, node: Node) -> list[Port] | None:
    """The ports whose sizes multiply into ``node``'s MACs (see the module docstring), or
    None when its MACs are not a product of port sizes."""
    x, y = node.inputs[0], node.outputs[0]
    xs, ys = graph.shape(x), graph.shape(y)
    if xs is None or ys is None:
        return None
    every_y = [Port(y, a) for a in range(len(ys))]
    groups = int(node.attrs.get("groups", 1))
    if node.kind == "conv":
        return every_y + ([Port(x, 1)] if groups == 1 else [])
    if node.kind == "conv_transpose":
        return [Port(x, a) for a in range(len(xs))] + [Port(y, 1)] if groups == 1 else None
    if node.kind in ("linear", "matmul"):
        return every_y + [Port(x, len(xs) - 1)]
    return None  # attention and anything else: re-costed by node_macs


class MacCounter:
    """Total MACs of ``graph`` with the sizes of ``ports`` changed, updated by deltas."""

    def __init__(self, graph: Graph, ports: Iterable[Port]) -> None:
        self.graph = graph
        self.original: dict[Port, int] = {}
        for p in ports:
            shape = graph.shape(p.value)
            if shape is not None:
                self.original[p] = int(shape[p.axis])
        self.sizes = dict(self.original)
        self._nodes: list[Node] = []
        self._factors: list[list[Port] | None] = []
        self._unit: list[int] = []           # macs0 / prod(original sizes of the pruned factors)
        self._value: list[int] = []          # current MACs of each term
        self._users: dict[Port, list[int]] = {}
        self.total = 0
        for node in graph.nodes:
            macs = node_macs(graph, node)
            self.total += macs
            if not macs:
                continue
            self._add_term(node, macs)

    def _add_term(self, node: Node, macs: int) -> None:
        factors = mac_factors(self.graph, node)
        touched = [p for p in (factors if factors is not None else self._ports_of(node)) if p in self.original]
        if not touched:
            return
        i = len(self._nodes)
        self._nodes.append(node)
        self._factors.append(None if factors is None else touched)
        self._unit.append(0 if factors is None else macs // math.prod(self.original[p] for p in touched))
        self._value.append(macs)
        for p in touched:
            self._users.setdefault(p, []).append(i)

    def _ports_of(self, node: Node) -> list[Port]:
        ports = []
        for v in (*node.inputs, *node.outputs):
            shape = self.graph.shape(v) if v else None
            ports.extend(Port(v, a) for a in range(len(shape or ())))
        return ports

    def _term(self, i: int) -> int:
        factors = self._factors[i]
        if factors is None:
            return node_macs(self.graph, self._nodes[i], self.sizes)
        return self._unit[i] * math.prod(self.sizes[p] for p in factors)

    def macs(self, sizes: Mapping[Port, int]) -> int:
        """Total MACs with ``sizes`` (port -> size; ports not named keep their original
        size); only the terms of ports whose size differs from the last call are redone."""
        stale: set[int] = set()
        for p, old in self.sizes.items():
            new = sizes.get(p, self.original[p])
            if new != old:
                self.sizes[p] = new
                stale.update(self._users.get(p, ()))
        for i in stale:
            value = self._term(i)
            self.total += value - self._value[i]
            self._value[i] = value
        return self.total
