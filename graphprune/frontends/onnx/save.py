"""Turning the edited graph back into an ONNX model and writing it.

:func:`export_model` gives the graph the original model's header (IR version, opsets,
producer, metadata).  :func:`model_for_save` prepares the file's content: constants that
loading unshared (:func:`graphprune.frontends.onnx.load.normalise`) and that are still
equal are shared again, graph inputs and outputs get their original (possibly symbolic)
types back, stale ``value_info`` is dropped and node doc strings and metadata return.
:func:`save_model` writes atomically, never over the input file or its external data.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .load import OnnxLoadError
from .tensors import constant_node_value, np_dtype, proto_nbytes, swap_input

__all__ = ["EXTERNAL_DATA_THRESHOLD", "export_model", "model_for_save", "remerge", "save_model"]

EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)  # bytes: larger models are saved with external data


def export_model(graph: gs.Graph, header: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a ModelProto with ``header``'s IR version, opsets and metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
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


def remerge(graph: gs.Graph, copies: Mapping[str, str]) -> None:
    """Point readers of a constant copy back at its original when both are still equal."""
    tensors = graph.tensors()
    for copy_name, source_name in copies.items():
        c, s = tensors.get(copy_name), tensors.get(source_name)
        if not isinstance(c, gs.Constant) or s is None:
            continue
        sv = np.asarray(s.values) if isinstance(s, gs.Constant) else (
            constant_node_value(s.inputs[0]) if s.inputs and s.inputs[0].op == "Constant" else None
        )
        cv = np.asarray(c.values)
        if sv is None or sv.dtype != cv.dtype or sv.shape != cv.shape or not np.array_equal(sv, cv):
            continue
        for consumer in list(c.outputs):
            swap_input(consumer, c, s)
    graph.cleanup(remove_unused_graph_inputs=False)


def model_for_save(
    graph: gs.Graph,
    header: onnx.ModelProto,
    copies: Mapping[str, str],
    dtypes: Mapping[str, str],
    io_protos: Mapping[str, onnx.ValueInfoProto],
    node_docs: Mapping[str, tuple[str, list[Any]]],
) -> onnx.ModelProto:
    """The model to save: symbolic input/output dims restored, no stale value_info."""
    graph = graph.copy()
    remerge(graph, copies)
    for t in graph.inputs + graph.outputs:
        if isinstance(t, gs.Variable) and t.dtype is None and t.name in dtypes:
            t.dtype = np_dtype(dtypes[t.name])
    model = export_model(graph, header)
    for vi in list(model.graph.input) + list(model.graph.output):
        original = io_protos.get(vi.name)
        if original is not None:
            vi.CopyFrom(original)
    del model.graph.value_info[:]
    for node in model.graph.node:
        doc = node_docs.get(node.name)
        if doc is not None:
            node.doc_string = doc[0]
            node.metadata_props.extend(doc[1])
    return model


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
    from ...emit import atomic_path

    path = os.fspath(path)
    real = os.path.realpath(path)
    protected = {os.path.realpath(p) for p in protect if p and not p.startswith("<")}
    if real in protected:
        raise OnnxLoadError(f"refusing to overwrite the input file `{path}`: choose another output path")
    if external_data is None:
        external_data = proto_nbytes(model) > EXTERNAL_DATA_THRESHOLD
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
