"""The ONNX frontend: read an ONNX model with onnx-graphsurgeon and expose it as a :class:`Graph`.

Loading
    ``load_onnx`` parses the file (external data resolved relative to it), checks its
    structure, fixes every dynamic input dimension from ``input_shapes`` (analysis needs
    concrete shapes; the saved file gets its symbolic dimensions back), and normalises two
    exporter habits that would otherwise hide weights: ``Identity(initializer)`` (the
    TorchScript exporter's way of sharing equal tensors) becomes an initializer of its
    own, and a constant read by several ops gets one copy per reader.  Both are undone on
    save for tensors that are still equal, so an unmodified model keeps its initializers.

View
    Every ONNX node is one view node with a canonical kind (the table in
    :mod:`graphprune.graph`), except ``MatMul(x, W) + b`` with constant ``W`` (in, out) and
    1-D ``b``, which is one ``linear`` node with a bias, as a Gemm is.  A constant that an
    op reads as data (an ``Add``'s offset, a ``Mul``'s scale, a ``Gather``'s index) is a
    ``constant`` view node whose param ``value`` rules can slice.  Attribute-like inputs
    (target shapes, pads, axes, split sizes) that an exporter computes from constants are
    evaluated once with the ONNX reference evaluator.  Param keys are initializer names,
    or the output name of a ``Constant`` node.  Ops the frontend cannot describe exactly
    become ``unknown`` and their ``target`` says why (``"Conv: weight `w` is a graph
    input"``), which ``graphprune inspect`` prints.

Shapes
    ONNX shape inference (strict, with data propagation; lenient if strict fails) on the
    fixed input shapes, run on a copy whose large initializers carry no data; values it
    cannot type are measured by running onnxruntime with them exposed as outputs.

Editing and running
    Edits go to the graphsurgeon graph; :meth:`OnnxFrontend.commit` cleans up, sorts and
    re-infers shapes.  :meth:`OnnxFrontend.run` uses an onnxruntime CPU session with graph
    optimisations disabled (so the numbers are the graph's own), cached until the next edit.
    A copy shares weight arrays with its original: edits replace arrays, never write into them.

Math of the emitted replacements: ``linear`` with weight ``W`` (out, in) and bias ``b`` is
``Gemm(x, W, b, transB=1) = x W^T + b`` for 2-D ``x``, else ``MatMul(x, W^T) + b``; a
channel gather ``out[..., i, ...] = in[..., index[i], ...]`` is ``Gather(in, index, axis)``;
``auto_pad=SAME_*`` becomes explicit pads ``total = max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)``.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..graph import Graph, GraphError, NewNode, Node, ValueInfo

logger = logging.getLogger(__name__)

__all__ = ["OnnxFrontend", "OnnxLoadError", "load_onnx"]

EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)  # bytes: larger models are saved with external data
_STRIP_NUMEL = 1024  # initializers above this size are sent to shape inference without data


class OnnxLoadError(GraphError):
    """A file that is not a readable ONNX model, or a model graphprune cannot analyse."""


# ------------------------------------------------------------------ op tables
# activation -> f(0) == 0 (ops whose answer depends on attributes are handled below)
_ACTIVATIONS: dict[str, bool] = {
    "Relu": True, "LeakyRelu": True, "Elu": True, "Selu": True, "Celu": True, "Tanh": True,
    "Erf": True, "Gelu": True, "HardSwish": True, "Mish": True, "Softsign": True, "Abs": True,
    "Neg": True, "Sin": True, "Sqrt": True, "Floor": True, "Ceil": True, "Round": True,
    "Sign": True, "ThresholdedRelu": True, "Atan": True, "Asin": True, "Sinh": True,
    "Asinh": True, "Atanh": True, "Tan": True,
    "Sigmoid": False, "Softplus": False, "Exp": False, "Log": False, "Reciprocal": False,
    "Cos": False, "Cosh": False, "Acos": False, "Not": False,
}
_POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "LpPool", "GlobalLpPool"}
_BINARY_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Sum": "add"}
_REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare"}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_RECURRENT = {"LSTM", "GRU", "RNN"}
_DEFAULT_DOMAINS = ("", "ai.onnx")


class _Unknown(Exception):
    """Raised by a classifier: the op becomes ``unknown`` with this reason."""


@dataclass
class _Spec:
    """What a classifier found: canonical kind, data inputs, attrs and params."""

    kind: str
    inputs: list[gs.Tensor]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    outputs: list[gs.Tensor] | None = None  # when the view node ends at another op's output


# ------------------------------------------------------------------- loading
def load_onnx(
    path_or_model: str | os.PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    external_data_dir: str | os.PathLike | None = None,
) -> Graph:
    """Load an ONNX model as a graphprune :class:`Graph`.

    ``input_shapes`` fixes dynamic input dimensions (``{"input": (1, 3, 224, 224)}``);
    ``external_data_dir`` is where external tensor data lives when it is not beside the
    file (or when a ``ModelProto`` with external references is given).
    """
    model, source = _read_model(path_or_model, external_data_dir)
    return Graph(OnnxFrontend(model, input_shapes or {}, source=source))


def _read_model(
    path_or_model: str | os.PathLike | onnx.ModelProto, external_data_dir: str | os.PathLike | None
) -> tuple[onnx.ModelProto, str]:
    from google.protobuf.message import DecodeError

    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
        if external_data_dir is not None:
            onnx.external_data_helper.load_external_data_for_model(model, os.fspath(external_data_dir))
        source = "<model>"
    else:
        source = os.fspath(path_or_model)
        if not os.path.exists(source):
            raise FileNotFoundError(f"no such file: `{source}`")
        if os.path.isdir(source):
            raise OnnxLoadError(f"`{source}` is a folder, not an ONNX file")
        try:
            model = onnx.load(source, load_external_data=external_data_dir is None)
            if external_data_dir is not None:
                onnx.external_data_helper.load_external_data_for_model(model, os.fspath(external_data_dir))
        except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
            raise OnnxLoadError(f"`{source}` is not a valid ONNX file (not a model, truncated or corrupt): {exc}") from exc
        except (FileNotFoundError, OSError, onnx.checker.ValidationError) as exc:
            raise OnnxLoadError(f"cannot read `{source}` or its external data: {str(exc).splitlines()[0]}") from exc
    if not model.graph.node and not model.graph.output:
        raise OnnxLoadError(f"`{source}` is not an ONNX model: it has no graph (empty or a different file type)")
    if not model.opset_import:
        raise OnnxLoadError(f"`{source}` is not a valid ONNX model: it declares no opset")
    try:
        onnx.checker.check_model(_light_copy(model))
    except onnx.checker.ValidationError as exc:
        raise OnnxLoadError(f"`{source}` is not a valid ONNX model (truncated or corrupt?): {str(exc).splitlines()[0]}") from exc
    return model, source


def _model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its graph: opsets, IR version, producer, metadata, doc string."""
    shell = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(fld):
            setattr(shell, fld, getattr(model, fld))
    shell.opset_import.extend(model.opset_import)
    shell.metadata_props.extend(model.metadata_props)
    return shell


def _static_dims(shape: Sequence[Any] | None) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


def _fix_input_shapes(graph: gs.Graph, given: Mapping[str, Sequence[int]], source: str) -> None:
    """Replace every graph input's dynamic dims with the user's ``input_shapes``."""
    names = [t.name for t in graph.inputs if isinstance(t, gs.Variable)]
    for name in given:
        if name not in names:
            raise OnnxLoadError(f"--input-shape names `{name}`, but `{source}` has no such input (inputs: {', '.join(names)})")
    for t in graph.inputs:
        if not isinstance(t, gs.Variable):
            continue
        want = given.get(t.name)
        shape = list(t.shape) if t.shape is not None else None
        if want is not None:
            want = [int(d) for d in want]
            if shape is not None and len(shape) != len(want):
                raise OnnxLoadError(
                    f"input `{t.name}` has rank {len(shape)} ({_fmt_shape(shape)}), but --input-shape gives {len(want)} dims"
                )
            for axis, (old, new) in enumerate(zip(shape or want, want)):
                if isinstance(old, (int, np.integer)) and old > 0 and old != new:
                    raise OnnxLoadError(f"input `{t.name}` has fixed size {old} on axis {axis}, but --input-shape gives {new}")
                if new <= 0:
                    raise OnnxLoadError(f"--input-shape for `{t.name}` must be positive, got {new} on axis {axis}")
            t.shape = want
        elif not _static_dims(shape):
            example = ",".join(str(d) if isinstance(d, (int, np.integer)) and d > 0 else "N" for d in (shape or ["N"]))
            raise OnnxLoadError(
                f"input `{t.name}` has dynamic shape {_fmt_shape(shape)}: fix it with "
                f"--input-shape {t.name}:{example} (input_shapes={{'{t.name}': (...)}} in Python)"
            )


def _fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    return "(" + ", ".join("?" if d is None or d == -1 else str(d) for d in shape) + ")"


# ------------------------------------------------------------------ frontend
class OnnxFrontend:
    """Reads and edits an ONNX model held as an onnx-graphsurgeon graph."""

    name = "onnx"

    def __init__(self, model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], source: str = "<model>") -> None:
        self.source = source
        self._shell = _model_shell(model)
        self._io_protos = {v.name: _copy.deepcopy(v) for v in list(model.graph.input) + list(model.graph.output)}
        self._node_docs = {
            n.name: (n.doc_string, list(n.metadata_props))
            for n in model.graph.node if n.name and (n.doc_string or len(n.metadata_props))
        }
        try:
            self.graph: gs.Graph = gs.import_onnx(model)
        except Exception as exc:
            raise OnnxLoadError(f"cannot import `{source}`: {exc}") from exc
        _fix_input_shapes(self.graph, input_shapes, source)
        self._copies: dict[str, str] = {}  # constant copy name -> the name it was copied from
        self._name_nodes()
        self._prepare()
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._dtypes: dict[str, str] = {}
        self._reset_caches()
        self._infer()
        self._inputs = self._make_example_inputs()

    # ----------------------------------------------------------- normalising
    def _name_nodes(self) -> None:
        """Give every node a unique name (view nodes are addressed by it)."""
        seen: set[str] = set()
        for i, node in enumerate(self.graph.nodes):
            base = node.name or f"{node.op}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}__{k}", k + 1
            node.name = name
            seen.add(name)

    def _prepare(self) -> None:
        """Clear stale intermediate shapes, fold Identity-of-constant, unshare constants."""
        for name, t in self.graph.tensors().items():
            if isinstance(t, gs.Variable) and t not in self.graph.inputs and t not in self.graph.outputs:
                t.shape, t.dtype = None, None
        for t in self.graph.outputs:
            t.shape = None
        self._fold_constant_identities()
        self._unshare_constants()
        self._normalise_gemm_bias()
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()

    def _fold_constant_identities(self) -> None:
        """``y = Identity(c)`` with constant ``c`` becomes an initializer ``y`` (a copy of c)."""
        for node in list(self.graph.nodes):
            if node.op != "Identity" or not _is_default(node) or len(node.inputs) != 1:
                continue
            value = self._const_value(node.inputs[0])
            out = node.outputs[0]
            if value is None or out in self.graph.outputs:
                continue
            const = gs.Constant(out.name, np.array(value))
            self._copies[out.name] = self._const_key(node.inputs[0])  # type: ignore[assignment]
            for consumer in list(out.outputs):
                _swap_input(consumer, out, const)
            node.outputs.clear()
            node.inputs.clear()

    def _unshare_constants(self) -> None:
        """Give each reader of a shared constant (more than one element) its own copy.

        Sharing is storage, not meaning: an exporter merges equal tensors.  With copies each
        op's weights can be sliced on their own; :meth:`_remerge` restores sharing on save.
        """
        seen: set[str] = set()
        for node in self.graph.nodes:
            for i, t in enumerate(node.inputs):
                key = self._const_key(t)
                if key is None:
                    continue
                shape = self._shape(t)
                if shape is None or math.prod(shape) <= 1:
                    continue
                if key not in seen:
                    seen.add(key)
                    continue
                name = self._fresh_tensor_name(f"{key}__copy")
                self._copies[name] = key
                node.inputs[i] = gs.Constant(name, np.array(self._const_value(t)))

    def _normalise_gemm_bias(self) -> None:
        """A Gemm bias of shape (1, N) broadcasts like (N,); store it as (N,)."""
        for node in self.graph.nodes:
            if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                c = node.inputs[2]
                if c.values.ndim == 2 and c.values.shape[0] == 1 and len(c.outputs) == 1:
                    c.values = c.values.reshape(-1)

    # ---------------------------------------------------------------- caches
    def _reset_caches(self) -> None:
        self._session_cache: Any = None
        self._refs: dict[str, gs.Constant | gs.Node] | None = None
        self._index: dict[str, gs.Node] = {}
        self._fused: dict[str, gs.Node] = {}  # linear view node (MatMul) -> the bias Add it absorbs
        self._folded: dict[str, np.ndarray | None] = {}

    def _edited(self) -> None:
        self._session_cache = None
        self._folded = {}

    def _tensor_map(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def _fresh_tensor_name(self, base: str) -> str:
        names = set(self._tensor_map())
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        return name

    def _fresh_node_name(self, base: str) -> str:
        names = {n.name for n in self.graph.nodes}
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        return name

    # ------------------------------------------------------------- constants
    @staticmethod
    def _constant_node(t: gs.Tensor) -> gs.Node | None:
        """The ``Constant`` op producing ``t``, if any."""
        if isinstance(t, gs.Variable) and len(t.inputs) == 1:
            prod = t.inputs[0]
            if prod.op == "Constant" and _is_default(prod) and len(prod.outputs) == 1:
                return prod
        return None

    def _const_key(self, t: gs.Tensor) -> str | None:
        """Param key of ``t`` if it is a constant (initializer or Constant output)."""
        if isinstance(t, gs.Constant):
            return t.name
        if self._constant_node(t) is not None:
            return t.name
        return None

    def _const_value(self, t: gs.Tensor) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        node = self._constant_node(t)
        return None if node is None else _constant_node_value(node)

    def _fold(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of ``t`` when it is computed from constants alone (an exporter's
        arithmetic on shapes and pads), evaluated once with the ONNX reference evaluator."""
        value = self._const_value(t)
        if value is not None or not t.name:
            return value
        if t.name in self._folded:
            return self._folded[t.name]
        nodes = _constant_ancestry(t)
        result = None
        if nodes is not None:
            try:
                result = _evaluate(nodes, t, self._shell.opset_import)
            except Exception as exc:  # an op the reference evaluator lacks
                logger.debug("cannot evaluate constant `%s`: %s", t.name, exc)
        self._folded[t.name] = result
        return result

    def _refs_map(self) -> dict[str, gs.Constant | gs.Node]:
        if self._refs is None:
            refs: dict[str, gs.Constant | gs.Node] = {}
            for node in self.graph.nodes:
                if node.op == "Constant" and _is_default(node) and len(node.outputs) == 1:
                    refs[node.outputs[0].name] = node
                for t in node.inputs:
                    if isinstance(t, gs.Constant):
                        refs[t.name] = t
            self._refs = refs
        return self._refs

    def get_param(self, key: str) -> torch.Tensor:
        ref = self._refs_map().get(key)
        if ref is None:
            raise GraphError(f"no constant named `{key}` in the ONNX graph")
        value = np.asarray(ref.values) if isinstance(ref, gs.Constant) else _constant_node_value(ref)
        if not value.flags.writeable or value.dtype.byteorder not in "=|":
            value = np.array(value, copy=True)
        return torch.from_numpy(value)  # shared: weights are replaced, never written in place

    def set_param(self, key: str, value: torch.Tensor) -> None:
        ref = self._refs_map().get(key)
        if ref is None:
            raise GraphError(f"no constant named `{key}` in the ONNX graph")
        old_dtype = ref.values.dtype if isinstance(ref, gs.Constant) else _constant_node_value(ref).dtype
        array = np.ascontiguousarray(value.detach().cpu().numpy().astype(old_dtype, copy=False))
        if isinstance(ref, gs.Constant):
            ref.values = array
        else:
            ref.attrs = {"value": gs.Constant(key, array)}
        self._edited()

    # ------------------------------------------------------------------ view
    def view(self) -> tuple[list[Node], dict[str, ValueInfo], list[str], list[str]]:
        self._refs = None
        self._index = {n.name: n for n in self.graph.nodes}
        values: dict[str, ValueInfo] = {}
        for name, t in self._tensor_map().items():
            if isinstance(t, gs.Variable) and name:
                values[name] = ValueInfo(name, self._shapes.get(name), self._dtypes.get(name))
        specs = [(node, self._classify(node)) for node in self.graph.nodes]
        absorbed = self._fuse_bias_adds(specs)
        specs = [(node, spec) for node, spec in specs if node.name not in absorbed]
        data_constants = {t.name: t for _, s in specs for t in s.inputs if self._const_key(t) is not None}
        nodes: list[Node] = []
        emitted: set[str] = set()
        for node, spec in specs:
            if node.op == "Constant" and spec.kind == "constant" and node.outputs[0].name not in data_constants:
                continue  # a constant read only as a weight or an attribute-like operand
            for t in spec.inputs:
                if isinstance(t, gs.Constant) and t.name not in emitted:
                    emitted.add(t.name)
                    values[t.name] = ValueInfo(t.name, tuple(int(d) for d in t.shape), str(np.dtype(t.dtype)))
                    nodes.append(Node(f"init:{t.name}", "constant", [], [t.name], {}, {"value": t.name}, t.name, "initializer"))
            outs = spec.outputs if spec.outputs is not None else node.outputs
            nodes.append(Node(
                node.name, spec.kind, [t.name for t in spec.inputs], [t.name for t in outs],
                spec.attrs, spec.params, node.name, spec.attrs.pop("_target", _op_name(node)),
            ))
        inputs = [t.name for t in self.graph.inputs if isinstance(t, gs.Variable)]
        outputs = [t.name for t in self.graph.outputs]
        return nodes, values, inputs, outputs

    def _fuse_bias_adds(self, specs: list[tuple[gs.Node, _Spec]]) -> set[str]:
        """``MatMul(x, W) + b`` with constant 1-D ``b`` is one linear view node with a bias
        (as a Gemm is): the Add is absorbed and the view node ends at its output."""
        self._fused = {}
        for node, spec in specs:
            if node.op != "MatMul" or spec.kind != "linear":
                continue
            out = node.outputs[0]
            if len(out.outputs) != 1 or out in self.graph.outputs:
                continue
            add = out.outputs[0]
            if add.op != "Add" or not _is_default(add) or len(add.inputs) != 2:
                continue
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            key = self._const_key(other)
            value = self._const_value(other)
            n_out = self._shape(node.inputs[1])[1]  # type: ignore[index]
            if key is None or value is None or value.shape != (n_out,) or len(other.outputs) != 1:
                continue
            spec.params["bias"] = key
            spec.outputs = [add.outputs[0]]
            self._fused[node.name] = add
        return {add.name for add in self._fused.values()}

    def _classify(self, node: gs.Node) -> _Spec:
        try:
            spec = self._classify_known(node)
            used = [t for t in node.outputs if t.outputs or t in self.graph.outputs]
            for t in [*spec.inputs, *used]:
                if spec.kind != "constant" and t.name and self._shape(t) is None:
                    raise _Unknown(f"the shape of `{t.name}` is unknown (neither shape inference nor onnxruntime could tell)")
            return spec
        except _Unknown as why:
            data = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name and self._constant_node(t) is None]
            data += [t for t in _outer_scope_inputs(node) if t not in data]
            reason = str(why)
            return _Spec("unknown", data, {"reason": reason, "_target": f"{_op_name(node)}: {reason}"})

    def _classify_known(self, node: gs.Node) -> _Spec:
        if not _is_default(node):
            raise _Unknown(f"custom-domain op `{node.domain}::{node.op}` (no channel rule)")
        op = node.op
        if op in _CONTROL_FLOW:
            raise _Unknown("control flow with subgraphs (channels used inside are kept)")
        if op in _RECURRENT:
            raise _Unknown("recurrent op (its gates mix channels)")
        fn = _CLASSIFIERS.get(op)
        if fn is not None:
            return fn(self, node)
        if op in _ACTIVATIONS:
            return _Spec("act", [node.inputs[0]], {"fn": op.lower(), "zero_preserving": _ACTIVATIONS[op]})
        if op in _BINARY_OPS:
            return self._binary(node)
        if op in _POOL_OPS:
            return self._pool(node)
        if op in _REDUCE_OPS:
            return self._reduce(node)
        raise _Unknown("no channel rule for this op")

    # -------------------------------------------------------- classifiers
    def _shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        value = self._const_value(t)
        if value is not None:
            return tuple(int(d) for d in value.shape)
        return self._shapes.get(t.name)

    def _rank(self, t: gs.Tensor) -> int:
        shape = self._shape(t)
        if shape is None:
            raise _Unknown(f"the rank of `{t.name}` is unknown")
        return len(shape)

    def _weight(self, node: gs.Node, index: int, what: str) -> str:
        """The param key of input ``index`` (a weight), or raise _Unknown saying why not."""
        if index >= len(node.inputs) or not node.inputs[index].name:
            raise _Unknown(f"{what} is missing")
        t = node.inputs[index]
        key = self._const_key(t)
        if key is not None:
            return key
        if t in self.graph.inputs:
            raise _Unknown(f"{what} `{t.name}` is a graph input")
        producer = t.inputs[0].op if t.inputs else "?"
        raise _Unknown(f"{what} `{t.name}` is computed by {producer}, not a constant")

    def _optional_weight(self, node: gs.Node, index: int, what: str) -> str | None:
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        return self._weight(node, index, what)

    def _input_const(self, node: gs.Node, index: int, what: str) -> np.ndarray | None:
        """Value of an attribute-like constant input (shape, axes, pads); None if absent."""
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        value = self._fold(node.inputs[index])
        if value is None:
            raise _Unknown(f"its {what} input is computed at run time, not a constant")
        return value

    def _conv(self, node: gs.Node) -> _Spec:
        kind = "conv" if node.op == "Conv" else "conv_transpose"
        w = self._weight(node, 1, "weight")
        params = {"weight": w}
        b = self._optional_weight(node, 2, "bias")
        if b is not None:
            params["bias"] = b
        wshape = self._shape(node.inputs[1])
        nd = len(wshape) - 2  # type: ignore[arg-type]
        attrs = {
            "groups": int(node.attrs.get("group", 1)),
            "stride": tuple(int(s) for s in node.attrs.get("strides", [1] * nd)),
            "dilation": tuple(int(d) for d in node.attrs.get("dilations", [1] * nd)),
            "kernel": tuple(int(k) for k in wshape[2:]),  # type: ignore[index]
            "pads": self._conv_pads(node, nd, wshape),
        }
        return _Spec(kind, [node.inputs[0]], attrs, params)

    def _conv_pads(self, node: gs.Node, nd: int, wshape: tuple[int, ...] | None) -> tuple[int, ...]:
        """Explicit pads; ``auto_pad=SAME_*`` resolved from shapes:
        total_i = max((ceil(in_i / s_i) - 1) * s_i + (k_i - 1) * d_i + 1 - in_i, 0)."""
        auto = node.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("NOTSET", ""):
            return tuple(int(p) for p in node.attrs.get("pads", [0] * (2 * nd)))
        if auto == "VALID" or node.op != "Conv":
            return (0,) * (2 * nd)
        xshape = self._shape(node.inputs[0])
        if xshape is None or wshape is None:
            raise _Unknown("auto_pad needs the input shape, which is unknown")
        strides = node.attrs.get("strides", [1] * nd)
        dils = node.attrs.get("dilations", [1] * nd)
        total = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0) for i, s, k, d in zip(xshape[2:], strides, wshape[2:], dils)]
        small = [t // 2 for t in total]
        large = [t - t // 2 for t in total]
        return tuple(small + large) if auto == "SAME_UPPER" else tuple(large + small)

    def _gemm(self, node: gs.Node) -> _Spec:
        if int(node.attrs.get("transA", 0)):
            raise _Unknown("Gemm with transA=1")
        if float(node.attrs.get("alpha", 1.0)) != 1.0:
            raise _Unknown("Gemm with alpha != 1")
        if self._rank(node.inputs[0]) != 2:
            raise _Unknown("Gemm input is not 2-D")
        params = {"weight": self._weight(node, 1, "weight")}
        bias = self._optional_weight(node, 2, "bias")
        if bias is not None:
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                raise _Unknown("Gemm with beta != 1")
            n_out = self._shape(node.outputs[0])
            bshape = self._shape(node.inputs[2])
            if n_out is None or bshape != (n_out[-1],):
                raise _Unknown(f"Gemm bias of shape {bshape} is not one value per output")
            params["bias"] = bias
        axes = (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)
        return _Spec("linear", [node.inputs[0]], {"weight_axes": axes}, params)

    def _matmul(self, node: gs.Node) -> _Spec:
        a, b = node.inputs[0], node.inputs[1]
        key = self._const_key(b)
        if key is not None and len(self._shape(b) or ()) == 2 and self._rank(a) >= 2:
            return _Spec("linear", [a], {"weight_axes": (1, 0)}, {"weight": key})
        return _Spec("matmul", [t for t in (a, b) if self._const_key(t) is None])

    def _batchnorm(self, node: gs.Node) -> _Spec:
        if int(node.attrs.get("training_mode", 0)):
            raise _Unknown("BatchNormalization in training mode")
        if any(o.outputs or o in self.graph.outputs for o in node.outputs[1:] if o.name):
            raise _Unknown("BatchNormalization's running statistics outputs are used")
        roles = ("weight", "bias", "running_mean", "running_var")
        params = {r: self._weight(node, i + 1, r) for i, r in enumerate(roles)}
        return _Spec("batchnorm", [node.inputs[0]], {"eps": float(node.attrs.get("epsilon", 1e-5))}, params)

    def _instancenorm(self, node: gs.Node) -> _Spec:
        params = {"weight": self._weight(node, 1, "scale"), "bias": self._weight(node, 2, "bias")}
        return _Spec("batchnorm", [node.inputs[0]], {"eps": float(node.attrs.get("epsilon", 1e-5)), "instance": True}, params)

    def _layernorm(self, node: gs.Node) -> _Spec:
        rank = self._rank(node.inputs[0])
        axis = int(node.attrs.get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        params = {"weight": self._weight(node, 1, "scale")}
        bias = self._optional_weight(node, 2, "bias")
        if bias is not None:
            params["bias"] = bias
        attrs = {"normalized_ndim": rank - axis, "eps": float(node.attrs.get("epsilon", 1e-5))}
        return _Spec("layernorm", [node.inputs[0]], attrs, params)

    def _groupnorm(self, node: gs.Node) -> _Spec:
        x = node.inputs[0]
        shape = self._shape(x)
        scale = self._shape(node.inputs[1])
        if shape is None or scale != (shape[1],):
            raise _Unknown("GroupNormalization with one scale per group (opset < 21 form)")
        params = {"weight": self._weight(node, 1, "scale"), "bias": self._weight(node, 2, "bias")}
        return _Spec("groupnorm", [x], {"num_groups": int(node.attrs["num_groups"])}, params)

    def _clip(self, node: gs.Node) -> _Spec:
        """Clip is zero preserving iff min <= 0 <= max."""
        lo, hi = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
        zero = True
        for index, default in ((1, lo), (2, hi)):
            if index < len(node.inputs) and node.inputs[index].name:
                value = self._fold(node.inputs[index])
                if value is None:
                    zero = False
                    continue
                if index == 1:
                    lo = float(value)
                else:
                    hi = float(value)
        zero = zero and lo <= 0.0 <= hi
        return _Spec("act", [node.inputs[0]], {"fn": "clip", "zero_preserving": zero})

    def _hardsigmoid(self, node: gs.Node) -> _Spec:
        """HardSigmoid(0) = beta."""
        zero = float(node.attrs.get("beta", 0.5)) == 0.0
        return _Spec("act", [node.inputs[0]], {"fn": "hardsigmoid", "zero_preserving": zero})

    def _shrink(self, node: gs.Node) -> _Spec:
        """Shrink(0) = 0 when lambd >= 0, else -bias."""
        zero = float(node.attrs.get("lambd", 0.5)) >= 0 or float(node.attrs.get("bias", 0.0)) == 0.0
        return _Spec("act", [node.inputs[0]], {"fn": "shrink", "zero_preserving": zero})

    def _prelu(self, node: gs.Node) -> _Spec:
        """PReLU with one slope, or one slope per channel stored as (C, 1, ..., 1)."""
        x = node.inputs[0]
        key = self._weight(node, 1, "slope")
        slope = self._shape(node.inputs[1]) or ()
        rank = self._rank(x)
        per_channel = rank >= 2 and len(slope) == rank - 1 and all(d == 1 for d in slope[1:])
        if math.prod(slope) != 1 and not per_channel:
            raise _Unknown(f"PRelu slope of shape {slope} is neither scalar nor (C, 1, ..., 1)")
        return _Spec("act", [x], {"fn": "prelu", "zero_preserving": True}, {"weight": key})

    def _pow(self, node: gs.Node) -> _Spec:
        """x ** c with a scalar constant c > 0 is elementwise and zero preserving."""
        exponent = self._fold(node.inputs[1])
        if exponent is None or exponent.size != 1:
            raise _Unknown("Pow with a tensor exponent")
        return _Spec("act", [node.inputs[0]], {"fn": "pow", "zero_preserving": float(exponent.reshape(-1)[0]) > 0})

    def _identity(self, node: gs.Node) -> _Spec:
        if node.op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].name and (node.outputs[1].outputs or node.outputs[1] in self.graph.outputs):
                raise _Unknown("Dropout's mask output is used")
            training = self._input_const(node, 2, "training_mode")
            if training is not None and bool(training.reshape(-1)[0]):
                raise _Unknown("Dropout in training mode")
        return _Spec("identity", [node.inputs[0]])

    def _binary(self, node: gs.Node) -> _Spec:
        kind = _BINARY_OPS[node.op]
        operands = [t for t in node.inputs if t.name]
        scalar = None
        for t in operands:
            if self._const_key(t) is not None and math.prod(self._shape(t) or (0,)) == 1:
                scalar = float(self._const_value(t).reshape(-1)[0])  # type: ignore[union-attr]
        return _Spec(kind, operands, {"tensor_positions": list(range(len(operands))), "scalar": scalar})

    def _pool(self, node: gs.Node) -> _Spec:
        if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
            raise _Unknown("MaxPool's indices output is used")
        return _Spec("pool", [node.inputs[0]], {"op": node.op})

    def _resize(self, node: gs.Node) -> _Spec:
        """Resize/Upsample act per (batch, channel) plane when they leave the channel axis alone."""
        x = node.inputs[0]
        rank = self._rank(x)
        axes = [int(a) + rank if int(a) < 0 else int(a) for a in node.attrs.get("axes", range(rank))]
        if node.op == "Upsample" and "scales" in node.attrs:
            scales: np.ndarray | None = np.asarray(node.attrs["scales"])
        else:
            scale_index = 1 if node.op == "Upsample" or self._opset() < 11 else 2
            scales = self._input_const(node, scale_index, "scales")
        sizes = self._input_const(node, 3, "sizes") if node.op == "Resize" else None
        if scales is not None and scales.size:
            by_axis = dict(zip(axes, scales.reshape(-1).tolist()))
            if by_axis.get(1, 1.0) != 1.0 or by_axis.get(0, 1.0) != 1.0:
                raise _Unknown("it resizes the batch or channel axis")
        elif sizes is not None and sizes.size and 1 in axes:
            raise _Unknown("its constant `sizes` fix the channel count")
        return _Spec("pool", [x], {"op": node.op})

    def _pad(self, node: gs.Node) -> _Spec:
        """Pad: spatial pads in canonical form (begin..., end... over axes 2..); padding the
        batch or channel axis keeps all 2*rank entries, which the rule freezes."""
        x = node.inputs[0]
        rank = self._rank(x)
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = self._input_const(node, 1, "pads") if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
        if pads is None:
            raise _Unknown("its pads input is computed at run time, not a constant")
        value = self._input_const(node, 2, "constant value") if len(node.inputs) > 1 else np.asarray(node.attrs.get("value", 0.0))
        if mode == "constant" and value is not None and value.size and float(value.reshape(-1)[0]) != 0.0:
            raise _Unknown("it pads with a non-zero value")
        pads = [int(p) for p in pads.reshape(-1)]
        axes_v = self._input_const(node, 3, "axes")
        full = [0] * (2 * rank)
        axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes_v.reshape(-1)] if axes_v is not None else list(range(rank))
        for i, a in enumerate(axes):
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        if any(full[a] or full[a + rank] for a in (0, 1)):
            canonical = full
        else:
            canonical = full[2:rank] + full[rank + 2:]
        return _Spec("pad", [x], {"pads": canonical, "mode": mode, "rank": rank})

    def _flatten(self, node: gs.Node) -> _Spec:
        rank = self._rank(node.inputs[0])
        axis = int(node.attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis == 1:
            return _Spec("flatten", [node.inputs[0]], {"start": 1, "end": -1})
        return _Spec("reshape", [node.inputs[0]], {"flatten_axis": axis})

    def _reshape(self, node: gs.Node) -> _Spec:
        self._input_const(node, 1, "target shape")
        return _Spec("reshape", [node.inputs[0]])

    def _transpose(self, node: gs.Node) -> _Spec:
        rank = self._rank(node.inputs[0])
        perm = [int(p) for p in node.attrs.get("perm", list(reversed(range(rank))))]
        return _Spec("permute", [node.inputs[0]], {"perm": perm})

    def _axes(self, node: gs.Node, rank: int, index: int = 1) -> list[int] | None:
        """Axes from the attribute (old opsets) or the input (new opsets), normalised."""
        if "axes" in node.attrs:
            raw = node.attrs["axes"]
        else:
            value = self._input_const(node, index, "axes")
            raw = None if value is None else value.reshape(-1).tolist()
        if raw is None:
            return None
        return sorted(int(a) + rank if int(a) < 0 else int(a) for a in raw)

    def _squeeze(self, node: gs.Node) -> _Spec:
        shape = self._shape(node.inputs[0])
        if shape is None:
            raise _Unknown("input shape unknown")
        axes = self._axes(node, len(shape))
        if axes is None:
            axes = [a for a, d in enumerate(shape) if d == 1]
        return _Spec("squeeze", [node.inputs[0]], {"axes": axes})

    def _unsqueeze(self, node: gs.Node) -> _Spec:
        out = self._shape(node.outputs[0])
        if out is None:
            raise _Unknown("output shape unknown")
        axes = self._axes(node, len(out))
        return _Spec("unsqueeze", [node.inputs[0]], {"axes": axes or []})

    def _slice(self, node: gs.Node) -> _Spec:
        """Slice: the axes it actually cuts (start > 0, end < size or step != 1)."""
        shape = self._shape(node.inputs[0])
        if shape is None:
            raise _Unknown("input shape unknown")
        rank = len(shape)
        if "starts" in node.attrs:
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
        else:
            starts = self._input_const(node, 1, "starts").reshape(-1).tolist()  # type: ignore[union-attr]
            ends = self._input_const(node, 2, "ends").reshape(-1).tolist()  # type: ignore[union-attr]
            a = self._input_const(node, 3, "axes")
            s = self._input_const(node, 4, "steps")
            axes = a.reshape(-1).tolist() if a is not None else list(range(len(starts)))
            steps = s.reshape(-1).tolist() if s is not None else [1] * len(starts)
        cut = []
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = int(axis) + rank if int(axis) < 0 else int(axis)
            n = shape[axis]
            start, end = int(start), int(end)
            start = max(0, start + n if start < 0 else start)
            end = min(n, end + n if end < 0 else end)
            if not (int(step) == 1 and start == 0 and end >= n):
                cut.append(axis)
        return _Spec("slice", [node.inputs[0]], {"axes": sorted(set(cut))})

    def _gather(self, node: gs.Node) -> _Spec:
        """Gather with a constant 1-D index of non-negative positions: out[i] = in[index[i]]
        along ``axis`` (a folded permutation or a crop; the gather rule renumbers the index)."""
        x, index = node.inputs[0], node.inputs[1]
        shape = self._shape(x)
        if shape is None:
            raise _Unknown("input shape unknown")
        if self._const_key(index) is None:
            raise _Unknown("its index is computed at run time")
        axis = int(node.attrs.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        value = self._const_value(index)
        if value is None or value.ndim != 1 or not value.size or value.min() < 0 or value.max() >= shape[axis]:
            raise _Unknown("its index is not a 1-D list of non-negative positions")
        return _Spec("gather", [x, index], {"axis": axis})

    def _concat(self, node: gs.Node) -> _Spec:
        return _Spec("concat", [t for t in node.inputs if t.name], {"axis": int(node.attrs["axis"])})

    def _split(self, node: gs.Node) -> _Spec:
        return _Spec("split", [node.inputs[0]], {"axis": int(node.attrs.get("axis", 0))})

    def _reduce(self, node: gs.Node) -> _Spec:
        rank = self._rank(node.inputs[0])
        axes = self._axes(node, rank)
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                return _Spec("identity", [node.inputs[0]])
            axes = list(range(rank))
        return _Spec("reduce", [node.inputs[0]], {"axes": axes, "keepdim": bool(int(node.attrs.get("keepdims", 1))), "op": node.op})

    def _softmax(self, node: gs.Node) -> _Spec:
        rank = self._rank(node.inputs[0])
        opset = self._opset()
        axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
        axis = axis + rank if axis < 0 else axis
        if opset < 13 and axis != rank - 1:
            raise _Unknown("opset < 13 softmax flattens the axes after `axis`")
        return _Spec("softmax", [node.inputs[0]], {"axis": axis})

    def _constant(self, node: gs.Node) -> _Spec:
        if _constant_node_value(node) is None:
            raise _Unknown("Constant with a sparse or unusual value")
        return _Spec("constant", [], {}, {"value": node.outputs[0].name})

    def _opset(self) -> int:
        for imp in self._shell.opset_import:
            if imp.domain in _DEFAULT_DOMAINS:
                return int(imp.version)
        return int(self.graph.opset)

    # ----------------------------------------------------------------- shapes
    def _infer(self) -> None:
        """Shapes of every value: ONNX shape inference, then onnxruntime for the rest."""
        model = self._export(graph=self._stub_graph())
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except Exception as exc:  # InferenceError, or a checker error for odd models
            logger.debug("strict shape inference failed (%s); retrying leniently", exc)
            try:
                inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
            except Exception as exc2:
                logger.warning("ONNX shape inference failed: %s", exc2)
                inferred = model
        shapes: dict[str, tuple[int, ...] | None] = {}
        dtypes: dict[str, str] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            shape, dtype = _value_info_shape(vi)
            if shape is not None:
                shapes[vi.name] = shape
            if dtype:
                dtypes[vi.name] = dtype
        for t in self.graph.inputs:
            if isinstance(t, gs.Variable) and _static_dims(t.shape):
                shapes[t.name] = tuple(int(d) for d in t.shape)
        missing = [n for n in self._produced_variables() if n not in shapes]
        if missing:
            measured = self._measure_shapes(missing, dtypes)
            shapes.update({k: v[0] for k, v in measured.items()})
            dtypes.update({k: v[1] for k, v in measured.items()})
        self._shapes, self._dtypes = shapes, dtypes

    def _produced_variables(self) -> list[str]:
        out = []
        for node in self.graph.nodes:
            if node.op == "Constant":
                continue
            out.extend(t.name for t in node.outputs if t.name)
        return out

    def _measure_shapes(self, names: list[str], dtypes: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Run onnxruntime with ``names`` exposed as outputs and read their shapes."""
        model = self._export()
        known = {o.name for o in model.graph.output}
        for name in names:
            if name not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        try:
            sess = _make_session(model)
            feeds = {}
            for t in self.graph.inputs:
                if isinstance(t, gs.Variable):
                    feeds[t.name] = np.zeros([int(d) for d in t.shape], dtype=_np_dtype(t.dtype))
            order = [o.name for o in sess.get_outputs()]
            results = sess.run(None, feeds)
        except Exception as exc:
            logger.warning(
                "shapes of %d values are unknown (onnxruntime could not run the model: %s)", len(names), str(exc).splitlines()[0]
            )
            return {}
        wanted = set(names)
        out = {}
        for name, value in zip(order, results):
            if name in wanted and isinstance(value, np.ndarray):
                out[name] = (tuple(int(d) for d in value.shape), str(value.dtype))
        logger.debug("measured %d shapes with onnxruntime", len(out))
        return out

    # ------------------------------------------------------------------ export
    def _export(self, graph: gs.Graph | None = None) -> onnx.ModelProto:
        """The current graph (or ``graph``) as a ModelProto with the original model's header."""
        graph = graph or self.graph
        model = gs.export_onnx(graph, do_type_check=False)
        header = self._shell
        out = onnx.ModelProto()
        out.CopyFrom(header)
        out.graph.CopyFrom(model.graph)
        out.functions.extend(model.functions)
        domains = {imp.domain for imp in out.opset_import}
        for imp in model.opset_import:
            if imp.domain not in domains:
                out.opset_import.append(imp)
        if not out.HasField("ir_version"):
            out.ir_version = model.ir_version
        return out

    def _stub_graph(self) -> gs.Graph:
        """A shallow copy whose large constants carry dims and type but no data (all that
        shape inference needs), so exporting it copies no weights."""
        graph = self.graph.copy()
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and math.prod(t.shape) > _STRIP_NUMEL:
                try:
                    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
                except (TypeError, KeyError, ValueError):
                    continue  # an exotic type: keep the data
                stub = onnx.TensorProto(name=t.name, data_type=dtype)
                stub.dims.extend(int(d) for d in t.shape)
                t._values = gs.ir.tensor.LazyValues(stub)
        return graph

    def _remerge(self, graph: gs.Graph) -> None:
        """Point readers of a constant copy back at its original when both are still equal."""
        tensors = graph.tensors()
        for copy_name, source_name in self._copies.items():
            c, s = tensors.get(copy_name), tensors.get(source_name)
            if not isinstance(c, gs.Constant) or s is None:
                continue
            sv = np.asarray(s.values) if isinstance(s, gs.Constant) else (
                _constant_node_value(s.inputs[0]) if s.inputs and s.inputs[0].op == "Constant" else None
            )
            cv = np.asarray(c.values)
            if sv is None or sv.dtype != cv.dtype or sv.shape != cv.shape or not np.array_equal(sv, cv):
                continue
            for consumer in list(c.outputs):
                _swap_input(consumer, c, s)
        graph.cleanup(remove_unused_graph_inputs=False)

    def to_model(self) -> onnx.ModelProto:
        """The model to save: symbolic input/output dims restored, no stale value_info."""
        graph = self.graph.copy()
        self._remerge(graph)
        for t in graph.inputs + graph.outputs:
            if isinstance(t, gs.Variable) and t.dtype is None and t.name in self._dtypes:
                t.dtype = _np_dtype(self._dtypes[t.name])
        model = self._export(graph=graph)
        for vi in list(model.graph.input) + list(model.graph.output):
            original = self._io_protos.get(vi.name)
            if original is not None:
                vi.CopyFrom(original)
        del model.graph.value_info[:]
        for node in model.graph.node:
            doc = self._node_docs.get(node.name)
            if doc is not None:
                node.doc_string = doc[0]
                node.metadata_props.extend(doc[1])
        return model

    def to_onnx(self, path: str | os.PathLike, external_data: bool | None = None, **_: Any) -> None:
        """Write the model atomically; tensors go to ``<file>.data`` when ``external_data``
        is true, or when it is None and the model is larger than 1.5 GiB."""
        save_model(self.to_model(), path, external_data=external_data, protect=[self.source])

    save_onnx = to_onnx

    # ------------------------------------------------------------------ edits
    def _gs_node(self, node: Node) -> gs.Node:
        found = self._index.get(node.name)
        if found is None or found not in self.graph.nodes:
            found = next((n for n in self.graph.nodes if n.name == node.name), None)
        if found is None:
            raise GraphError(f"{node} is not a node of the ONNX graph (any more)")
        return found

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        n = self._gs_node(node)
        setter = _SETTERS.get((n.op, key))
        if setter is None:
            raise GraphError(f"cannot set `{key}` on {node} (ONNX {n.op})")
        setter(self, n, value)
        self._edited()

    def _set_conv_attr(self, n: gs.Node, key: str, value: Any) -> None:
        onnx_key = {"groups": "group", "stride": "strides", "dilation": "dilations", "pads": "pads", "kernel": "kernel_shape"}[key]
        n.attrs[onnx_key] = int(value) if key == "groups" else [int(v) for v in value]
        if key == "pads":
            n.attrs["auto_pad"] = "NOTSET"

    def _set_pad_pads(self, n: gs.Node, value: Sequence[int]) -> None:
        rank = self._rank(n.inputs[0])
        value = [int(v) for v in value]
        if len(value) == 2 * (rank - 2):
            half = rank - 2
            value = [0, 0] + value[:half] + [0, 0] + value[half:]
        if len(n.inputs) > 1:
            const = gs.Constant(self._fresh_tensor_name(f"{n.name}.pads"), np.asarray(value, dtype=np.int64))
            n.inputs[1] = const
            if len(n.inputs) > 3 and n.inputs[3].name:
                n.inputs[3] = gs.Variable.empty()
        else:
            n.attrs["pads"] = value

    def _set_split_sizes(self, n: gs.Node, sizes: Sequence[int]) -> None:
        sizes = [int(s) for s in sizes]
        n.attrs.pop("num_outputs", None)
        if self._opset() < 13:
            n.attrs["split"] = sizes
            return
        const = gs.Constant(self._fresh_tensor_name(f"{n.name}.split"), np.asarray(sizes, dtype=np.int64))
        if len(n.inputs) > 1:
            n.inputs[1] = const
        else:
            n.inputs.append(const)

    def _set_reshape_shape(self, n: gs.Node, updates: Mapping[int, int]) -> None:
        """Rewrite the target-shape constant at the given axes; -1 and 0 entries stay (they
        follow the input)."""
        if n.op == "Flatten":
            return  # Flatten computes its output shape from its input
        shape = self._fold(n.inputs[1])
        if shape is None:
            raise GraphError(f"cannot resize reshape `{n.name}`: its target shape is computed at run time")
        shape = np.array(shape, dtype=np.int64).reshape(-1)
        for axis, size in updates.items():
            if shape[axis] not in (-1, 0):
                shape[axis] = int(size)
        n.inputs[1] = gs.Constant(self._fresh_tensor_name(f"{n.name}.shape"), shape)

    def _set_groupnorm(self, n: gs.Node, value: int) -> None:
        n.attrs["num_groups"] = int(value)

    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None:
        """Replace ``node`` by ``new`` (kinds ``conv``, ``linear``); the last new node's output
        keeps the replaced node's output name."""
        old = self._gs_node(node)
        if not new:
            raise GraphError(f"replace_node({node}): no new nodes")
        tensors = self._tensor_map()
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
        def const(role: str, value: torch.Tensor | np.ndarray) -> gs.Constant:
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            return gs.Constant(self._fresh_tensor_name(f"{base}.{role}"), np.ascontiguousarray(array))

        w = spec.params["weight"]
        b = spec.params.get("bias")
        if spec.kind == "conv":
            nd = w.dim() - 2
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
            wt = np.ascontiguousarray(w.detach().cpu().numpy().T)
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
        src = self._tensor_map().get(value)
        if src is None:
            raise GraphError(f"insert_gather: no value named `{value}`")
        base = self._fresh_node_name(f"{value}/gp_gather")
        idx = gs.Constant(self._fresh_tensor_name(f"{base}.index"), np.asarray(list(index), dtype=np.int64))
        out = gs.Variable(self._fresh_tensor_name(f"{value}_gathered"))
        self.graph.nodes.append(gs.Node("Gather", base, {"axis": int(axis)}, inputs=[src, idx], outputs=[out]))
        for c in consumers:
            _swap_input(self._gs_node(c), src, out)
        self.graph.toposort()
        self._edited()

    def _sync_kernel_shapes(self) -> None:
        """Conv kernel_shape follows the (possibly shrunk) weight."""
        for n in self.graph.nodes:
            if n.op in ("Conv", "ConvTranspose") and "kernel_shape" in n.attrs and len(n.inputs) > 1:
                value = self._const_value(n.inputs[1])
                if value is not None:
                    n.attrs["kernel_shape"] = [int(k) for k in value.shape[2:]]

    def commit(self) -> None:
        self._sync_kernel_shapes()
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self._reset_caches()
        self._infer()

    # ---------------------------------------------------------------- running
    def copy(self) -> "OnnxFrontend":
        other = OnnxFrontend.__new__(OnnxFrontend)
        other.__dict__.update(self.__dict__)
        other.graph = self.graph.copy()
        other._shapes = dict(self._shapes)
        other._dtypes = dict(self._dtypes)
        other._copies = dict(self._copies)
        other._reset_caches()
        return other

    def __deepcopy__(self, memo: dict) -> "OnnxFrontend":
        return self.copy()

    def session(self) -> Any:
        """The cached onnxruntime session (graph optimisations off) of the current graph."""
        if self._session_cache is None:
            try:
                self._session_cache = _make_session(self._export())
            except Exception as exc:
                raise OnnxLoadError(f"onnxruntime cannot run `{self.source}`: {str(exc).splitlines()[0]}") from exc
        return self._session_cache

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sess = self.session()
        names = [t.name for t in self.graph.inputs if isinstance(t, gs.Variable)]
        if len(inputs) != len(names):
            raise GraphError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
        outs = sess.run([t.name for t in self.graph.outputs], feeds)
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def _make_example_inputs(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for t in self.graph.inputs:
            if not isinstance(t, gs.Variable):
                continue
            dtype = torch.from_numpy(np.zeros(0, dtype=_np_dtype(t.dtype))).dtype
            shape = [int(d) for d in t.shape]
            if dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(dtype))
            else:
                out.append(torch.zeros(shape, dtype=dtype))
        return out

    def example_inputs(self) -> list[torch.Tensor]:
        return list(self._inputs)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The fixed shapes used for analysis, per graph input."""
        return {t.name: tuple(int(d) for d in t.shape) for t in self.graph.inputs if isinstance(t, gs.Variable)}


# -------------------------------------------------------------- dispatch tables
_CLASSIFIERS: dict[str, Callable[[OnnxFrontend, gs.Node], _Spec]] = {
    "Conv": OnnxFrontend._conv, "ConvTranspose": OnnxFrontend._conv, "Gemm": OnnxFrontend._gemm,
    "MatMul": OnnxFrontend._matmul, "BatchNormalization": OnnxFrontend._batchnorm,
    "InstanceNormalization": OnnxFrontend._instancenorm, "LayerNormalization": OnnxFrontend._layernorm,
    "GroupNormalization": OnnxFrontend._groupnorm, "Clip": OnnxFrontend._clip,
    "HardSigmoid": OnnxFrontend._hardsigmoid, "Shrink": OnnxFrontend._shrink, "PRelu": OnnxFrontend._prelu,
    "Pow": OnnxFrontend._pow, "Identity": OnnxFrontend._identity, "Dropout": OnnxFrontend._identity,
    "Cast": OnnxFrontend._identity, "CastLike": OnnxFrontend._identity, "Resize": OnnxFrontend._resize,
    "Upsample": OnnxFrontend._resize, "Pad": OnnxFrontend._pad, "Flatten": OnnxFrontend._flatten,
    "Reshape": OnnxFrontend._reshape, "Transpose": OnnxFrontend._transpose, "Squeeze": OnnxFrontend._squeeze,
    "Unsqueeze": OnnxFrontend._unsqueeze, "Slice": OnnxFrontend._slice, "Concat": OnnxFrontend._concat,
    "Split": OnnxFrontend._split, "Gather": OnnxFrontend._gather, "Softmax": OnnxFrontend._softmax,
    "LogSoftmax": OnnxFrontend._softmax,
    "Constant": OnnxFrontend._constant,
}


def _conv_setter(key: str) -> Callable[[OnnxFrontend, gs.Node, Any], None]:
    def setter(fe: OnnxFrontend, n: gs.Node, value: Any) -> None:
        fe._set_conv_attr(n, key, value)

    return setter


_SETTERS: dict[tuple[str, str], Callable[[OnnxFrontend, gs.Node, Any], None]] = {
    **{(op, key): _conv_setter(key) for op in ("Conv", "ConvTranspose") for key in ("groups", "stride", "dilation", "pads", "kernel")},
    ("Pad", "pads"): OnnxFrontend._set_pad_pads,
    ("Split", "sizes"): OnnxFrontend._set_split_sizes,
    ("Reshape", "shape"): OnnxFrontend._set_reshape_shape,
    ("Flatten", "shape"): OnnxFrontend._set_reshape_shape,
    ("GroupNormalization", "num_groups"): OnnxFrontend._set_groupnorm,
}


# ------------------------------------------------------------------- helpers
def _is_default(node: gs.Node) -> bool:
    """Is ``node`` an op of the default ONNX domain?"""
    return (node.domain or "") in _DEFAULT_DOMAINS


def _op_name(node: gs.Node) -> str:
    return node.op if _is_default(node) else f"{node.domain}::{node.op}"


def _swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    """Value of a ``Constant`` op from whichever value attribute it uses."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def _outer_scope_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Values a node's subgraphs read from the enclosing graph (control flow)."""
    found: list[gs.Tensor] = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            local = {t.name for t in attr.inputs} | {t.name for n in attr.nodes for t in n.outputs}
            for n in attr.nodes:
                for t in n.inputs + _outer_scope_inputs(n):
                    if isinstance(t, gs.Variable) and t.name and t.name not in local and t not in found:
                        found.append(t)
    return found


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_LIMIT = 64  # most nodes a constant subgraph may have to be evaluated


def _constant_ancestry(t: gs.Tensor) -> list[gs.Node] | None:
    """The nodes computing ``t`` in execution order, if they read constants only."""
    order: list[gs.Node] = []
    seen: set[int] = set()

    def visit(tensor: gs.Tensor) -> bool:
        if isinstance(tensor, gs.Constant) or not tensor.name:
            return True
        if len(tensor.inputs) != 1:
            return False  # a graph input
        node = tensor.inputs[0]
        if id(node) in seen:
            return True
        if not _is_default(node) or node.op in _NONDETERMINISTIC or any(isinstance(a, gs.Graph) for a in node.attrs.values()):
            return False
        if node.op == "Shape" or len(order) >= _FOLD_LIMIT:
            return False
        seen.add(id(node))
        if not all(visit(i) for i in node.inputs):
            return False
        order.append(node)
        return True

    return order if visit(t) else None


def _evaluate(nodes: list[gs.Node], t: gs.Tensor, opsets: Sequence[onnx.OperatorSetIdProto]) -> np.ndarray:
    """Run a constant subgraph with the ONNX reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    protos = [OnnxExporter.export_node(n) for n in nodes]
    inits = {i.name: OnnxExporter.export_tensor_proto(i) for n in nodes for i in n.inputs if isinstance(i, gs.Constant)}
    outputs = [onnx.helper.make_empty_tensor_value_info(t.name)]
    graph = onnx.helper.make_graph(protos, "fold", [], outputs, initializer=list(inits.values()))
    model = onnx.helper.make_model(graph, opset_imports=list(opsets))
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _np_dtype(dtype: Any) -> np.dtype:
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, str):
        return np.dtype(dtype.replace("torch.", ""))
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.dtype(dtype)


def _value_info_shape(vi: onnx.ValueInfoProto) -> tuple[tuple[int, ...] | None, str | None]:
    if not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    dtype = None
    if tt.elem_type:
        with contextlib.suppress(Exception):
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    if not tt.HasField("shape"):
        return None, dtype
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None, dtype
        dims.append(int(d.dim_value))
    return tuple(dims), dtype


def _proto_nbytes(model: onnx.ModelProto) -> int:
    """Roughly the serialized size of ``model``: its initializers' data, from dims and type."""
    total = 0
    for init in model.graph.initializer:
        with contextlib.suppress(Exception):
            total += math.prod(init.dims) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each large initializer replaced by a one-element tensor of its type:
    what the structural checker needs (names, order, opsets, attributes), without copying
    or serializing the weights."""
    light = _model_shell(model)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for init in src.initializer:
        if math.prod(init.dims) <= _STRIP_NUMEL or init.data_location == onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
            continue
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        except Exception:
            g.initializer.append(init)
            continue
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, dtype=dtype), init.name))
    return light


def _make_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime CPU session with graph optimisations disabled."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if _proto_nbytes(model) < 2**31 - 2**26:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="graphprune-") as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    external_data: bool | None = None,
    protect: Sequence[str] = (),
    check: Callable[[str], None] | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, never over a file in ``protect``.

    External data goes to ``<name>.data`` beside the file when ``external_data`` is true,
    or when it is None and the tensors exceed 1.5 GiB.  ``check(tmp_path)`` runs on the
    written file before it is renamed into place; if it raises, nothing is left behind.
    """
    from ..emit import atomic_path

    path = os.fspath(path)
    real = os.path.realpath(path)
    protected = {os.path.realpath(p) for p in protect if p and not p.startswith("<")}
    if real in protected:
        raise OnnxLoadError(f"refusing to overwrite the input file `{path}`: choose another output path")
    if external_data is None:
        external_data = _proto_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    if external_data and os.path.realpath(data_path) in protected | _external_files(protect):
        raise OnnxLoadError(f"refusing to overwrite `{data_path}`, which the input model reads: choose another output path")
    try:
        with atomic_path(path) as tmp:
            if external_data:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(data_path)  # onnx appends to an existing data file
                onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=location, size_threshold=1024)
            else:
                onnx.save_model(model, tmp)
            if check is not None:
                check(tmp)
    except BaseException:
        if external_data:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(data_path)
        raise


def _external_files(paths: Sequence[str]) -> set[str]:
    """Real paths of the external-data files an ONNX file reads."""
    out: set[str] = set()
    for p in paths:
        if not p or p.startswith("<") or not os.path.exists(p):
            continue
        with contextlib.suppress(Exception):
            m = onnx.load(p, load_external_data=False)
            folder = os.path.dirname(os.path.abspath(p))
            for t in onnx.external_data_helper._get_all_tensors(m):
                if onnx.external_data_helper.uses_external_data(t):
                    info = onnx.external_data_helper.ExternalDataInfo(t)
                    out.add(os.path.realpath(os.path.join(folder, info.location)))
    return out
