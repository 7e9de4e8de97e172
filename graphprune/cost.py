"""Cost model: multiply-accumulates and parameters per node, from shapes.

MACs count the multiply-accumulates of weighted and matrix ops for the example batch:

* conv:            numel(out) * (C_in / groups) * prod(kernel)
* transposed conv: numel(in) * (C_out / groups) * prod(kernel)
* linear / matmul: numel(out) * K (the contracted size)

Everything else (norms, activations, adds) is counted as zero MACs; parameters count
every weight and buffer a node owns.  ``sizes`` overrides let a budget search price a
candidate pruning without rewriting: ``{Port: new_size}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .graph import Graph, Node, Port


@dataclass
class Cost:
    macs: int
    params: int
    per_node: dict[str, tuple[int, int]] = field(default_factory=dict)

    def ratio(self, other: "Cost") -> tuple[float, float]:
        return self.macs / max(other.macs, 1), self.params / max(other.params, 1)


def _shape(graph: Graph, value: str, sizes: Mapping[Port, int]) -> list[int]:
    shape = list(graph.shape(value) or ())
    for axis in range(len(shape)):
        p = Port(value, axis)
        if p in sizes:
            shape[axis] = sizes[p]
    return shape


def node_macs(graph: Graph, node: Node, sizes: Mapping[Port, int] | None = None) -> int:
    """MACs of ``node``, with optional port size overrides."""
    sizes = sizes or {}
    kind = node.kind
    if kind not in ("conv", "conv_transpose", "linear", "matmul") or not node.inputs:
        return 0
    if graph.shape(node.inputs[0]) is None or graph.shape(node.outputs[0]) is None:
        return 0
    x = _shape(graph, node.inputs[0], sizes)
    y = _shape(graph, node.outputs[0], sizes)
    if kind == "conv":
        groups = int(node.attrs.get("groups", 1))
        if groups > 1:  # whole groups are removed: channels per group stay
            cpg = graph.shape(node.inputs[0])[1] // groups  # type: ignore[index]
            return math.prod(y) * cpg * math.prod(node.attrs.get("kernel", (1,)))
        return math.prod(y) * x[1] * math.prod(node.attrs.get("kernel", (1,)))
    if kind == "conv_transpose":
        groups = int(node.attrs.get("groups", 1))
        return math.prod(x) * (y[1] // groups) * math.prod(node.attrs.get("kernel", (1,)))
    return math.prod(y) * x[-1]


def node_params(graph: Graph, node: Node) -> int:
    return sum(int(graph.param(k).size) for k in node.params.values())


def graph_cost(graph: Graph, sizes: Mapping[Port, int] | None = None, with_params: bool = True) -> Cost:
    """Total and per-node MACs and parameters."""
    per_node, macs, params = {}, 0, 0
    seen: set[str] = set()
    for node in graph.nodes:
        m = node_macs(graph, node, sizes)
        p = 0
        if with_params:
            for key in node.params.values():
                if key not in seen:
                    seen.add(key)
                    p += int(graph.param(key).size)
        per_node[node.label or node.name] = (m, p)
        macs += m
        params += p
    return Cost(macs, params, per_node)
