"""Reading an ONNX file and normalising its graph for analysis.

:func:`read_model` parses the file (external data resolved relative to it, or from
``external_data_dir``) and checks its structure on a light copy without the weights;
every failure is an :class:`OnnxLoadError` naming the file.  :func:`fix_input_shapes`
fixes every dynamic input dimension from ``input_shapes`` (analysis needs concrete
shapes; the saved file gets its symbolic dimensions back).

:func:`normalise` undoes two exporter habits that would otherwise hide weights:
``Identity(initializer)`` (the TorchScript exporter's way of sharing equal tensors)
becomes an initializer of its own, and a constant read by several ops gets one copy per
reader.  Both are recorded in ``copies`` (copy name -> original name) so that saving
(:func:`graphprune.frontends.onnx.save.remerge`) can share tensors that are still equal.

:func:`fold` evaluates attribute-like inputs (target shapes, pads, axes, split sizes)
that an exporter computes from constants, once, with the ONNX reference evaluator.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, MutableMapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import GraphError
from .tensors import STRIP_NUMEL, const_key, const_value, fresh_name, is_default, swap_input, tensor_shape

logger = logging.getLogger(__name__)

__all__ = [
    "OnnxLoadError", "fix_input_shapes", "fold", "light_copy", "model_shell", "name_nodes", "normalise",
    "read_model", "static_dims",
]


class OnnxLoadError(GraphError):
    """A file that is not a readable ONNX model, or a model graphprune cannot analyse."""


# ------------------------------------------------------------------- reading
def read_model(
    path_or_model: str | os.PathLike | onnx.ModelProto, external_data_dir: str | os.PathLike | None
) -> tuple[onnx.ModelProto, str]:
    """The model and a name for it in messages (its path, or ``<model>``); checked."""
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
        onnx.checker.check_model(light_copy(model))
    except onnx.checker.ValidationError as exc:
        raise OnnxLoadError(f"`{source}` is not a valid ONNX model (truncated or corrupt?): {str(exc).splitlines()[0]}") from exc
    return model, source


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its graph: opsets, IR version, producer, metadata, doc string."""
    shell = onnx.ModelProto()
    for fld in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if model.HasField(fld):
            setattr(shell, fld, getattr(model, fld))
    shell.opset_import.extend(model.opset_import)
    shell.metadata_props.extend(model.metadata_props)
    return shell


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each large initializer replaced by a one-element tensor of its type:
    what the structural checker needs (names, order, opsets, attributes), without copying
    or serializing the weights."""
    light = model_shell(model)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for init in src.initializer:
        if math.prod(init.dims) <= STRIP_NUMEL or init.data_location == onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
            continue
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        except Exception:
            g.initializer.append(init)
            continue
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, dtype=dtype), init.name))
    return light


# ------------------------------------------------------------- input shapes
def static_dims(shape: Sequence[Any] | None) -> bool:
    """Is every dimension of ``shape`` a fixed positive integer?"""
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


def fix_input_shapes(graph: gs.Graph, given: Mapping[str, Sequence[int]], source: str) -> None:
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
        elif not static_dims(shape):
            example = ",".join(str(d) if isinstance(d, (int, np.integer)) and d > 0 else "N" for d in (shape or ["N"]))
            raise OnnxLoadError(
                f"input `{t.name}` has dynamic shape {_fmt_shape(shape)}: fix it with "
                f"--input-shape {t.name}:{example} (input_shapes={{'{t.name}': (...)}} in Python)"
            )


def _fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    return "(" + ", ".join("?" if d is None or d == -1 else str(d) for d in shape) + ")"


# ---------------------------------------------------------------- normalising
def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name (view nodes are addressed by it)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        base = node.name or f"{node.op}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}__{k}", k + 1
        node.name = name
        seen.add(name)


def normalise(graph: gs.Graph, copies: MutableMapping[str, str]) -> None:
    """Clear stale intermediate shapes, fold Identity-of-constant, unshare constants."""
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape, t.dtype = None, None
    for t in graph.outputs:
        t.shape = None
    _fold_constant_identities(graph, copies)
    _unshare_constants(graph, copies)
    _normalise_gemm_bias(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _fold_constant_identities(graph: gs.Graph, copies: MutableMapping[str, str]) -> None:
    """``y = Identity(c)`` with constant ``c`` becomes an initializer ``y`` (a copy of c)."""
    for node in list(graph.nodes):
        if node.op != "Identity" or not is_default(node) or len(node.inputs) != 1:
            continue
        value = const_value(node.inputs[0])
        out = node.outputs[0]
        if value is None or out in graph.outputs:
            continue
        const = gs.Constant(out.name, np.array(value))
        copies[out.name] = const_key(node.inputs[0])  # type: ignore[assignment]
        for consumer in list(out.outputs):
            swap_input(consumer, out, const)
        node.outputs.clear()
        node.inputs.clear()


def _unshare_constants(graph: gs.Graph, copies: MutableMapping[str, str]) -> None:
    """Give each reader of a shared constant (more than one element) its own copy.

    Sharing is storage, not meaning: an exporter merges equal tensors.  With copies each
    op's weights can be sliced on their own; saving restores sharing where still equal.
    """
    seen: set[str] = set()
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            key = const_key(t)
            if key is None:
                continue
            shape = tensor_shape(t, {})
            if shape is None or math.prod(shape) <= 1:
                continue
            if key not in seen:
                seen.add(key)
                continue
            name = fresh_name(f"{key}__copy", graph.tensors())
            copies[name] = key
            node.inputs[i] = gs.Constant(name, np.array(const_value(t)))


def _normalise_gemm_bias(graph: gs.Graph) -> None:
    """A Gemm bias of shape (1, N) broadcasts like (N,); store it as (N,)."""
    for node in graph.nodes:
        if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            c = node.inputs[2]
            if c.values.ndim == 2 and c.values.shape[0] == 1 and len(c.outputs) == 1:
                c.values = c.values.reshape(-1)


# ---------------------------------------------------------- constant folding
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_LIMIT = 64  # most nodes a constant subgraph may have to be evaluated


def fold(
    t: gs.Tensor, cache: MutableMapping[str, np.ndarray | None], opsets: Sequence[onnx.OperatorSetIdProto]
) -> np.ndarray | None:
    """The value of ``t`` when it is computed from constants alone (an exporter's
    arithmetic on shapes and pads), evaluated once with the ONNX reference evaluator;
    ``cache`` keeps the answers (None for "not a constant") until the graph is edited."""
    value = const_value(t)
    if value is not None or not t.name:
        return value
    if t.name in cache:
        return cache[t.name]
    nodes = _constant_ancestry(t)
    result = None
    if nodes is not None:
        try:
            result = _evaluate(nodes, t, opsets)
        except Exception as exc:  # an op the reference evaluator lacks
            logger.debug("cannot evaluate constant `%s`: %s", t.name, exc)
    cache[t.name] = result
    return result


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
        if not is_default(node) or node.op in _NONDETERMINISTIC or any(isinstance(a, gs.Graph) for a in node.attrs.values()):
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
