"""The torch.export frontend: an aten-level graph of any model a real forward can run.

Capture is ``torch.export.export(model, inputs, strict=False)`` on a shallow copy of the
model in eval mode (so the caller's modules are never edited), then the exported
program is *unlifted* into a plain ``torch.fx.GraphModule``: parameters and buffers are
``get_attr`` nodes whose targets are the model's own qualified names
(``model.22.cv2.0.0.conv.weight``), and every op is an aten op, classified by one table
(:mod:`.aten`).  Reading, running, copying and emitting are the fx frontend's; this
module adds the aten view and the aten spellings of the edits:

* ``set_attr`` rewrites op arguments (conv ``groups``/``stride``/``dilation``/``pads``,
  ``num_groups``, split sizes, reshape sizes).  Sizes that the model computed from shapes
  at run time (``x.view(b, c, -1)`` with ``c = x.size(1)``) are literals in an exported
  graph, resolved from the captured shapes, and follow the pruned counts;
* ``replace_node`` builds aten conv/linear nodes whose weights are registered under new
  qualified names (``<old path>_gp<i>``; one new node keeps the old names);
* every edit of a size literal or of structure is recorded in :attr:`edits`, which
  :func:`graphprune.apply` uses to edit the user's own model in place.

The captured graph is in eval mode: batch norm uses its running statistics whatever
``train()`` says on the emitted module.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import Graph, GraphError, NewNode, Node, ValueInfo
from .aten import CONV_ARG_NAMES, classify_aten, conv_args, is_aten, packet_name
from .fx import CaptureError, Edit, FxFrontend, _graph_module, _shallow_tree
from .fx_build import resolve_input, split_pads, to_tensor
from ..profile import stage

__all__ = ["ExportFrontend", "Edit", "capture_export"]

_ATEN = torch.ops.aten


def capture_export(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Graph:
    """Capture ``model`` with ``torch.export`` (non-strict) as a :class:`Graph`."""
    with stage("capture"):
        work = _shallow_tree(model)
        work.eval()
        try:
            ep = torch.export.export(work, tuple(inputs), strict=False)
        except Exception as exc:  # export raises many types; name the construct
            raise CaptureError(f"torch.export cannot capture `{type(model).__name__}`: {_first_line(exc)}") from exc
        unlifted = ep.module()
        graph = _plain_graph(unlifted.graph, ep.call_spec.out_spec)
        gm = fx.GraphModule(unlifted, graph, type(model).__name__)
    with stage("shapes"):
        known = shapes_from_export(gm)
    return Graph(ExportFrontend(gm, list(inputs), original_training=model.training, propagate=not known))


def shapes_from_export(gm: fx.GraphModule) -> bool:
    """Set every node's ``tensor_meta`` from the fake tensor ``val`` that ``torch.export``
    recorded while tracing (the shapes a shape-propagation forward would compute, without
    running a kernel); True if every node that holds a tensor or a sequence of tensors got
    one.  ``get_attr`` nodes take the metadata of the tensor they fetch."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        val = _attr_value(gm, n) if n.op == "get_attr" else n.meta.get("val")
        if isinstance(val, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(val)
        elif isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
            n.meta["tensor_meta"] = tuple(_extract_tensor_metadata(v) for v in val)
        elif isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val) or (
                val is None and n.op != "get_attr" and "val" not in n.meta):
            return False  # a mix of tensors and other values, or a node export gave no value
        else:
            n.meta.pop("tensor_meta", None)  # a Python value (a size): no tensor
    return True


def _attr_value(gm: fx.GraphModule, n: fx.Node) -> Any:
    path, _, attr = str(n.target).rpartition(".")
    try:
        return getattr(gm.get_submodule(path) if path else gm, attr)
    except AttributeError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _plain_graph(graph: fx.Graph, out_spec: Any) -> fx.Graph:
    """A copy of an unlifted export graph with plain codegen: inputs positional, outputs in
    the model's own structure where it is made of tuples, lists and dicts (else a flat
    tuple), and without the input guard (capture fixes the example shapes anyway)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            continue
        if n.op == "output":
            flat = [env[a] if isinstance(a, fx.Node) else a for a in _flat_outputs(n.args[0])]
            new.output(_structured(flat, out_spec))
            continue
        env[n] = new.node_copy(n, lambda a: env[a])
    return new


def _flat_outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _structured(flat: list[Any], out_spec: Any) -> Any:
    """``flat`` rebuilt into the model's output structure, if plain containers express it."""
    from torch.utils import _pytree as pytree

    try:
        tree = pytree.tree_unflatten(flat, out_spec)
    except Exception:
        return tuple(flat)
    return tree if _plain(tree) else tuple(flat)


def _plain(tree: Any) -> bool:
    if isinstance(tree, (tuple, list)) and type(tree) in (tuple, list):
        return all(_plain(t) for t in tree)
    if type(tree) is dict:
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in tree.items())
    return isinstance(tree, fx.Node) or tree is None or isinstance(tree, (int, float, bool, str))


class ExportFrontend(FxFrontend):
    """Reads and edits an unlifted ``torch.export`` graph (aten ops over ``get_attr`` weights)."""

    name = "export"
    shape_polymorphic = False  # sizes are literals resolved at the example input

    def __init__(self, gm: fx.GraphModule, inputs: list[torch.Tensor], original_training: bool = False,
                 propagate: bool = True, edits: list[Edit] | None = None) -> None:
        super().__init__(gm, inputs, original_training, propagate, edits)

    # ----------------------------------------------------------------- reading
    def _begin_view(self, fx_nodes: list[fx.Node]) -> None:
        """Classify the aten nodes, and count which ``get_attr`` uses are op parameters."""
        self._aten = {n: classify_aten(n) for n in fx_nodes if is_aten(n)}
        self._param_uses: dict[fx.Node, int] = {}
        for c in self._aten.values():
            for p in c.params.values():
                self._param_uses[p] = self._param_uses.get(p, 0) + 1

    def _classify(self, n: fx.Node, values: dict[str, ValueInfo]) -> Node | None:
        if n in self._aten:
            return self._aten_node(n, self._aten[n], values)
        if n.op == "get_attr" and self._param_uses.get(n, 0) == len(n.users):
            return None  # a weight: part of its op's params
        return super()._classify(n, values)

    def _aten_node(self, n: fx.Node, c: Any, values: dict[str, ValueInfo]) -> Node | None:
        outs = self._outputs(n, values)
        if outs is None:
            return None
        params = {role: str(p.target) for role, p in c.params.items()}
        ins = [a.name for a in c.inputs if isinstance(a, fx.Node) and a.name in values]
        label = params["weight"].rpartition(".")[0] if "weight" in params else n.name
        target = f"aten.{packet_name(n)}"
        attrs = dict(c.attrs)
        if c.kind == "unknown" and "why" in attrs:
            target = f"{target} ({attrs.pop('why')})"
        return Node(n.name, c.kind, ins, outs, attrs, params, label, target)

    def module_of(self, n: fx.Node) -> str:
        """The qualified name of the model's module whose forward holds node ``n``."""
        stack = n.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _clean_path(str(path))

    # ----------------------------------------------------------------- editing
    def set_attr(self, node: Node, key: str, value: Any) -> None:
        n = self._fx_node(node)
        if not is_aten(n):
            return super().set_attr(node, key, value)
        self._graph_edited = True  # aten attributes are node arguments
        name = packet_name(n)
        if name in ("conv1d", "conv2d", "conv3d") and key in ("groups", "stride", "dilation", "pads"):
            self._set_conv(n, node, key, value)
        elif name == "group_norm" and key == "num_groups":
            n.update_arg(1, int(value))
        elif node.kind == "split" and key == "sizes":
            self._set_split(n, node, [int(v) for v in value])
        elif node.kind == "reshape" and key == "shape":
            self._set_shape(n, node, value)
        elif name == "slice" and key == "range":
            self._set_slice(n, value)
        else:
            raise GraphError(f"cannot set `{key}` on {node} (aten.{name})")

    def _set_conv(self, n: fx.Node, node: Node, key: str, value: Any) -> None:
        args = conv_args(n)
        nd = len(node.attrs["kernel"])
        for i in (3, 4, 5):  # stride, padding, dilation: explicit per-axis lists
            if isinstance(args[i], int):
                args[i] = [args[i]] * nd
        if key == "groups":
            args[6] = int(value)
        elif key in ("stride", "dilation"):
            args[CONV_ARG_NAMES.index(key)] = [int(v) for v in value]
        else:
            padding, extra = split_pads(value)
            if isinstance(args[4], str):  # "same"/"valid" overload: explicit from now on
                n.target = getattr(_ATEN, f"conv{nd}d").default
            args[4] = list(padding)
            if extra is not None:
                with self.gm.graph.inserting_before(n):
                    padded = self.gm.graph.call_function(_ATEN.constant_pad_nd.default, (args[0], extra, 0.0))
                args[0] = padded
        n.args, n.kwargs = tuple(args), {}

    def _set_split(self, n: fx.Node, node: Node, sizes: list[int]) -> None:
        old = [self._shape_of(v)[node.attrs["axis"]] for v in node.outputs]
        if packet_name(n) == "chunk" and len(set(sizes)) == 1:
            return  # x.chunk(k) of the new width gives these sizes, in the graph and in the code
        n.target = _ATEN.split_with_sizes.default
        n.args, n.kwargs = (n.args[0], sizes, node.attrs["axis"]), {}
        self._record_literal(n, "split sizes", old, sizes)

    def _set_shape(self, n: fx.Node, node: Node, updates: Mapping[int, int]) -> None:
        """Write the reshape's full static output shape with ``updates`` applied."""
        old = list(self._shape_of(node.outputs[0]))
        new = list(old)
        for axis, size in updates.items():
            new[axis] = int(size)
        n.target = _ATEN.reshape.default
        n.args, n.kwargs = (n.args[0], new), {}
        self._record_literal(n, "reshape sizes", old, new)

    def _set_slice(self, n: fx.Node, ranges: Mapping[int, tuple[int, int]]) -> None:
        """aten.slice(x, dim, start, end, step): new bounds on its one axis."""
        ((_, (start, end)),) = ranges.items()
        old = [n.args[2] if len(n.args) > 2 else None, n.args[3] if len(n.args) > 3 else None]
        n.args, n.kwargs = (n.args[0], n.args[1], int(start), int(end), 1), {}
        self._record_literal(n, "slice bounds", old, [int(start), int(end)])

    def _record_literal(self, n: fx.Node, what: str, old: Any, new: Any) -> None:
        if old != new:
            self.edits.append(Edit("literal", n.name, self.module_of(n), what, old, new,
                                   {"stack": (n.meta.get("stack_trace") or "").strip().splitlines()[-2:]}))

    def _shape_of(self, value: str) -> tuple[int, ...]:
        n = self._fx_by_name(value)
        return tuple(n.meta["tensor_meta"].shape)

    def _fx_by_name(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise GraphError(f"node `{name}` is no longer in the graph")

    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None:
        """Replace a conv/linear by aten conv/linear nodes with new weights (see module doc)."""
        if not new:
            raise GraphError(f"{node}: replace_node needs at least one new node")
        self._graph_edited = True
        old = self._fx_node(node)
        base = node.params["weight"].rpartition(".")[0] if "weight" in node.params else node.name
        reuse = len(new) == 1
        created: list[fx.Node] = []
        keys: list[dict[str, str]] = []
        by_name = {n.name: n for n in self.gm.graph.nodes}
        with self.gm.graph.inserting_before(old):
            for i, spec in enumerate(new):
                x = resolve_input(spec, i, created, by_name, node)
                path = base if reuse else self._fresh_path(base, i)
                roles = self._register_params(path, spec.params)
                keys.append(roles)
                created.append(self._build(spec, x, roles, node))
        old.replace_all_uses_with(created[-1])
        self.gm.graph.erase_node(old)
        self.__dict__.pop("_module_cache", None)
        self.edits.append(Edit("replace", node.name, base, f"{node.kind} replaced by {len(new)} layer(s)",
                               details={"new": [(s.kind, dict(s.attrs), k) for s, k in zip(new, keys)],
                                        "inputs": [list(s.inputs) for s in new]}))

    def _fresh_path(self, base: str, i: int) -> str:
        parent, _, leaf = base.rpartition(".")
        owner = self.gm.get_submodule(parent) if parent else self.gm
        name, k = f"{leaf}_gp{i}", 0
        while hasattr(owner, name):
            k += 1
            name = f"{leaf}_gp{i}_{k}"
        return f"{parent}.{name}" if parent else name

    def _register_params(self, path: str, params: Mapping[str, Any]) -> dict[str, str]:
        """Put ``params`` at ``path.<role>`` (creating an empty module there if needed)."""
        try:
            owner = self.gm.get_submodule(path)
        except AttributeError:
            parent, _, leaf = path.rpartition(".")
            owner = nn.Module()
            (self.gm.get_submodule(parent) if parent else self.gm).add_module(leaf, owner)
        roles = {}
        for role in ("weight", "bias"):
            if role in owner._parameters:
                del owner._parameters[role]
            if role in params and params[role] is not None:
                owner.register_parameter(role, nn.Parameter(to_tensor(params[role], self._device()).clone()))
                roles[role] = f"{path}.{role}"
        return roles

    def _build(self, spec: NewNode, x: fx.Node, roles: Mapping[str, str], node: Node) -> fx.Node:
        g = self.gm.graph
        w = g.get_attr(roles["weight"])
        b = g.get_attr(roles["bias"]) if "bias" in roles else None
        if spec.kind == "linear":
            if tuple(spec.attrs.get("weight_axes", (0, 1))) != (0, 1):
                raise GraphError("new linear nodes take weight (out, in)")
            return g.call_function(_ATEN.linear.default, (x, w, b))
        if spec.kind != "conv":
            raise GraphError(f"the export frontend cannot build new `{spec.kind}` nodes (conv and linear only)")
        nd = len(spec.params["weight"].shape) - 2
        padding, extra = split_pads(spec.attrs.get("pads", (0,) * (2 * nd)))
        if extra is not None:
            x = g.call_function(_ATEN.constant_pad_nd.default, (x, extra, 0.0))
        args = (x, w, b, [int(s) for s in spec.attrs.get("stride", (1,) * nd)], list(padding),
                [int(d) for d in spec.attrs.get("dilation", (1,) * nd)], int(spec.attrs.get("groups", 1)))
        return g.call_function(getattr(_ATEN, f"conv{nd}d").default, args)

    def insert_gather(self, value: str, axis: int, index: Sequence[int], consumers: Sequence[Node]) -> None:
        """``aten.index_select`` with a constant index buffer, feeding ``consumers``."""
        before = {n.name for n in self.gm.graph.nodes}
        super().insert_gather(value, axis, index, consumers)
        for n in self.gm.graph.nodes:
            if n.name not in before and n.op == "call_function" and n.target is torch.index_select:
                n.target = _ATEN.index_select.default
                self.edits.append(Edit("gather", n.name, "", f"channel gather on `{value}`", details={
                    "value": value, "axis": axis, "index": list(index), "consumers": [c.label or c.name for c in consumers]}))

    # ---------------------------------------------------------------- copying
    def copy(self) -> "ExportFrontend":
        root = _shallow_tree(self.gm)
        gm = _graph_module(root, self.gm.graph, self.gm.__class__.__name__, lazy=True,
                           code_of=None if self._graph_edited else self.gm)
        return ExportFrontend(gm, self._inputs, self.original_training, propagate=False, edits=self.edits)

    def commit(self, resized: Mapping[Any, int] | None = None) -> None:
        self._graph_edited |= _remove_dead_aten(self.gm.graph)
        super().commit(resized)


def _remove_dead_aten(graph: fx.Graph) -> bool:
    """Erase unused aten nodes whose schema writes no argument (fx keeps random ops such
    as an eval-mode ``dropout`` alive, and with them the layers they read); True if any was."""
    erased = False
    for n in reversed(list(graph.nodes)):
        if n.users or not is_aten(n):
            continue
        schema = n.target._schema  # type: ignore[union-attr]
        if not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            graph.erase_node(n)
            erased = True
    return erased


def _clean_path(path: str) -> str:
    """``L['self'].model[22].cv2`` style paths (strict export) to ``model.22.cv2``."""
    for a, b in (("L['self'].", ""), ("L['self']", ""), ("['", "."), ("']", ""), ("[", "."), ("]", "")):
        path = path.replace(a, b)
    return path.strip(".")
