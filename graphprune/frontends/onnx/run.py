"""Running an ONNX graph with onnxruntime on CPU.

Sessions have graph optimisations disabled, so the numbers are the graph's own (no
fusions that round differently); ``make_session(model, optimise=True)`` turns them all on
(``ORT_ENABLE_ALL``), which the checks use to measure a model's own float noise.  Models
too large for one protobuf (2 GiB) go through a temporary file with external data.
Example inputs are seeded: standard normal for floating-point inputs, zeros for integer
ones.  :func:`compared_constants` finds the values a model suggests for its integer
inputs (what the check probes feed them, :mod:`graphprune.probes`).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...arrays import as_numpy
from ...graph import GraphError
from .tensors import const_value, np_dtype, proto_nbytes

__all__ = ["compared_constants", "example_inputs", "make_session", "run_session"]


def make_session(model: onnx.ModelProto, optimise: bool = False) -> Any:
    """An onnxruntime CPU session with graph optimisations disabled (all enabled with ``optimise``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimise else level.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if proto_nbytes(model) < 2**31 - 2**26:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="graphprune-") as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


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
