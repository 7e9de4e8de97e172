"""The torch.fx frontend: capture a PyTorch model and expose it as a :class:`Graph`.

Capture is ``torch.fx`` symbolic tracing (of a deep copy, so the caller's model is never
edited) plus shape propagation on the example inputs, both in eval mode.  Every fx node
that produces a tensor becomes a view node with a canonical kind; ``getitem`` nodes that
unpack a tuple (``split``, ``chunk``, attention outputs) are folded into their producer's
``outputs``; nodes that compute Python values (``x.size(0)``) are not part of the view.

Parameters are addressed by their qualified names (``layer1.0.conv1.weight``), which are
also the names in the original model, so a projection decided on the graph can be
applied to the original module for fine-tuning.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..arrays import as_numpy
from ..graph import Graph, GraphError, NewNode, Node, Port, ValueInfo
from ..profile import stage
from .fx_build import to_tensor
from .fx_shapes import ShapeOnlyProp, values_decide_shapes


class CaptureError(GraphError):
    """The model could not be traced; the message names the construct and the remedy."""


@dataclass
class Edit:
    """One edit of a captured (export or fx) graph that the model's Python code would have to repeat.

    ``kind`` is ``literal`` (a size in a reshape/split the code computes or hard-codes),
    ``replace`` (a layer replaced by new layers) or ``gather`` (a channel gather inserted).
    ``module`` is the model's module whose ``forward`` holds the op.
    """

    kind: str
    node: str
    module: str
    what: str
    old: Any = None
    new: Any = None
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ op tables
_ACTIVATION_MODULES: dict[type, tuple[str, bool]] = {
    # module type -> (function name, f(0) == 0)
    nn.ReLU: ("relu", True), nn.ReLU6: ("relu6", True), nn.GELU: ("gelu", True),
    nn.SiLU: ("silu", True), nn.Hardswish: ("hardswish", True), nn.Mish: ("mish", True),
    nn.Tanh: ("tanh", True), nn.LeakyReLU: ("leaky_relu", True), nn.ELU: ("elu", True),
    nn.Hardtanh: ("hardtanh", True), nn.SELU: ("selu", True), nn.CELU: ("celu", True),
    nn.Softsign: ("softsign", True), nn.Tanhshrink: ("tanhshrink", True),
    nn.Sigmoid: ("sigmoid", False), nn.Hardsigmoid: ("hardsigmoid", False),
    nn.Softplus: ("softplus", False),
}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_ACTIVATION_FUNCTIONS: dict[Any, tuple[str, bool]] = {
    F.relu: ("relu", True), torch.relu: ("relu", True), F.relu6: ("relu6", True),
    F.gelu: ("gelu", True), F.silu: ("silu", True), F.hardswish: ("hardswish", True),
    F.mish: ("mish", True), torch.tanh: ("tanh", True), F.tanh: ("tanh", True),
    F.leaky_relu: ("leaky_relu", True), F.elu: ("elu", True), F.hardtanh: ("hardtanh", True),
    torch.sigmoid: ("sigmoid", False), F.sigmoid: ("sigmoid", False),
    F.hardsigmoid: ("hardsigmoid", False), F.softplus: ("softplus", False),
    torch.exp: ("exp", False), F.relu_: ("relu", True),
}
_ACTIVATION_METHODS: dict[str, tuple[str, bool]] = {
    "relu": ("relu", True), "relu_": ("relu", True), "sigmoid": ("sigmoid", False),
    "tanh": ("tanh", True), "exp": ("exp", False),
}
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, torch.clone}
# wrapped (fx.wrap) library functions that scale each sample by one value: per channel
_IDENTITY_FUNCTION_NAMES = {"stochastic_depth"}
_IDENTITY_METHODS = {"contiguous", "clone", "float", "to", "type_as", "detach"}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.interpolate, F.upsample,
}
_BINARY_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", operator.itruediv: "div",
}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div"}


def _module_path(node: fx.Node) -> str:
    return str(node.target)


def _is_tensor_meta(meta: Any) -> bool:
    return isinstance(meta, TensorMetadata)


class _GraphpruneTracer(fx.Tracer):
    """A tracer with user-chosen leaf modules (by type or qualified name)."""

    def __init__(self, leaf_modules: Sequence[type | str] = ()) -> None:
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.current_path = ""
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        previous = self.current_path
        self.current_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module whose forward failed
                self.failed_path = self.current_path
            raise
        finally:
            self.current_path = previous


def trace_fx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Graph:
    """Capture ``model`` with torch.fx symbolic tracing (plus shape propagation).

    The model is deep-copied first, so passes never touch the caller's weights. Tracing
    and shape propagation run in eval mode. ``leaf_modules`` (types or qualified names)
    are kept as opaque calls; ``concrete_args`` fixes Python-valued arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = [t.detach() for t in example_inputs]
    work = _shallow_tree(model)  # never edits the caller's modules or tensors
    work.eval()
    tracer = _GraphpruneTracer(leaf_modules)
    try:
        with stage("capture"):
            graph = tracer.trace(work, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError...
        path = tracer.failed_path or ""
        where = path or type(model).__name__
        module = work.get_submodule(path) if path else work
        raise CaptureError(
            f"cannot trace `{where}` ({type(module).__name__}): {exc}. "
            f"Mark it as a leaf (leaf_modules=[{type(module).__name__}] or ['{where}']) "
            "or fix its Python-valued arguments with concrete_args."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return Graph(FxFrontend(gm, inputs, original_training=model.training))


class FxFrontend:
    """Reads and edits a ``torch.fx.GraphModule``."""

    name = "fx"
    shape_polymorphic = True
    """The graph is the model's own code: sizes it reads from tensors follow the input."""
    copy_keeps_view = True
    """:meth:`copy` keeps every node's name: its view is this one's until an edit."""
    keeps_strides = True
    """A numpy input runs as a tensor with its strides (a channels-last array runs channels-last)."""

    def __init__(
        self, gm: fx.GraphModule, inputs: list[torch.Tensor], original_training: bool = False, propagate: bool = True,
        edits: list[Edit] | None = None,
    ) -> None:
        self.gm = gm
        self.edits: list[Edit] = list(edits or [])  # structural edits, for graphprune.apply
        self._graph_edited = False  # the fx graph changed since its code was generated
        self._inputs = inputs
        self.original_training = original_training
        if propagate:
            self._propagate()

    # --------------------------------------------------------------- analysis
    def _propagate(self) -> None:
        _ensure_eval(self.gm)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self._inputs):
            raise CaptureError(
                f"the traced graph takes {len(placeholders)} inputs "
                f"({', '.join(p.name for p in placeholders)}) but {len(self._inputs)} example inputs were given"
            )
        try:
            with torch.no_grad(), stage("shapes"):
                prop = ShapeProp if values_decide_shapes(self.gm) else ShapeOnlyProp
                prop(self.gm).propagate(*self._inputs)
        except Exception as exc:
            raise CaptureError(f"shape propagation failed: {exc}") from exc

    def example_inputs(self) -> list[torch.Tensor]:
        return list(self._inputs)

    def view(self) -> tuple[list[Node], dict[str, ValueInfo], list[str], list[str]]:
        values: dict[str, ValueInfo] = {}
        nodes: list[Node] = []
        inputs: list[str] = []
        outputs: list[str] = []
        fx_nodes = list(self.gm.graph.nodes)
        for n in fx_nodes:
            meta = n.meta.get("tensor_meta")
            if _is_tensor_meta(meta):
                values[n.name] = ValueInfo(n.name, tuple(int(s) for s in meta.shape), str(meta.dtype))
        self._begin_view(fx_nodes)
        for n in fx_nodes:
            if n.op == "placeholder":
                if n.name in values:
                    inputs.append(n.name)
                continue
            if n.op == "output":
                outputs = [a.name for a in _flatten_nodes(n.args) if a.name in values]
                continue
            if n.op == "call_function" and n.target is operator.getitem and _tuple_source(n) is not None:
                continue  # folded into the producer's outputs
            view_node = self._classify(n, values)
            if view_node is not None:
                nodes.append(view_node)
        return nodes, values, inputs, outputs

    def _begin_view(self, fx_nodes: list[fx.Node]) -> None:
        """Hook run before classification (the export frontend classifies aten ops here)."""

    def _tensor_inputs(self, n: fx.Node, values: dict[str, ValueInfo]) -> list[str]:
        return [a.name for a in _flatten_nodes((n.args, n.kwargs)) if a.name in values]

    def _outputs(self, n: fx.Node, values: dict[str, ValueInfo]) -> list[str] | None:
        meta = n.meta.get("tensor_meta")
        if _is_tensor_meta(meta):
            return [n.name]
        if isinstance(meta, (tuple, list)) and meta:
            outs = [""] * len(meta)
            extra = False
            for user in n.users:
                if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                    outs[user.args[1]] = user.name
                else:
                    extra = True
            if extra:  # the tuple itself escapes: expose it as an unanalysable value
                values[n.name] = ValueInfo(n.name, None)
                outs.append(n.name)
            return outs
        return None

    def _classify(self, n: fx.Node, values: dict[str, ValueInfo]) -> Node | None:
        outs = self._outputs(n, values)
        if outs is None:
            return None  # produces no tensor (size queries and the like)
        ins = self._tensor_inputs(n, values)
        if n.op == "get_attr":
            return Node(n.name, "constant", [], outs, {}, {"value": str(n.target)}, str(n.target), "get_attr")
        if n.op == "call_module":
            return self._classify_module(n, ins, outs)
        if n.op == "call_function":
            return self._classify_function(n, ins, outs)
        if n.op == "call_method":
            return self._classify_method(n, ins, outs)
        return Node(n.name, "unknown", ins, outs, {}, {}, n.name, str(n.target))

    def _classify_module(self, n: fx.Node, ins: list[str], outs: list[str]) -> Node:
        path = _module_path(n)
        mod = self._module(path)
        params = {k: f"{path}.{k}" for k, v in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)) if v is not None}
        kind, attrs = _module_kind(mod)
        return Node(n.name, kind, ins, outs, attrs, params, path, type(mod).__name__)

    def _classify_function(self, n: fx.Node, ins: list[str], outs: list[str]) -> Node:
        t = n.target
        label = n.name
        target = getattr(t, "__name__", str(t))
        kind, attrs = "unknown", {}
        if t in _BINARY_FUNCTIONS:
            kind, attrs = _BINARY_FUNCTIONS[t], _binary_attrs(n)
        elif t in _ACTIVATION_FUNCTIONS:
            fn, zero = _ACTIVATION_FUNCTIONS[t]
            kind, attrs, ins = "act", {"fn": fn, "zero_preserving": zero}, ins[:1]
        elif t in _IDENTITY_FUNCTIONS or target in _IDENTITY_FUNCTION_NAMES:
            kind, ins = "identity", ins[:1]
        elif t in _POOL_FUNCTIONS:
            kind, ins = "pool", ins[:1]
        elif t in (torch.cat, torch.concat):
            kind, attrs = "concat", {"axis": _arg(n, 1, "dim", 0)}
        elif t is torch.flatten:
            kind, attrs = "flatten", {"start": _arg(n, 1, "start_dim", 0), "end": _arg(n, 2, "end_dim", -1)}
        elif t in (torch.reshape,):
            kind, attrs = "reshape", {}
        elif t in (torch.split, torch.chunk):
            kind, attrs = "split", {"axis": _arg(n, 2, "dim", 0), "equal": t is torch.chunk}
        elif t is torch.permute:
            kind, attrs = "permute", {"perm": list(_arg(n, 1, "dims", None))}
        elif t is torch.transpose:
            kind, attrs = "transpose", {"axes": (_arg(n, 1, "dim0", 0), _arg(n, 2, "dim1", 1))}
        elif t is torch.mean or t is torch.sum or t is torch.amax:
            kind, attrs = "reduce", {"axes": _arg(n, 1, "dim", None), "keepdim": _arg(n, 2, "keepdim", False)}
        elif t in (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax):
            kind, attrs, ins = "softmax", {"axis": _arg(n, 1, "dim", -1)}, ins[:1]
        elif t is F.layer_norm:
            kind, attrs, ins = "layernorm", {"normalized_ndim": len(_arg(n, 1, "normalized_shape", ()))}, ins[:1]
        elif t is F.pad:
            kind, attrs, ins = "pad", {"pads": list(_arg(n, 1, "pad", ()))}, ins[:1]
        elif t is torch.index_select:
            kind, attrs = "gather", {"axis": _arg(n, 1, "dim", 0)}
        elif t in (torch.matmul, torch.bmm, operator.matmul):
            kind = "matmul"
        elif t is operator.getitem and ins and ins[0] == getattr(n.args[0], "name", None):
            sliced, ins = _getitem_slices(n), ins[:1]
            kind, attrs = ("slice", sliced) if sliced is not None else ("unknown", {})
        return Node(n.name, kind, ins, outs, attrs, {}, label, target)

    def _classify_method(self, n: fx.Node, ins: list[str], outs: list[str]) -> Node:
        m = str(n.target)
        kind, attrs = "unknown", {}
        if m in _BINARY_METHODS:
            kind, attrs = _BINARY_METHODS[m], _binary_attrs(n)
        elif m in _ACTIVATION_METHODS:
            fn, zero = _ACTIVATION_METHODS[m]
            kind, attrs = "act", {"fn": fn, "zero_preserving": zero}
        elif m in _IDENTITY_METHODS:
            kind, ins = "identity", ins[:1]
        elif m in ("view", "reshape"):
            kind = "reshape"
        elif m == "flatten":
            kind, attrs = "flatten", {"start": _arg(n, 1, "start_dim", 0), "end": _arg(n, 2, "end_dim", -1)}
        elif m in ("split", "chunk"):
            kind, attrs = "split", {"axis": _arg(n, 2, "dim", 0), "equal": m == "chunk"}
        elif m == "permute":
            dims = n.args[1:] if len(n.args) > 2 or isinstance(n.args[1], int) else n.args[1]
            kind, attrs = "permute", {"perm": list(dims)}
        elif m == "transpose":
            kind, attrs = "transpose", {"axes": (_arg(n, 1, "dim0", 0), _arg(n, 2, "dim1", 1))}
        elif m in ("mean", "sum", "amax"):
            kind, attrs = "reduce", {"axes": _arg(n, 1, "dim", None), "keepdim": _arg(n, 2, "keepdim", False)}
        elif m in ("softmax", "log_softmax"):
            kind, attrs = "softmax", {"axis": _arg(n, 1, "dim", -1)}
        return Node(n.name, kind, ins, outs, attrs, {}, n.name, f"Tensor.{m}")

    # ------------------------------------------------------------------ params
    def _module(self, path: str) -> nn.Module:
        """Submodule by qualified path, through a cache of the module tree (dropped on
        commit, when the tree may change)."""
        cache = self.__dict__.get("_module_cache")
        if cache is None:
            cache = self._module_cache = dict(self.gm.named_modules(remove_duplicate=False))
        mod = cache.get(path)
        return mod if mod is not None else self.gm.get_submodule(path)

    def _owner(self, key: str) -> tuple[nn.Module, str]:
        path, _, attr = key.rpartition(".")
        return (self._module(path) if path else self.gm), attr

    def get_param(self, key: str) -> np.ndarray:
        """The parameter or buffer ``key`` as a numpy array: a zero-copy view of the CPU
        tensor (a copy for other devices).  Never written into: edits replace tensors."""
        return as_numpy(self.get_tensor(key))

    def get_tensor(self, key: str) -> torch.Tensor:
        """The parameter or buffer ``key`` as the module's own (detached) tensor."""
        owner, attr = self._owner(key)
        value = getattr(owner, attr)
        if not isinstance(value, torch.Tensor):
            raise GraphError(f"`{key}` is not a tensor")
        return value.detach()

    def set_param(self, key: str, value: np.ndarray | torch.Tensor) -> None:
        """Replace ``key`` by ``value`` (numpy arrays become tensors sharing their memory,
        on the old tensor's device)."""
        owner, attr = self._owner(key)
        old = getattr(owner, attr)
        if isinstance(old, torch.Tensor):
            value = to_tensor(value, old.device, old.dtype)
        else:
            value = to_tensor(value)
        if isinstance(old, nn.Parameter):  # straight into the table: Module.__setattr__ is slow
            owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, value)

    # ------------------------------------------------------------------- attrs
    def _fx_node(self, node: Node) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == node.name:
                return n
        raise GraphError(f"node `{node.name}` is no longer in the graph")

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        n = self._fx_node(node)
        self._graph_edited |= n.op != "call_module"  # a module's attributes are not in the code
        if n.op == "call_module":
            return _set_module_attr(self.gm.get_submodule(str(n.target)), node, key, value)
        if key == "sizes" and node.kind == "split":
            x = n.args[0]
            axis = node.attrs["axis"]
            with self.gm.graph.inserting_before(n):
                new = self.gm.graph.call_function(torch.split, (x, [int(v) for v in value]), {"dim": axis})
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            self.gm.graph.erase_node(n)
            return
        if key == "shape" and node.kind == "reshape":
            edit = set_reshape_literals(n, value)
            if edit is not None:
                self.edits.append(edit)
            return
        if key == "range" and node.kind == "slice" and n.target is operator.getitem:
            return _set_getitem_range(n, value)
        raise GraphError(f"cannot set `{key}` on {node}")

    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None:
        from .fx_build import replace_with_new_nodes

        self.__dict__.pop("_module_cache", None)
        self._graph_edited = True
        old = self._fx_node(node)
        old_path = str(old.target) if old.op == "call_module" else ""
        paths = replace_with_new_nodes(self, node, new)
        self.__dict__.pop("_module_cache", None)
        if old_path and paths != [old_path]:
            keys = [{r: f"{p}.{r}" for r in ("weight", "bias") if s.params.get(r) is not None} for s, p in zip(new, paths)]
            self.edits.append(Edit("replace", node.name, old_path, f"{node.kind} replaced by {len(new)} layer(s)",
                                   details={"new": [(s.kind, dict(s.attrs), k) for s, k in zip(new, keys)],
                                            "inputs": [list(s.inputs) for s in new]}))

    def insert_gather(self, value: str, axis: int, index: Sequence[int], consumers: Sequence[Node]) -> None:
        src = next(n for n in self.gm.graph.nodes if n.name == value)
        self._graph_edited = True
        holder = _GatherIndex(index)
        n = len([m for m in self.gm.modules() if isinstance(m, _GatherIndex)])
        while hasattr(self.gm, f"gp_gather_{n}"):  # dead gathers' modules are deleted at commit
            n += 1
        name = f"gp_gather_{n}"
        self.gm.add_submodule(name, holder)
        self.__dict__.pop("_module_cache", None)
        targets = {c.name for c in consumers}
        with self.gm.graph.inserting_after(src):
            idx = self.gm.graph.get_attr(f"{name}.index")
            with self.gm.graph.inserting_after(idx):
                g = self.gm.graph.call_function(torch.index_select, (src, axis, idx))
        for user in list(src.users):
            if user.name in targets:
                user.replace_input_with(src, g)

    def commit(self, resized: Mapping[Port, int] | None = None) -> None:
        """Re-derive module metadata, check and recompile the graph, and refresh shapes:
        by patching the resized axes when the caller knows them (a channel rewrite
        changes exactly the sizes of its ports), else by shape propagation."""
        self.__dict__.pop("_module_cache", None)
        for mod in self.gm.modules():
            _sync_module_metadata(mod)
        if self._graph_edited:  # else the code (shared with the graph copied from) still holds
            self.gm.graph.eliminate_dead_code()
            self.gm.delete_all_unused_submodules()  # modules of nodes that became dead
            self.gm.graph.lint()
            self.gm.recompile()
            self._graph_edited = False
        if resized is None or not self._patch_shapes(resized):
            self._propagate()

    def _patch_shapes(self, resized: Mapping[Port, int]) -> bool:
        by_value: dict[str, dict[int, int]] = {}
        for port, size in resized.items():
            by_value.setdefault(port.value, {})[port.axis] = size
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for value, axes in by_value.items():
            n = nodes.get(value)
            meta = n.meta.get("tensor_meta") if n is not None else None
            if not _is_tensor_meta(meta):
                return False
            shape = list(meta.shape)
            for axis, size in axes.items():
                shape[axis] = size
            n.meta["tensor_meta"] = meta._replace(shape=torch.Size(shape))
        return True

    # --------------------------------------------------------------- running
    def copy(self) -> "FxFrontend":
        """A copy whose module tree is new and whose tensors are shared until edited
        (edits replace tensors, never write into them); shapes carry over."""
        root = _shallow_tree(self.gm)
        gm = _graph_module(root, self.gm.graph, self.gm.__class__.__name__, lazy=True,
                           code_of=None if self._graph_edited else self.gm)
        return FxFrontend(gm, self._inputs, self.original_training, propagate=False, edits=self.edits)

    def with_weights(self, params: Mapping[str, np.ndarray | torch.Tensor]) -> "FxFrontend":
        """A copy that shares this one's fx graph and compiled code (new module objects,
        tensors shared) with the parameters in ``params`` replaced.  Only for graphs that
        are not edited structurally (:meth:`graphprune.graph.Graph.with_weights` copies the
        structure before an edit)."""
        out = type(self)(_shallow_tree(self.gm), self._inputs, self.original_training, propagate=False, edits=self.edits)
        for key, value in params.items():
            out.set_param(key, value)
        return out

    def run(self, inputs: Sequence[torch.Tensor | np.ndarray]) -> list[torch.Tensor]:
        """Outputs (torch tensors) on ``inputs`` (tensors or numpy arrays), eval mode."""
        _ensure_eval(self.gm)
        with torch.no_grad():
            out = self.gm(*[to_tensor(x, self._device()) for x in inputs])
        return [t for t in _flatten_tensors(out)]

    def run_with_shapes(self, inputs: Sequence[torch.Tensor | np.ndarray], values: set[str]) -> tuple[list[torch.Tensor], dict[str, tuple[int, ...]]]:
        """:meth:`run`, and the shapes of the tensor values named in ``values`` on the way:
        through hooks on the modules that read or write them when each is a module's
        first input or output (the compiled forward), else through an interpreter."""
        _ensure_eval(self.gm)
        with torch.no_grad():
            return _run_recording(self.gm, [to_tensor(x, self._device()) for x in inputs], values)

    def inputs_from_arrays(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Numpy inputs as tensors on the model's device, in the example inputs' dtypes
        (numpy has no bfloat16): what ``Graph.random_inputs`` returns."""
        device = self._device()
        return [to_tensor(a, device, ex.dtype if isinstance(ex, torch.Tensor) else None) for a, ex in zip(arrays, self._inputs)]

    def _device(self) -> torch.device | None:
        """The device of the module's first parameter or buffer (None: no tensors)."""
        for t in self.gm.parameters():
            return t.device
        for t in self.gm.buffers():
            return t.device
        return None

    def masked_runner(self, inputs: Sequence[torch.Tensor]) -> "MaskedRunner":
        """A runner over ``inputs`` (a batch of ``B`` rows) that evaluates ``k`` masked
        replicas at once: see :class:`MaskedRunner`."""
        self.gm.eval()
        return MaskedRunner(self.gm, list(inputs))

    def gradients(
        self, inputs: Sequence[torch.Tensor], loss: Callable[[list[torch.Tensor]], torch.Tensor], keys: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """``d loss(outputs) / d param`` for the parameters ``keys`` (eval mode: norms use
        their running statistics); the module's own tensors are not touched."""
        return _param_gradients(self.gm, {k: self.get_tensor(k) for k in keys}, inputs, loss)

    def to_module(self) -> nn.Module:
        """An independent ``GraphModule``: new module objects and cloned tensors, in the
        training mode of the model that was traced."""
        with stage("emit"):
            return _independent_module(self.gm, self.original_training, code_current=not self._graph_edited)

    def to_onnx(self, path: str, opset: int = 17, **_: Any) -> None:
        from ..emit import export_module_onnx

        export_module_onnx(self.to_module().eval(), self._inputs, path, opset=opset)


def _param_gradients(
    gm: fx.GraphModule, tensors: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor],
    loss: Callable[[list[torch.Tensor]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``d loss(gm(inputs)) / d p`` for the named parameters (differentiated on clones), eval mode."""
    gm.eval()
    params = {k: t.clone().requires_grad_(True) for k, t in tensors.items()}
    with torch.enable_grad():
        out = torch.func.functional_call(gm, params, tuple(inputs), strict=False)
        value = loss(_flatten_tensors(out))
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g.detach() for k, g in zip(params, grads)}


def _run_recording(gm: fx.GraphModule, tensors: list[torch.Tensor], values: set[str]) -> tuple[list[torch.Tensor], dict[str, tuple[int, ...]]]:
    """Outputs of ``gm`` and the shapes of ``values``: by module hooks when they cover
    every value (:func:`_shape_hooks`), else by an interpreter."""
    hooks = _shape_hooks(gm, values)
    if hooks is None:
        recorder = _ShapeRecorder(gm, values)
        return list(_flatten_tensors(recorder.run(*tensors))), recorder.shapes
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [mod.register_forward_hook(_recording_hook(shapes, ins, out)) for mod, ins, out in hooks]
    try:
        out = gm(*tensors)
    finally:
        for h in handles:
            h.remove()
    return list(_flatten_tensors(out)), shapes


def _shape_hooks(gm: fx.GraphModule, values: set[str]) -> list[tuple[nn.Module, str | None, str | None]] | None:
    """(module, value it reads first, value it writes) to hook so that every value in
    ``values`` is recorded, or None when some value is not a module's first input or
    output, or a hooked module is called from more than one node."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    plan: dict[str, list[str | None]] = {}
    covered: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        calls[n.target] = calls.get(n.target, 0) + 1
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        ins = first.name if first is not None and first.name in values else None
        out = n.name if n.name in values else None
        if ins or out:
            plan[n.target] = [ins, out]
            covered.update(v for v in (ins, out) if v)
    if covered != set(values) or any(calls[t] > 1 for t in plan):
        return None
    return [(modules[t], ins, out) for t, (ins, out) in plan.items()]


def _recording_hook(shapes: dict[str, tuple[int, ...]], ins: str | None, out: str | None) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, result: Any) -> None:
        if ins is not None and args and isinstance(args[0], torch.Tensor):
            shapes[ins] = tuple(args[0].shape)
        if out is not None and isinstance(result, torch.Tensor):
            shapes[out] = tuple(result.shape)

    return hook


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and keeps the shapes of the tensors named in ``values``."""

    def __init__(self, gm: fx.GraphModule, values: set[str]) -> None:
        super().__init__(gm)
        self.values = values
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.values and isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


class _MaskingInterpreter(fx.Interpreter):
    """Multiplies the outputs of the nodes named in ``masks`` by their masks."""

    def __init__(self, gm: fx.GraphModule, masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.masks = masks

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        mask = self.masks.get(n.name)
        return out if mask is None else out * mask.to(out.dtype)


class MaskedRunner:
    """Evaluate ``k`` replicas of a batch with per-replica channel masks, sharing the
    unmasked prefix of the graph.

    The batch (``B`` rows) runs once unmasked and every node's output is kept.  A call
    ``runner(masks, k)`` (masks: value name -> tensor with ``k*B`` rows, broadcast
    against the value) re-runs only the suffix of the graph from the first masked node:
    prefix values that the suffix reads are replicated ``k`` times along the batch axis.
    A prefix value the suffix reads that is not a tensor but derives from the batch (a
    ``size()``) moves the start back to that node, so shapes are recomputed on the
    replicated batch.  Memory: every intermediate value of the ``B``-row batch.
    """

    def __init__(self, gm: fx.GraphModule, inputs: list[torch.Tensor]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.batched: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.batched for a in n.all_input_nodes):
                self.batched.add(n)
        self.rows = int(inputs[0].shape[0]) if inputs else 0
        self.inputs = inputs
        with torch.no_grad():
            rec = _RecordingInterpreter(gm)
            self.base = rec.run(*inputs)
        self.values = rec.values

    def outputs(self) -> list[torch.Tensor]:
        """The unmasked outputs."""
        return _flatten_tensors(self.base)

    def _start(self, masked: set[str]) -> int:
        start = min((self.order[n] for n in self.nodes if n.name in masked), default=len(self.nodes))
        moved = True
        while moved:
            moved = False
            for n in self.nodes[:start]:
                if n not in self.batched or isinstance(self.values.get(n), torch.Tensor):
                    continue
                if any(self.order[u] >= start for u in n.users):
                    start, moved = self.order[n], True
                    break
        return start

    def __call__(self, masks: Mapping[str, torch.Tensor], k: int) -> list[torch.Tensor]:
        start = self._start(set(masks))
        env: dict[fx.Node, Any] = {}
        for n in self.nodes[:start]:
            value = self.values.get(n)
            if (n in self.batched and isinstance(value, torch.Tensor) and k > 1
                    and any(self.order[u] >= start for u in n.users)):
                value = value.repeat((k,) + (1,) * (value.dim() - 1))
            env[n] = value
        with torch.no_grad():
            # the placeholders are in the prefix (the env), so the inputs given here are unused
            out = _MaskingInterpreter(self.gm, masks).run(*self.inputs, initial_env=env)
        return _flatten_tensors(out)


class _RecordingInterpreter(fx.Interpreter):
    """Runs the graph and keeps every node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


class _GatherIndex(nn.Module):
    """Holds the index buffer of an inserted channel gather."""

    def __init__(self, index: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long))


# ------------------------------------------------------------------- helpers
def _graph_module(root: nn.Module, graph: fx.Graph, name: str, lazy: bool,
                  code_of: fx.GraphModule | None = None) -> fx.GraphModule:
    """A GraphModule over a copy of ``graph`` (node metadata kept).  ``lazy`` defers code
    generation to the first call, so copies that are edited and committed compile once;
    ``code_of`` (a module whose code was generated from ``graph`` as it is) lends its
    compiled forward instead (:func:`_share_code`); a module that is not ``lazy`` is then
    a plain ``GraphModule`` (:func:`_plain`)."""
    new = fx.Graph()
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    new.output(new.graph_copy(graph, {}), type_expr=output.type).meta = dict(output.meta)  # the annotation is in the code
    if not lazy and (code_of is None or not _has_code(code_of)):
        return fx.GraphModule(root, new, name)
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # older torch: compile eagerly
        return fx.GraphModule(root, new, name)
    gm = _LazyGraphModule(root, new, name)
    shared = code_of is not None and _share_code(gm, code_of)
    if not lazy:
        if not shared:
            gm.real_recompile()  # type: ignore[attr-defined]
        _plain(gm)
    return gm


def _has_code(gm: fx.GraphModule) -> bool:
    """``gm``'s class has a compiled forward (a lazy module's may still be pending)."""
    forward = type(gm).__dict__.get("forward")
    return forward is not None and getattr(forward, "__name__", "") != "_lazy_forward" and "_code" in gm.__dict__


def _plain(gm: fx.GraphModule) -> None:
    """Make the lazy module ``gm``, whose code is compiled, a plain ``GraphModule`` (what a
    user expects from :meth:`FxFrontend.to_module`: no private class, no pending compile): its
    class becomes a per-instance subclass of ``GraphModule``, as ``GraphModule.__new__``
    makes them, holding the same forward."""
    cls = type("GraphModuleImpl", (fx.GraphModule,), {"forward": type(gm).__dict__["forward"]})
    cls.__qualname__ = "GraphModule.__new__.<locals>.GraphModuleImpl"  # GraphModule.__new__ skips these in the MRO
    cls.__name__ = type(gm).__name__  # the traced model's class name
    gm.__class__ = cls


_CODE_FIELDS = ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec")


def _share_code(gm: fx.GraphModule, source: fx.GraphModule) -> bool:
    """Give the lazy ``gm``, whose graph is a fresh copy of ``source``'s, ``source``'s
    compiled ``forward``: the same nodes under the same names generate the same code, so
    it is neither generated nor compiled again.  The forward is set on ``gm``'s own class,
    so a later ``recompile`` of ``gm`` (after an edit) never reaches ``source``.  False
    (nothing shared) when ``source`` has no current code or a different code generator."""
    if not _has_code(source) or type(gm.graph._codegen) is not type(source.graph._codegen):
        return False
    forward = type(source).__dict__["forward"]
    for field in _CODE_FIELDS:
        if field in source.__dict__:
            gm.__dict__[field] = source.__dict__[field]
    type(gm).forward = forward
    return True


def _ensure_eval(gm: nn.Module) -> None:
    """``gm.eval()`` unless every module already is (``eval`` sets an attribute on each)."""
    if any(m.training for m in gm.modules()):
        gm.eval()


def _independent_module(gm: fx.GraphModule, training: bool, code_current: bool = False) -> fx.GraphModule:
    """A new ``GraphModule`` of ``gm``'s graph: new module objects, cloned tensors; with
    ``gm``'s compiled code when ``code_current`` (its graph unedited since)."""
    root = _shallow_tree(gm)
    for mod in root.modules():
        for k, v in mod._parameters.items():
            if v is not None:
                mod._parameters[k] = nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
        for k, v in mod._buffers.items():
            if v is not None:
                mod._buffers[k] = v.clone()
    out = _graph_module(root, gm.graph, gm.__class__.__name__, lazy=False, code_of=gm if code_current else None)
    if any(m.training != training for m in out.modules()):
        out.train(training)
    return out


def _shallow_tree(module: nn.Module) -> nn.Module:
    """Copy the module objects of a tree, sharing their parameter and buffer tensors.

    Each module is a new object with a copy of the old one's ``__dict__`` (what
    ``copy.copy`` does for a module, without its ``__reduce_ex__`` round trip or a
    ``GraphModule``'s recompiling ``__copy__``); every dictionary in it (parameters,
    buffers, children, hook tables) is a new one, so replacing an entry or registering a
    hook on one tree never reaches the other."""
    new = object.__new__(type(module))
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    state["_modules"] = {k: (_shallow_tree(v) if v is not None else None) for k, v in module._modules.items()}
    object.__setattr__(new, "__dict__", state)  # Module.__setattr__ is slow
    return new


def _module_kind(mod: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(mod, nn.modules.conv._ConvNd):
        attrs = {
            "groups": mod.groups, "stride": tuple(mod.stride), "dilation": tuple(mod.dilation),
            "kernel": tuple(mod.kernel_size), "pads": _conv_pads(mod),
        }
        return ("conv_transpose" if mod.transposed else "conv"), attrs
    if isinstance(mod, nn.Linear):
        return "linear", {}
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", {"eps": mod.eps}
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        return "batchnorm", {"eps": mod.eps, "instance": True}
    if isinstance(mod, nn.LayerNorm):
        return "layernorm", {"normalized_ndim": len(mod.normalized_shape)}
    if isinstance(mod, nn.GroupNorm):
        return "groupnorm", {"num_groups": mod.num_groups}
    if type(mod) in _ACTIVATION_MODULES:
        fn, zero = _ACTIVATION_MODULES[type(mod)]
        return "act", {"fn": fn, "zero_preserving": zero}
    if isinstance(mod, nn.PReLU):
        return "act", {"fn": "prelu", "zero_preserving": True}
    if isinstance(mod, _IDENTITY_MODULES):
        return "identity", {}
    if isinstance(mod, _POOL_MODULES):
        return "pool", {}
    if isinstance(mod, nn.Flatten):
        return "flatten", {"start": mod.start_dim, "end": mod.end_dim}
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return "softmax", {"axis": mod.dim if mod.dim is not None else -1}
    if isinstance(mod, nn.MultiheadAttention):
        return "mha", {"num_heads": mod.num_heads}
    return "unknown", {}


def _conv_pads(mod: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """ONNX-style pads (begin_1..begin_n, end_1..end_n) of a conv module."""
    nd = len(mod.kernel_size)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0,) * (2 * nd)
        total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]  # "same", stride 1
        return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    return tuple(mod.padding) * 2


def _set_module_attr(mod: nn.Module, node: Node, key: str, value: Any) -> None:
    """Set a conv's or group norm's ``groups``/``num_groups``/``stride``/``dilation``/``pads``."""
    if key == "groups":
        mod.groups = int(value)
    elif key == "num_groups":
        mod.num_groups = int(value)
    elif key in ("stride", "dilation"):
        setattr(mod, key, tuple(int(v) for v in value))
    elif key == "pads":
        nd = len(value) // 2
        begin, end = tuple(value[:nd]), tuple(value[nd:])
        if begin != end:
            raise GraphError(f"{node}: asymmetric pads {tuple(value)} need an explicit pad op")
        mod.padding = tuple(int(v) for v in begin)
        mod._reversed_padding_repeated_twice = [int(p) for p in reversed(begin) for _ in range(2)]
    else:
        raise GraphError(f"cannot set `{key}` on {node}")


def _set_getitem_range(n: fx.Node, ranges: Mapping[int, tuple[int, int]]) -> None:
    """New literal bounds ``x[..., start:end, ...]`` on the given axes."""
    index = list(n.args[1]) if isinstance(n.args[1], tuple) else [n.args[1]]
    for axis, (start, end) in ranges.items():
        index[axis] = slice(int(start), int(end), None)
    n.args = (n.args[0], tuple(index))


def _getitem_slices(n: fx.Node) -> dict[str, Any] | None:
    """``x[a:b, :, c:d]`` (basic slices with literal bounds only) as slice attrs: cut axes
    and their normalised (start, end, step); None for any other index."""
    from .aten import slice_range

    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    meta = n.args[0].meta.get("tensor_meta")  # type: ignore[union-attr]
    if not _is_tensor_meta(meta) or len(index) > len(meta.shape):
        return None
    ranges = {}
    for axis, item in enumerate(index):
        if not isinstance(item, slice) or not all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
            return None
        size = int(meta.shape[axis])
        bounds = slice_range(item.start, item.stop, item.step, size)
        if bounds != (0, size, 1):
            ranges[axis] = bounds
    return {"axes": sorted(ranges), "ranges": ranges}


def _binary_attrs(n: fx.Node) -> dict[str, Any]:
    """Which operand positions are tensors, and the value of a scalar operand if any."""
    operands = list(n.args[:2])
    positions = [i for i, a in enumerate(operands) if isinstance(a, fx.Node) and _is_tensor_meta(a.meta.get("tensor_meta"))]
    scalars = [a for i, a in enumerate(operands) if i not in positions]
    scalar: Any = None
    if scalars:
        s = scalars[0]
        scalar = float(s) if isinstance(s, (int, float, bool)) else "dynamic"
    alpha = n.kwargs.get("alpha")
    return {"tensor_positions": positions, "scalar": scalar, "alpha": alpha}


def set_reshape_literals(n: fx.Node, updates: Mapping[int, int]) -> Edit | None:
    """Replace literal sizes of view/reshape node ``n`` at the axes in ``updates`` (a
    ``-1`` stays: it follows the new input size, and so does a size computed at run time
    from tensor sizes, like ShuffleNet's ``x.size(1) // groups``; the check after the pass
    proves it); the edit, if a literal changed."""
    is_method = n.op == "call_method"
    raw = list(n.args[1:]) if is_method else [n.args[1]]
    if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
        shape, packed = list(raw[0]), True
    else:
        shape, packed = list(raw), False
    old = list(shape)
    for axis, size in updates.items():
        entry = shape[axis]
        if isinstance(entry, int) and entry != -1:
            shape[axis] = int(size)
        elif not isinstance(entry, int) and not _from_tensor_sizes(entry):
            raise GraphError(f"cannot resize axis {axis} of reshape `{n.name}`: its size is computed by `{entry}`")
    new_shape = [tuple(shape)] if packed else shape
    n.args = (n.args[0], *new_shape) if is_method else (n.args[0], new_shape[0] if packed else tuple(shape), *n.args[2:])
    if shape == old:
        return None
    return Edit("literal", n.name, "", "reshape sizes", _literal_text(old), _literal_text(shape))


_SIZE_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.getitem, operator.truediv}


def _from_tensor_sizes(entry: Any) -> bool:
    """Whether ``entry`` (a reshape size) is integer arithmetic over tensor sizes only
    (``x.size()``, ``x.size(d)``, ``x.shape``, ``x.dim()``) and literals, so it is recomputed
    from the pruned sizes when the graph runs."""
    if isinstance(entry, (int, float)):
        return True
    if not isinstance(entry, fx.Node):
        return False
    if entry.op == "call_method" and entry.target in ("size", "dim"):
        return True
    if entry.op == "call_function" and entry.target is getattr and entry.args[1] == "shape":
        return True
    if entry.op == "call_function" and entry.target in _SIZE_ARITHMETIC:
        return all(_from_tensor_sizes(a) for a in entry.args)
    return False


def _literal_text(shape: list[Any]) -> list[Any]:
    """Sizes of a reshape as the code spells them: ints, and names for computed ones."""
    return [s if isinstance(s, int) else str(s) for s in shape]


def _arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _flatten_nodes(obj: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(obj, lambda a: out.append(a) or a)
    return out


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten_tensors(v)]
    return []


def _tuple_source(n: fx.Node) -> fx.Node | None:
    src = n.args[0]
    if isinstance(src, fx.Node) and isinstance(src.meta.get("tensor_meta"), (tuple, list)) and isinstance(n.args[1], int):
        return src
    return None


def _sync_module_metadata(mod: nn.Module) -> None:
    """Re-derive size attributes (in_channels, num_features...) from edited weights.
    They are plain attributes: written to the instance dict (``Module.__setattr__``
    would first look for a parameter, buffer or submodule of that name)."""
    plain = mod.__dict__
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:
            plain["in_channels"], plain["out_channels"] = w.shape[0], w.shape[1] * mod.groups
        else:
            plain["out_channels"], plain["in_channels"] = w.shape[0], w.shape[1] * mod.groups
        plain["kernel_size"] = tuple(w.shape[2:])
    elif isinstance(mod, nn.Linear):
        plain["out_features"], plain["in_features"] = mod.weight.shape
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = mod.running_mean if mod.running_mean is not None else mod.weight
        if ref is not None:
            plain["num_features"] = ref.shape[0]
    elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        plain["num_channels"] = mod.weight.shape[0]
    elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        plain["normalized_shape"] = tuple(mod.weight.shape)
    elif isinstance(mod, nn.PReLU):
        plain["num_parameters"] = mod.weight.numel()
