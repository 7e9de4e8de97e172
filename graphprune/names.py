"""Layer names as users write them: ``ignore=`` options resolved to graph nodes.

A name matches a node when it is the node's name or label, its *module path*, or a
module prefix of it (``layer1`` matches every node of ``layer1.0.conv1``).  The module
path of an fx/export node is its label (``layer1.0.conv1``); an ONNX node exported by
PyTorch's TorchScript exporter is named by its scopes and op type
(``/layer1/layer1.0/conv1/Conv``), whose module path is the scopes joined with dots,
a scope that repeats its parent's path replacing it (``layer1.0.conv1``; ``/fc/Gemm``
is ``fc``).

A name that matches no node is an error listing the closest names
(:func:`difflib.get_close_matches`): a typo must not silently prune a layer the user
meant to keep.
"""
from __future__ import annotations

import difflib
from typing import Collection, Iterable

from .errors import PassOptionError
from .graph import Graph, Node

__all__ = ["module_path", "resolve_names"]


def module_path(name: str) -> str | None:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``; None when ``name`` is not
    a scoped ONNX name (no leading ``/`` or no scope before the op)."""
    if not name.startswith("/"):
        return None
    scopes = [s for s in name.split("/")[1:-1] if s]
    if not scopes:
        return None
    path = ""
    for scope in scopes:
        path = scope if not path or scope.startswith(path + ".") else f"{path}.{scope}"
    return path


def _names_of(node: Node) -> set[str]:
    out = {node.name}
    if node.label:
        out.add(node.label)
    for n in (node.name, node.label):
        path = module_path(n) if n else None
        if path:
            out.add(path)
    return out


def resolve_names(graph: Graph, names: Iterable[str], what: str = "ignore") -> set[str]:
    """The node names matched by ``names`` (see the module doc); raise
    :class:`PassOptionError` for a name that matches nothing, with close matches."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return set()
    known = {n.name: _names_of(n) for n in graph.nodes}
    matched: set[str] = set()
    for name in wanted:
        hits = {node for node, aliases in known.items()
                if name in aliases or any(a.startswith(name + ".") for a in aliases if not a.startswith("/"))}
        if not hits:
            raise PassOptionError(_unknown(name, {a for aliases in known.values() for a in aliases}, what))
        matched |= hits
    return matched


def _unknown(name: str, candidates: Collection[str], what: str) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else "; see `graphprune inspect` for the layer names"
    return f"{what}: `{name}` names no layer of this model{hint}"
