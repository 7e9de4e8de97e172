"""Prune the user's own model in place: :func:`apply` carries a pruned graph back to the
``nn.Module`` it was captured from.

The graph's parameter keys are the model's qualified names, so most of the work is
setting tensors: every parameter and buffer the passes changed is replaced (a new
``nn.Parameter`` with the same ``requires_grad``), then each module's size attributes are
re-derived (``out_channels``, ``in_features``, ``num_features``, ``groups``, ``padding``,
``kernel_size`` ...).  Structural edits recorded by the export frontend follow:

* a layer replaced by new layers (``factorize``, a ``shrink-kernels`` crop) becomes an
  ``nn.Sequential`` of those layers at the same path;
* a channel gather inserted before a conv or linear (``group-convs``) becomes an index
  buffer ``gp_gather_index`` on that module and a forward pre-hook that applies it.

Sizes that the model's Python code hard-codes (``x.view(b, 256, -1)``, a split size)
cannot be edited from here.  So the edits are first made on a shallow copy of the model
(new module objects sharing unedited tensors), the copy runs on the captured inputs and
is compared with the pruned graph; only if it matches (``max|a-b| / max|b| <= rtol``) is
the real model edited, then checked again.  A mismatch raises :class:`ApplyError` naming
the modules whose code holds a size that the pruned graph changed, and the model is left
untouched; ``result.graph.to_module()`` remains the way out.

Create the optimizer after ``apply``: parameters are new objects.
"""
from __future__ import annotations

import collections
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import Graph, GraphError, NewNode
from .verify import relative_error

__all__ = ["apply", "ApplyError"]

logger = logging.getLogger(__name__)


class ApplyError(GraphError):
    """The pruned graph cannot be carried back to the model in place (nothing was edited)."""


@dataclass
class _Plan:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> new value
    conv_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # module path -> attrs
    norm_groups: dict[str, int] = field(default_factory=dict)
    replacements: dict[str, nn.Module] = field(default_factory=dict)  # module path -> new module
    gathers: list[tuple[str, str, int, torch.Tensor]] = field(default_factory=list)  # (path, input|output, axis, index)
    literals: list[Any] = field(default_factory=list)


def apply(result: Any, model: nn.Module, *, rtol: float = 1e-5) -> nn.Module:
    """Edit ``model`` (the module the graph was captured from) in place so that it computes
    what the pruned graph computes; return ``model``.  ``result`` is a
    :class:`~graphprune.PipelineResult`, a :class:`~graphprune.PassResult` or a
    :class:`~graphprune.Graph`.  Raises :class:`ApplyError`, with ``model`` untouched,
    when the model's code holds a size the edit would have to change."""
    graph: Graph = result if isinstance(result, Graph) else result.graph
    frontend = graph.frontend
    if frontend.name not in ("export", "fx"):
        raise ApplyError(f"apply needs a graph captured from a PyTorch model, not the {frontend.name} frontend")
    plan = _plan(graph, model)
    trial = _tree_copy(model)
    _check(_edit(trial, plan), graph, plan, rtol, "a trial copy of the model")
    _edit(model, plan)
    _check(model, graph, plan, rtol, "the edited model")
    logger.info("apply: %d tensors, %d layers replaced, %d gathers", len(plan.tensors), len(plan.replacements), len(plan.gathers))
    return model


# ------------------------------------------------------------------ planning
def _plan(graph: Graph, model: nn.Module) -> _Plan:
    plan = _Plan()
    fe: Any = graph.frontend
    edits = list(getattr(fe, "edits", []))
    replaced = {e.module for e in edits if e.kind == "replace" and len(e.details["new"]) > 1}
    for node in graph.nodes:
        for key in node.params.values():
            value = fe.get_tensor(key)
            own = _model_tensor(model, key)
            if own is not None:
                if own is not value and (own.shape != value.shape or not torch.equal(own.detach(), value)):
                    plan.tensors[key] = value
            elif _created_in_forward(key):
                continue  # a tensor the model's forward makes itself; the trial run checks it
            elif not any(key.startswith(r + "_gp") for r in replaced) and not key.startswith("gp_gather_"):
                raise ApplyError(f"{node}: parameter `{key}` is not in the model (was the graph captured from it?)")
        _plan_attrs(plan, graph, node, model)
    for e in edits:
        if e.kind == "replace" and len(e.details["new"]) > 1:
            plan.replacements[e.module] = _replacement(graph, e, model)
        elif e.kind == "literal":
            plan.literals.append(e)
    _plan_gathers(plan, graph, model)
    return plan


def _model_tensor(model: nn.Module, key: str) -> torch.Tensor | None:
    """The model's tensor at qualified name ``key``: a parameter, a buffer or a plain
    tensor attribute (which export captures as a constant)."""
    path, _, attr = key.rpartition(".")
    owner = _get(model, path)
    value = getattr(owner, attr, None) if owner is not None else None
    return value if isinstance(value, torch.Tensor) else None


def _created_in_forward(key: str) -> bool:
    """Constants that torch.export lifts out of ``forward`` (``lifted_tensor_0``,
    ``_tensor_constant0``): the model's code creates them on every call."""
    return "." not in key and key.startswith(("lifted_tensor_", "_tensor_constant", "c_lifted_tensor_"))


def _plan_attrs(plan: _Plan, graph: Graph, node: Any, model: nn.Module) -> None:
    """Conv groups/stride/padding and group-norm groups, read off the graph's node."""
    if node.kind not in ("conv", "groupnorm") or "weight" not in node.params:
        return
    path = node.params["weight"].rpartition(".")[0]
    mod = _get(model, path)
    if mod is None:
        return
    if node.kind == "groupnorm":
        if isinstance(mod, nn.GroupNorm) and mod.num_groups != node.attrs["num_groups"]:
            plan.norm_groups[path] = int(node.attrs["num_groups"])
        return
    if isinstance(mod, nn.modules.conv._ConvNd):
        pads = tuple(node.attrs["pads"])
        nd = len(pads) // 2
        if pads[:nd] != pads[nd:] and not isinstance(mod.padding, str):
            raise ApplyError(f"conv `{path}`: asymmetric pads {pads} after the rewrite; use result.graph.to_module()")
        attrs = {"groups": int(node.attrs["groups"]), "stride": tuple(node.attrs["stride"]),
                 "dilation": tuple(node.attrs["dilation"]), "padding": tuple(pads[:nd])}
        current = {"groups": mod.groups, "stride": tuple(mod.stride), "dilation": tuple(mod.dilation),
                   "padding": mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)}
        if any(attrs[k] != current[k] for k in attrs):
            plan.conv_attrs[path] = attrs


def _replacement(graph: Graph, edit: Any, model: nn.Module) -> nn.Module:
    """An ``nn.Sequential`` computing the chain of new layers that replaced ``edit.module``."""
    from .frontends.fx_build import build_module

    if not isinstance(_get(model, edit.module), (nn.modules.conv._ConvNd, nn.Linear)):
        raise ApplyError(f"`{edit.module}` was replaced by {len(edit.details['new'])} layers but is not a conv or linear module")
    layers: list[nn.Module] = []
    for i, ((kind, attrs, keys), inputs) in enumerate(zip(edit.details["new"], edit.details["inputs"])):
        if i > 0 and inputs != [f"%{i - 1}"]:
            raise ApplyError(f"`{edit.module}`: the new layers do not form a chain")
        try:
            params = {role: graph.param(key) for role, key in keys.items()}
        except Exception:
            raise ApplyError(f"`{edit.module}`: a later pass removed its replacement layers") from None
        mod, extra = build_module(NewNode(kind, [], attrs, params), device=graph.frontend._device())
        if extra is not None:
            layers.append(_Pad(extra))
        layers.append(mod)
    return nn.Sequential(*layers)


def _plan_gathers(plan: _Plan, graph: Graph, model: nn.Module) -> None:
    """Gathers the passes inserted (index buffers ``gp_gather_<n>.index``).  A gather that
    every use of a layer's output goes through becomes a forward hook on that layer;
    otherwise each consumer must be a conv or linear, which reindexes its own input."""
    for node in graph.nodes:
        src = graph.producer(node.inputs[1]) if node.kind == "gather" and len(node.inputs) > 1 else None
        if src is None or src.kind != "constant" or not src.params.get("value", "").startswith("gp_gather_"):
            continue  # not a gather of graphprune's
        index, axis = graph.frontend.get_tensor(src.params["value"]), int(node.attrs["axis"])
        producer = graph.producer(node.inputs[0])
        path = _layer_path(producer)
        if len(graph.consumers(node.inputs[0])) == 1 and path is not None and _get(model, path) is not None:
            plan.gathers.append((path, "output", axis, index))
            continue
        for consumer in graph.consumers(node.outputs[0]):
            path = _layer_path(consumer)
            if consumer.kind not in ("conv", "linear") or path is None or _get(model, path) is None:
                raise ApplyError(f"a channel gather feeds {consumer}, which is not a conv or linear module of the model")
            plan.gathers.append((path, "input", axis, index))


def _layer_path(node: Any) -> str | None:
    if node is None or "weight" not in node.params:
        return None
    return node.params["weight"].rpartition(".")[0]


# ------------------------------------------------------------------- editing
def _edit(model: nn.Module, plan: _Plan) -> nn.Module:
    for key, value in plan.tensors.items():
        owner_path, _, attr = key.rpartition(".")
        owner = _get(model, owner_path)
        if owner is None:
            continue
        old = getattr(owner, attr)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = value.detach().clone()
    for path, attrs in plan.conv_attrs.items():
        mod = _get(model, path)
        mod.groups, mod.stride, mod.dilation = attrs["groups"], attrs["stride"], attrs["dilation"]
        if not isinstance(mod.padding, str):
            mod.padding = attrs["padding"]
            mod._reversed_padding_repeated_twice = [p for p in reversed(attrs["padding"]) for _ in range(2)]
    for path, groups in plan.norm_groups.items():
        _get(model, path).num_groups = groups
    touched = {k.rpartition(".")[0] for k in plan.tensors}
    for path in touched:
        mod = _get(model, path)
        if mod is not None:
            _sync(mod)
    for path, new in plan.replacements.items():
        _set_module(model, path, copy.deepcopy(new))
    for path, where, axis, index in plan.gathers:
        _attach_gather(_get(model, path), where, axis, index)
    return model


def _sync(mod: nn.Module) -> None:
    from .frontends.fx import _sync_module_metadata

    _sync_module_metadata(mod)


def _attach_gather(mod: nn.Module, where: str, axis: int, index: torch.Tensor) -> None:
    """Reindex the module's input (pre-hook) or output (hook) along ``axis``: the index is
    a buffer ``gp_gather_<where>`` of the module, so it is saved with the weights."""
    name = f"gp_gather_{where}"
    fresh = name not in mod._buffers
    mod.register_buffer(name, index.clone().long())
    if fresh:
        hook = _GatherHook(name, axis)
        if where == "input":
            mod.register_forward_pre_hook(hook)
        else:
            mod.register_forward_hook(hook)


class _GatherHook:
    """``x.index_select(axis, module.<buffer>)`` on a module's first input or its output."""

    def __init__(self, buffer: str, axis: int) -> None:
        self.buffer, self.axis = buffer, axis

    def __call__(self, mod: nn.Module, args: tuple, output: Any = None) -> Any:
        index = mod._buffers[self.buffer]
        if output is None:
            return (args[0].index_select(self.axis, index), *args[1:])
        return output.index_select(self.axis, index)


class _Pad(nn.Module):
    """``F.pad`` with a fixed (torch-order) pad list; negative entries crop."""

    def __init__(self, pads: list[int]) -> None:
        super().__init__()
        self.pads = list(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads)

    def extra_repr(self) -> str:
        return f"pads={self.pads}"


# ------------------------------------------------------------------ checking
def _check(model: nn.Module, graph: Graph, plan: _Plan, rtol: float, what: str) -> None:
    from .frontends.fx import _flatten_tensors
    from .frontends.fx_build import to_tensor

    inputs = [to_tensor(x, graph.frontend._device()) for x in graph.random_inputs(0)]
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            got = _flatten_tensors(model(*inputs))
        want = graph.run(*inputs)
        err = relative_error(got, want)
    except Exception as exc:
        raise ApplyError(_refusal(plan, f"{what} fails to run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")) from exc
    finally:
        for m, t in was_training.items():
            m.training = t
    if not err <= rtol:
        raise ApplyError(_refusal(plan, f"{what} differs from the pruned graph by {err:.3g} (tolerance {rtol:g})"))


def _refusal(plan: _Plan, problem: str) -> str:
    lines = [f"cannot prune the model in place: {problem}; the model was not edited."]
    for e in plan.literals:
        where = f"module `{e.module}`" if e.module else f"node `{e.node}`"
        lines.append(f"  {where}: its code sets {e.what} {e.old}; the pruned graph needs {e.new}")
    if plan.literals:
        lines.append("  If that code hard-codes the size, edit it, or use result.graph.to_module() instead.")
    else:
        lines.append("  Use result.graph.to_module() instead.")
    return "\n".join(lines)


# ------------------------------------------------------------------- helpers
def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get(model, parent), leaf, new)


def _tree_copy(module: nn.Module) -> nn.Module:
    """New module objects (hook tables included) that share the original tensors."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._forward_pre_hooks = collections.OrderedDict(module._forward_pre_hooks)
    new._forward_hooks = collections.OrderedDict(module._forward_hooks)
    new._modules = {k: (_tree_copy(v) if v is not None else None) for k, v in module._modules.items()}
    return new
