"""Building new ops in a ``torch.fx`` graph: the fx side of :meth:`Graph.replace_node`.

:func:`replace_with_new_nodes` turns a list of :class:`~graphprune.graph.NewNode` records
into ``nn.Conv1d/2d/3d`` and ``nn.Linear`` submodules with ``call_module`` nodes, wires
them in place of an old node and erases it.  The contract (shared with the ONNX
frontend):

* ``inputs`` name existing values (fx node names) or ``"%i"``, the output of the i-th
  new node;
* the last new node's output takes over every use of the old node's output;
* conv attrs ``stride``, ``dilation``, ``groups`` and ``pads`` in ONNX order
  (``begin_1..begin_n, end_1..end_n``); the kernel is implied by the weight
  ``(F, C/groups, k...)``; linear params ``weight`` ``(out, in)`` and ``bias``.

Pads that a conv module cannot express (begin != end on an axis, or negative) become an
``F.pad`` before the conv: the conv keeps ``q = max(0, min(begin, end))`` per axis and the
``F.pad`` adds ``begin - q`` and ``end - q``.  A negative amount crops, because
``F.pad(x, (-a, -b))`` removes ``a`` leading and ``b`` trailing positions, which is exactly
what a negative ONNX pad means.

Naming: a single new node replacing a module that no other node calls takes the old
module's path (``layer1.0.conv1`` stays ``layer1.0.conv1``), so labels survive a rewrite
that only changes a layer's shape; several new nodes get ``<old path>_gp0``,
``<old path>_gp1``, ... beside the old module.  A conv module with a non-zero
``padding_mode`` (reflect, replicate, circular) passes its mode to the new convs: those
paddings commute with the per-column and per-channel maps that the passes build, but
not with an extra ``F.pad``, so that combination is refused.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph import GraphError, NewNode, Node

__all__ = ["replace_with_new_nodes", "build_module", "split_pads", "resolve_input", "to_tensor"]

logger = logging.getLogger(__name__)

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def to_tensor(value: np.ndarray | torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached tensor from an array or tensor: a numpy array's memory is shared (copied
    when numpy marks it read-only), then moved to ``device`` and cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        array = np.asarray(value)
        if not array.flags.writeable:
            array = array.copy()
        t = torch.from_numpy(array)
    if device is not None and t.device != device:
        t = t.to(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def split_pads(pads: Sequence[int]) -> tuple[tuple[int, ...], list[int] | None]:
    """Split ONNX-order pads into a symmetric, non-negative conv padding and the rest.

    Returns ``(padding, extra)``: ``padding[a] = max(0, min(begin_a, end_a))`` and
    ``extra`` the ``F.pad`` list (torch order: last axis first, ``begin, end`` pairs) that
    adds ``begin_a - padding[a]`` and ``end_a - padding[a]``, or ``None`` when nothing is
    left over.
    """
    nd = len(pads) // 2
    begin, end = [int(p) for p in pads[:nd]], [int(p) for p in pads[nd:]]
    padding = tuple(max(0, min(b, e)) for b, e in zip(begin, end))
    extra: list[int] = []
    for a in reversed(range(nd)):
        extra += [begin[a] - padding[a], end[a] - padding[a]]
    return padding, (extra if any(extra) else None)


def build_module(new: NewNode, padding_mode: str = "zeros", device: torch.device | None = None) -> tuple[nn.Module, list[int] | None]:
    """An ``nn.Module`` computing ``new`` (with its exact weights, numpy arrays or
    tensors, placed on ``device``), and the ``F.pad`` list that must run before it
    (``None`` if none)."""
    if new.params.get("weight") is None:
        raise GraphError(f"new {new.kind} node has no weight")
    weight = to_tensor(new.params["weight"], device)
    bias = new.params.get("bias")
    bias = None if bias is None else to_tensor(bias, device, weight.dtype)
    if new.kind == "conv":
        mod, extra = _build_conv(new, weight, bias, padding_mode)
    elif new.kind == "linear":
        if tuple(new.attrs.get("weight_axes", (0, 1))) != (0, 1):
            raise GraphError("new linear nodes take weight (out, in)")
        out_f, in_f = weight.shape
        mod, extra = nn.Linear(int(in_f), int(out_f), bias=bias is not None, device=weight.device, dtype=weight.dtype), None
    else:
        raise GraphError(f"the fx frontend cannot build new `{new.kind}` nodes (conv and linear only)")
    with torch.no_grad():
        mod.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone())
    return mod, extra


def _build_conv(new: NewNode, weight: torch.Tensor, bias: torch.Tensor | None, padding_mode: str) -> tuple[nn.Module, list[int] | None]:
    nd = weight.dim() - 2
    if nd not in _CONV_TYPES:
        raise GraphError(f"cannot build a {nd}-d conv")
    groups = int(new.attrs.get("groups", 1))
    stride = tuple(int(s) for s in new.attrs.get("stride", (1,) * nd))
    dilation = tuple(int(d) for d in new.attrs.get("dilation", (1,) * nd))
    pads = tuple(new.attrs.get("pads", (0,) * (2 * nd)))
    if len(pads) != 2 * nd:
        raise GraphError(f"conv pads {pads} do not match a {nd}-d kernel")
    padding, extra = split_pads(pads)
    if extra is not None and padding_mode != "zeros":
        raise GraphError(f"asymmetric or negative pads {pads} with padding_mode `{padding_mode}`")
    kernel = tuple(int(k) for k in weight.shape[2:])
    cls = _CONV_TYPES[nd]
    mod = cls(
        int(weight.shape[1]) * groups, int(weight.shape[0]), kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias is not None, padding_mode=padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    return mod, extra


def replace_with_new_nodes(frontend: Any, node: Node, new: Sequence[NewNode]) -> list[str]:
    """Replace view node ``node`` in ``frontend.gm`` by the chain ``new`` (see module doc);
    the module paths of the new layers, in order.

    The graph is edited in place; the caller commits (recompile and shape propagation).
    """
    if not new:
        raise GraphError(f"{node}: replace_node needs at least one new node")
    gm = frontend.gm
    old = frontend._fx_node(node)
    by_name = {n.name: n for n in gm.graph.nodes}
    old_path = str(old.target) if old.op == "call_module" else ""
    padding_mode = _padding_mode(gm, old_path)
    reuse = len(new) == 1 and bool(old_path) and _calls_of(gm, old_path) == 1
    created: list[fx.Node] = []
    with gm.graph.inserting_before(old):
        for i, spec in enumerate(new):
            x = resolve_input(spec, i, created, by_name, node)
            module, extra = build_module(spec, padding_mode if spec.kind == "conv" else "zeros", frontend._device())
            if reuse:
                gm.delete_submodule(old_path)
                path = old_path
            else:
                path = _fresh_path(gm, old_path or node.name.replace(".", "_"), i)
            gm.add_submodule(path, module)
            if extra is not None:
                x = gm.graph.call_function(F.pad, (x, extra))
            created.append(gm.graph.call_module(path, (x,)))
    old.replace_all_uses_with(created[-1])
    gm.graph.erase_node(old)
    if old_path and not reuse and _calls_of(gm, old_path) == 0:
        gm.delete_submodule(old_path)
    logger.debug("fx: replaced %s by %s", node, ", ".join(str(n.target) for n in created))
    return [str(n.target) for n in created]


def resolve_input(spec: NewNode, i: int, created: list[fx.Node], by_name: dict[str, fx.Node], node: Node) -> fx.Node:
    """The fx node feeding new node ``i``: an existing value or ``%j`` (j < i)."""
    if len(spec.inputs) != 1:
        raise GraphError(f"{node}: new {spec.kind} nodes take exactly one input, got {spec.inputs}")
    name = spec.inputs[0]
    if name.startswith("%"):
        j = int(name[1:])
        if not 0 <= j < i:
            raise GraphError(f"{node}: new node {i} reads `{name}`, which is not an earlier new node")
        return created[j]
    if name not in by_name:
        raise GraphError(f"{node}: new node {i} reads `{name}`, which is not a value of the graph")
    return by_name[name]


def _calls_of(gm: fx.GraphModule, path: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == path)


def _padding_mode(gm: fx.GraphModule, path: str) -> str:
    if not path:
        return "zeros"
    mod: Any = gm.get_submodule(path)
    return str(getattr(mod, "padding_mode", "zeros"))


def _fresh_path(gm: fx.GraphModule, base: str, i: int) -> str:
    """``<base>_gp<i>``, with a numeric suffix if that path is taken."""
    parent, _, leaf = base.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    name, n = f"{leaf}_gp{i}", 0
    while hasattr(owner, name):
        n += 1
        name = f"{leaf}_gp{i}_{n}"
    return f"{parent}.{name}" if parent else name
