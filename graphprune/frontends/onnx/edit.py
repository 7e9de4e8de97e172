"""Edits of the ONNX graph: parameters, attributes, replacement subgraphs, channel gathers.

Edits go to the graphsurgeon graph; the frontend's ``commit`` cleans up, sorts and
re-infers shapes.  Weight arrays are replaced, never written into (a copy of the
frontend shares them with its original).

Math of the emitted replacements: ``linear`` with weight ``W`` (out, in) and bias ``b`` is
``Gemm(x, W, b, transB=1) = x W^T + b`` for 2-D ``x``, else ``MatMul(x, W^T) + b``; a
channel gather ``out[..., i, ...] = in[..., index[i], ...]`` is ``Gather(in, index, axis)``.
Setting a conv's pads makes ``auto_pad`` explicit (``NOTSET``); a Pad's pads given for the
spatial axes only get zeros for the batch and channel axes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ...arrays import as_numpy
from ...graph import GraphError, NewNode, Node
from .classify import OpContext
from .tensors import const_value, constant_node_value, swap_input

__all__ = ["OnnxEdits"]


class OnnxEdits:
    """The edit operations of :class:`~graphprune.frontends.onnx.frontend.OnnxFrontend`.

    A mixin: it works on the frontend's graphsurgeon ``graph`` and its caches, and calls
    the frontend's ``_edited`` after each edit.
    """

    graph: gs.Graph
    _index: dict[str, gs.Node]
    _fused: dict[str, gs.Node]
    _refs: dict[str, gs.Constant | gs.Node] | None
    _shapes: dict[str, tuple[int, ...] | None]

    if TYPE_CHECKING:  # provided by the frontend
        def _edited(self) -> None: ...
        def _own_graph(self) -> None: ...
        def _ops(self) -> OpContext: ...
        def _refs_map(self) -> dict[str, gs.Constant | gs.Node]: ...
        def _fresh_tensor_name(self, base: str) -> str: ...
        def _fresh_node_name(self, base: str) -> str: ...

    # ------------------------------------------------------------ parameters
    def set_param(self, key: str, value: np.ndarray) -> None:
        self._own_graph()
        ref = self._refs_map().get(key)
        if ref is None:
            raise GraphError(f"no constant named `{key}` in the ONNX graph")
        old_dtype = ref.values.dtype if isinstance(ref, gs.Constant) else constant_node_value(ref).dtype
        array = np.ascontiguousarray(as_numpy(value).astype(old_dtype, copy=False))
        if isinstance(ref, gs.Constant):
            ref.values = array
        else:
            ref.attrs = {"value": gs.Constant(key, array)}
        self._edited()

    # ------------------------------------------------------------ attributes
    def _gs_node(self, node: Node) -> gs.Node:
        found = self._index.get(node.name)
        if found is None or found not in self.graph.nodes:
            found = next((n for n in self.graph.nodes if n.name == node.name), None)
        if found is None:
            raise GraphError(f"{node} is not a node of the ONNX graph (any more)")
        return found

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        self._own_graph()
        n = self._gs_node(node)
        setter = SETTERS.get((n.op, key))
        if setter is None:
            raise GraphError(f"cannot set `{key}` on {node} (ONNX {n.op})")
        setter(self, n, value)
        self._edited()

    def _sync_kernel_shapes(self) -> None:
        """Conv kernel_shape follows the (possibly shrunk) weight."""
        for n in self.graph.nodes:
            if n.op in ("Conv", "ConvTranspose") and "kernel_shape" in n.attrs and len(n.inputs) > 1:
                value = const_value(n.inputs[1])
                if value is not None:
                    n.attrs["kernel_shape"] = [int(k) for k in value.shape[2:]]

    # ------------------------------------------------------------ subgraphs
    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None:
        """Replace ``node`` by ``new`` (kinds ``conv``, ``linear``); the last new node's output
        keeps the replaced node's output name."""
        self._own_graph()
        old = self._gs_node(node)
        if not new:
            raise GraphError(f"replace_node({node}): no new nodes")
        tensors = self.graph.tensors()
        made: list[gs.Tensor] = []
        ranks: list[int] = []
        emitted: list[gs.Node] = []
        absorbed = self._fused.get(old.name)
        final_out = absorbed.outputs[0] if absorbed is not None else old.outputs[0]
        for i, spec in enumerate(new):
            ins = []
            for ref in spec.inputs:
                if ref.startswith("%"):
                    ins.append(made[int(ref[1:])])
                elif ref in tensors:
                    ins.append(tensors[ref])
                else:
                    raise GraphError(f"replace_node({node}): no value named `{ref}`")
            x = ins[0]
            rank = ranks[made.index(x)] if x in made else len(self._shapes.get(x.name) or ())
            if not rank:
                raise GraphError(f"replace_node({node}): the rank of input `{x.name}` is unknown")
            last = i == len(new) - 1
            out = final_out if last else gs.Variable(self._fresh_tensor_name(f"{old.name}/gp{i}_output"))
            base = self._fresh_node_name(f"{old.name}/gp{i}")
            emitted.extend(self._emit(spec, ins, out, base, rank))
            made.append(out)
            ranks.append(rank)
        for gone in (old, absorbed):
            if gone is not None:
                gone.outputs.clear()
                gone.inputs.clear()
        self.graph.nodes.extend(emitted)
        self.graph.toposort()
        self._refs = None
        self._edited()

    def _emit(self, spec: NewNode, ins: list[gs.Tensor], out: gs.Variable, base: str, rank: int) -> list[gs.Node]:
        """The ONNX nodes of one new node: a Conv, a Gemm (2-D input) or MatMul [+ Add]."""
        def const(role: str, value: np.ndarray) -> gs.Constant:
            array = as_numpy(value)
            return gs.Constant(self._fresh_tensor_name(f"{base}.{role}"), np.ascontiguousarray(array))

        w = as_numpy(spec.params["weight"])
        b = spec.params.get("bias")
        if spec.kind == "conv":
            nd = w.ndim - 2
            attrs = {
                "group": int(spec.attrs.get("groups", 1)),
                "strides": [int(s) for s in spec.attrs.get("stride", (1,) * nd)],
                "dilations": [int(d) for d in spec.attrs.get("dilation", (1,) * nd)],
                "pads": [int(p) for p in spec.attrs.get("pads", (0,) * (2 * nd))],
                "kernel_shape": [int(k) for k in w.shape[2:]],
            }
            inputs = [ins[0], const("weight", w)] + ([const("bias", b)] if b is not None else [])
            return [gs.Node("Conv", base, attrs, inputs=inputs, outputs=[out])]
        if spec.kind == "linear":
            if rank == 2:
                inputs = [ins[0], const("weight", w)] + ([const("bias", b)] if b is not None else [])
                return [gs.Node("Gemm", base, {"transB": 1}, inputs=inputs, outputs=[out])]
            wt = np.ascontiguousarray(w.T)
            if b is None:
                return [gs.Node("MatMul", base, {}, inputs=[ins[0], const("weight", wt)], outputs=[out])]
            mid = gs.Variable(self._fresh_tensor_name(f"{base}/MatMul_output"))
            return [
                gs.Node("MatMul", base, {}, inputs=[ins[0], const("weight", wt)], outputs=[mid]),
                gs.Node("Add", self._fresh_node_name(f"{base}/bias"), {}, inputs=[mid, const("bias", b)], outputs=[out]),
            ]
        raise GraphError(f"the ONNX frontend cannot create a `{spec.kind}` node")

    def insert_gather(self, value: str, axis: int, index: Sequence[int], consumers: Sequence[Node]) -> None:
        """``Gather(value, index, axis)`` feeding only ``consumers``."""
        self._own_graph()
        src = self.graph.tensors().get(value)
        if src is None:
            raise GraphError(f"insert_gather: no value named `{value}`")
        base = self._fresh_node_name(f"{value}/gp_gather")
        idx = gs.Constant(self._fresh_tensor_name(f"{base}.index"), np.asarray(list(index), dtype=np.int64))
        out = gs.Variable(self._fresh_tensor_name(f"{value}_gathered"))
        self.graph.nodes.append(gs.Node("Gather", base, {"axis": int(axis)}, inputs=[src, idx], outputs=[out]))
        for c in consumers:
            swap_input(self._gs_node(c), src, out)
        self.graph.toposort()
        self._edited()


# ------------------------------------------------------------------ setters
Setter = Callable[[OnnxEdits, gs.Node, Any], None]

_CONV_KEYS = {"groups": "group", "stride": "strides", "dilation": "dilations", "pads": "pads", "kernel": "kernel_shape"}


def _conv_setter(key: str) -> Setter:
    """Set a conv attribute given in view terms (``groups``, ``stride``, ...)."""
    def setter(fe: OnnxEdits, n: gs.Node, value: Any) -> None:
        n.attrs[_CONV_KEYS[key]] = int(value) if key == "groups" else [int(v) for v in value]
        if key == "pads":
            n.attrs["auto_pad"] = "NOTSET"

    return setter


def set_pad_pads(fe: OnnxEdits, n: gs.Node, value: Sequence[int]) -> None:
    """A Pad's pads, all axes or spatial axes only; a pads input replaces ``axes``."""
    rank = fe._ops().rank(n.inputs[0])
    value = [int(v) for v in value]
    if len(value) == 2 * (rank - 2):
        half = rank - 2
        value = [0, 0] + value[:half] + [0, 0] + value[half:]
    if len(n.inputs) > 1:
        const = gs.Constant(fe._fresh_tensor_name(f"{n.name}.pads"), np.asarray(value, dtype=np.int64))
        n.inputs[1] = const
        if len(n.inputs) > 3 and n.inputs[3].name:
            n.inputs[3] = gs.Variable.empty()
    else:
        n.attrs["pads"] = value


def set_split_sizes(fe: OnnxEdits, n: gs.Node, sizes: Sequence[int]) -> None:
    """Split sizes: an attribute before opset 13, an input since."""
    sizes = [int(s) for s in sizes]
    n.attrs.pop("num_outputs", None)
    if fe._ops().opset() < 13:
        n.attrs["split"] = sizes
        return
    const = gs.Constant(fe._fresh_tensor_name(f"{n.name}.split"), np.asarray(sizes, dtype=np.int64))
    if len(n.inputs) > 1:
        n.inputs[1] = const
    else:
        n.inputs.append(const)


def set_reshape_shape(fe: OnnxEdits, n: gs.Node, updates: Mapping[int, int]) -> None:
    """Rewrite the target-shape constant at the given axes; -1 and 0 entries stay (they
    follow the input)."""
    if n.op == "Flatten":
        return  # Flatten computes its output shape from its input
    target = n.inputs[1]
    if fe._ops().fold(target) is None and len(target.inputs) == 1 and target.inputs[0].op == "Shape":
        return  # Reshape(y, Shape(x)) follows x, which lost the same channels
    shape = fe._ops().fold(n.inputs[1])
    if shape is None:
        raise GraphError(f"cannot resize reshape `{n.name}`: its target shape is computed at run time")
    shape = np.array(shape, dtype=np.int64).reshape(-1)
    for axis, size in updates.items():
        if shape[axis] not in (-1, 0):
            shape[axis] = int(size)
    n.inputs[1] = gs.Constant(fe._fresh_tensor_name(f"{n.name}.shape"), shape)


def set_slice_range(fe: OnnxEdits, n: gs.Node, ranges: Mapping[int, tuple[int, int]]) -> None:
    """New (start, end) of a Slice on the given axes: its starts/ends inputs (opset >= 10)
    or attributes get the bounds at those axes' positions."""
    ops = fe._ops()
    rank = ops.rank(n.inputs[0])
    if "starts" in n.attrs:
        starts, ends = list(n.attrs["starts"]), list(n.attrs["ends"])
        axes = list(n.attrs.get("axes", range(len(starts))))
    else:
        starts = ops.fold(n.inputs[1]).reshape(-1).tolist()  # type: ignore[union-attr]
        ends = ops.fold(n.inputs[2]).reshape(-1).tolist()  # type: ignore[union-attr]
        given = ops.fold(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
        axes = given.reshape(-1).tolist() if given is not None else list(range(len(starts)))
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes]
    for axis, (start, end) in ranges.items():
        i = axes.index(axis)
        starts[i], ends[i] = int(start), int(end)
    if "starts" in n.attrs:
        n.attrs["starts"], n.attrs["ends"] = starts, ends
        return
    n.inputs[1] = gs.Constant(fe._fresh_tensor_name(f"{n.name}.starts"), np.asarray(starts, dtype=np.int64))
    n.inputs[2] = gs.Constant(fe._fresh_tensor_name(f"{n.name}.ends"), np.asarray(ends, dtype=np.int64))


def set_groupnorm(fe: OnnxEdits, n: gs.Node, value: int) -> None:
    """GroupNormalization's group count."""
    n.attrs["num_groups"] = int(value)


SETTERS: dict[tuple[str, str], Setter] = {
    **{(op, key): _conv_setter(key) for op in ("Conv", "ConvTranspose") for key in _CONV_KEYS},
    ("Pad", "pads"): set_pad_pads,
    ("Split", "sizes"): set_split_sizes,
    ("Reshape", "shape"): set_reshape_shape,
    ("Flatten", "shape"): set_reshape_shape,
    ("GroupNormalization", "num_groups"): set_groupnorm,
    ("Slice", "range"): set_slice_range,
}
