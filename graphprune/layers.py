"""Choosing the layers a per-layer pass (shrink-kernels, factorize) may rewrite."""
from __future__ import annotations

from collections import Counter
from typing import Collection, Iterator

import numpy as np

from .graph import Graph, Node
from .names import resolve_names


def label(node: Node) -> str:
    """What records and messages call a node: its module path or ONNX name."""
    return node.label or node.name


def candidate_layers(
    graph: Graph,
    kinds: Collection[str],
    ignore: Collection[str],
    skipped: dict[str, str],
    transposed_reason: str,
) -> Iterator[tuple[Node, np.ndarray]]:
    """Yield ``(node, weight)`` for each node of ``kinds`` that may be rewritten alone;
    record in ``skipped`` why a transposed conv, an ignored layer, a layer whose weight
    is not a parameter or one whose weight is shared by several nodes is left alone."""
    ignore = resolve_names(graph, ignore)
    users = Counter(key for node in graph.nodes for key in node.params.values())
    for node in graph.nodes:
        name = label(node)
        if node.kind == "conv_transpose":
            skipped[name] = transposed_reason
            continue
        if node.kind not in kinds:
            continue
        if node.name in ignore:
            skipped[name] = "ignored"
            continue
        w = graph.node_param(node, "weight")
        if w is None:
            skipped[name] = "its weight is not a parameter"
            continue
        if users[node.params["weight"]] > 1:
            skipped[name] = f"its weight `{node.params['weight']}` is shared with other nodes"
            continue
        yield node, w
