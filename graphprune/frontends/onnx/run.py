"""Running an ONNX graph with onnxruntime on CPU.

Sessions have graph optimisations disabled, so the numbers are the graph's own (no
fusions that round differently); ``make_session(model, optimise=True)`` turns them all on
(``ORT_ENABLE_ALL``), which the checks use to measure a model's own float noise.

**Weights without serialising them.**  :func:`session_model` exports the graph's
structure only: each large top-level initializer becomes a reference to external data
(name, type, dims, no bytes), and its array goes to onnxruntime as an ``OrtValue``
(``SessionOptions.add_external_initializers``, which checks name, type and dims against
the reference and copies the data in before any graph optimisation).  The session then
computes exactly what a session on the fully serialised model computes, without the
per-tensor protobuf copies; and since the structure stays small, models of any size load
from bytes.  Small initializers (target shapes, axes, pads: what onnxruntime's shape
inference reads while it loads the graph) and constants read inside subgraphs stay
embedded.  A structure still too large for one protobuf (2 GiB) goes through a temporary
file with external data.

Example inputs are seeded: standard normal for floating-point inputs, zeros for integer
ones.  :func:`compared_constants` finds the values a model suggests for its integer
inputs (what the check probes feed them, :mod:`graphprune.probes`).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from ...arrays import as_numpy
from ...graph import GraphError
from .save import export_model
from .tensors import STRIP_NUMEL, const_value, np_dtype, proto_nbytes

__all__ = [
    "SessionModel", "compared_constants", "example_inputs", "make_session", "resized_model", "run_session", "session_model",
]

PROTOBUF_LIMIT = 2**31 - 2**26  # bytes: a model above this does not fit one serialised protobuf
EXTERNAL_LOCATION = "graphprune-session-weights"  # never read: the data comes as OrtValues


@dataclass(frozen=True)
class SessionModel:
    """What a session is built from: ``model``, the structure (the initializers named in
    ``weights`` are external-data references without bytes), and ``weights``, their arrays."""

    model: onnx.ModelProto
    weights: Mapping[str, np.ndarray] = field(default_factory=dict)


def session_model(graph: gs.Graph, header: onnx.ModelProto) -> SessionModel:
    """``graph`` as a :class:`SessionModel` with ``header``'s IR version, opsets and
    metadata: large top-level initializers by reference, their arrays on the side."""
    weights: dict[str, np.ndarray] = {}
    with _by_reference(graph, weights):
        model = export_model(graph, header)
    return SessionModel(model, weights)


@contextlib.contextmanager
def _by_reference(graph: gs.Graph, weights: dict[str, np.ndarray]) -> Iterator[None]:
    """While exporting, let each large top-level constant stand for an external-data
    reference (its values are swapped back afterwards); collect the arrays in ``weights``."""
    inner = _subgraph_tensor_names(graph)
    swapped: list[tuple[gs.Constant, Any]] = []
    seen: set[int] = set()
    try:
        for node in graph.nodes:
            for t in node.inputs:
                if not isinstance(t, gs.Constant) or id(t) in seen or t.name in inner:
                    continue
                seen.add(id(t))
                array = _referenceable(t)
                if array is None:
                    continue
                weights[t.name] = array
                swapped.append((t, t._values))
                t._values = LazyValues(_reference_proto(t.name, array))
        yield
    finally:
        for t, values in swapped:
            t._values = values


def _referenceable(t: gs.Constant) -> np.ndarray | None:
    """``t``'s array when it can be handed over by reference: a plain numpy type that
    exports as itself, more than :data:`STRIP_NUMEL` elements; else None."""
    if isinstance(t._values, SparseValues) or t.export_dtype != t.dtype or math.prod(t.shape) <= STRIP_NUMEL:
        return None
    try:
        dtype = np.dtype(t.dtype)
        onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except (TypeError, KeyError, ValueError):
        return None
    if dtype.kind not in "fiub" or dtype.itemsize > 8 or dtype.byteorder not in "=|":
        return None
    return np.ascontiguousarray(t.values)


def _reference_proto(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A tensor with ``array``'s name, type and dims whose data is external (never read)."""
    proto = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    proto.dims.extend(int(d) for d in array.shape)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", EXTERNAL_LOCATION), ("offset", "0"), ("length", str(array.nbytes))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


def _subgraph_tensor_names(graph: gs.Graph) -> set[str]:
    """Names of every tensor a subgraph (If/Loop/Scan body) of ``graph`` touches."""
    names: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                names.update(attr.tensors())
                names.update(_subgraph_tensor_names(attr))
    return names


def make_session(model: onnx.ModelProto | SessionModel, optimise: bool = False) -> Any:
    """An onnxruntime CPU session with graph optimisations disabled (all enabled with
    ``optimise``), on a full model or a :class:`SessionModel`."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = SessionModel(model)
    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimise else level.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # idle worker threads sleep instead of spinning: a check runs a few forwards, often on
    # a machine busy with other work, where spinning threads only take cores from it
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if model.weights:
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in model.weights.values()]
        opts.add_external_initializers(list(model.weights), values)  # copied in while the session loads
    if proto_nbytes(model.model) < PROTOBUF_LIMIT:
        return ort.InferenceSession(model.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="graphprune-") as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save_model(model.model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def resized_model(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``shapes`` have those dims, with no
    intermediate ``value_info`` and no output dims (stale at another size: onnxruntime
    infers them again).  Meant for a :class:`SessionModel`'s structure, which is small."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        dims = shapes.get(vi.name)
        if dims is None or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = int(d)
    del out.graph.value_info[:]
    for vi in out.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    return out


def run_session(sess: Any, graph: gs.Graph, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Feed ``inputs`` (numpy arrays or torch tensors) to ``graph``'s inputs in order; its
    outputs as numpy arrays."""
    names = [t.name for t in graph.inputs if isinstance(t, gs.Variable)]
    if len(inputs) != len(names):
        raise GraphError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    feeds = {name: as_numpy(t) for name, t in zip(names, inputs)}
    outs = sess.run([t.name for t in graph.outputs], feeds)
    return [np.asarray(o) for o in outs]


def example_inputs(graph: gs.Graph) -> list[np.ndarray]:
    """One seeded random array per graph input, at its fixed shape and type: standard
    normal for floating-point inputs, zeros for the others."""
    rng = np.random.default_rng(0)
    out = []
    for t in graph.inputs:
        if not isinstance(t, gs.Variable):
            continue
        dtype = np_dtype(t.dtype)
        shape = [int(d) for d in t.shape]
        if np.issubdtype(dtype, np.floating):
            out.append(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
        else:
            out.append(np.zeros(shape, dtype=dtype))
    return out


COMPARISONS = ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual")
PASS_THROUGH = ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten")


def compared_constant(t: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """The constant that ``t`` (or a cast or reshape of it) is compared with by an
    ``Equal``/``Greater``/``Less``... node, if any: ``Equal(sr, 16000)`` -> 16000."""
    for node in t.outputs:
        if node.op in COMPARISONS:
            for other in node.inputs:
                value = const_value(other) if other is not t else None
                if value is not None and value.size >= 1:
                    return np.asarray(value).reshape(-1)[0]
        elif node.op in PASS_THROUGH and depth > 0 and node.inputs and node.inputs[0] is t:
            found = compared_constant(node.outputs[0], depth - 1)
            if found is not None:
                return found
    return None


def compared_constants(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Per integer graph input, the constant the model compares it with (see
    :func:`compared_constant`); inputs compared with nothing are left out."""
    out = {}
    for t in graph.inputs:
        if not isinstance(t, gs.Variable) or np_dtype(t.dtype).kind not in "iub":
            continue
        value = compared_constant(t)
        if value is not None:
            out[t.name] = value
    return out
