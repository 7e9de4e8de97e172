"""Shapes and dtypes of every value of an ONNX graph.

ONNX shape inference (strict, with data propagation; lenient if strict fails) runs on
the fixed input shapes, on a copy whose large initializers carry dims and type but no
data.  Values it cannot type are measured by running onnxruntime with them exposed as
extra outputs.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .load import static_dims
from .run import make_session, session_model
from .save import export_model
from .tensors import STRIP_NUMEL, np_dtype, value_info_shape

logger = logging.getLogger(__name__)

__all__ = ["infer_shapes", "strict_shapes"]

def infer_shapes(graph: gs.Graph, header: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...] | None], dict[str, str]]:
    """Shapes and dtypes of every value: ONNX shape inference, then onnxruntime for the rest."""
    model = export_model(_stub_graph(graph), header)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, or a checker error for odd models
        logger.debug("strict shape inference failed (%s); retrying leniently", exc)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as exc2:
            logger.warning("ONNX shape inference failed: %s", exc2)
            inferred = model
    shapes, dtypes = _read_value_infos(inferred)
    for t in graph.inputs:
        if isinstance(t, gs.Variable) and static_dims(t.shape):
            shapes[t.name] = tuple(int(d) for d in t.shape)
    missing = [n for n in _produced_variables(graph) if n not in shapes]
    if missing:
        measured = _measure_shapes(graph, header, missing)
        shapes.update({k: v[0] for k, v in measured.items()})
        dtypes.update({k: v[1] for k, v in measured.items()})
    return shapes, dtypes


def strict_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
    """Every value's fixed shape by strict ONNX shape inference (with data propagation)
    on ``model`` (a structure: large initializers need dims and type only); None when
    inference finds an inconsistency (a target shape that no longer fits its input)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        logger.debug("strict shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    return {k: v for k, v in _read_value_infos(inferred)[0].items() if v is not None}


def _read_value_infos(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...] | None], dict[str, str]]:
    """Fixed shapes and dtypes recorded in ``model``'s value infos, inputs and outputs."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    dtypes: dict[str, str] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shape, dtype = value_info_shape(vi)
        if shape is not None:
            shapes[vi.name] = shape
        if dtype:
            dtypes[vi.name] = dtype
    return shapes, dtypes


def _produced_variables(graph: gs.Graph) -> list[str]:
    """Names of the values the graph's ops (other than ``Constant``) produce."""
    out = []
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        out.extend(t.name for t in node.outputs if t.name)
    return out


def _measure_shapes(graph: gs.Graph, header: onnx.ModelProto, names: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Run onnxruntime with ``names`` exposed as outputs and read their shapes."""
    structure = session_model(graph, header)
    model = structure.model
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        sess = make_session(structure)
        feeds = {}
        for t in graph.inputs:
            if isinstance(t, gs.Variable):
                feeds[t.name] = np.zeros([int(d) for d in t.shape], dtype=np_dtype(t.dtype))
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


def _stub_graph(graph: gs.Graph) -> gs.Graph:
    """A shallow copy whose large constants carry dims and type but no data (all that
    shape inference needs), so exporting it copies no weights."""
    graph = graph.copy()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and math.prod(t.shape) > STRIP_NUMEL:
            try:
                dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            except (TypeError, KeyError, ValueError):
                continue  # an exotic type: keep the data
            stub = onnx.TensorProto(name=t.name, data_type=dtype)
            stub.dims.extend(int(d) for d in t.shape)
            t._values = gs.ir.tensor.LazyValues(stub)
    return graph
