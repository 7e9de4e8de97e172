"""The ONNX frontend: read an ONNX model with onnx-graphsurgeon and expose it as a :class:`Graph`.

``load_onnx(path, input_shapes)`` parses and checks the file, fixes dynamic input
dimensions, normalises exporter habits that hide weights, infers every value's shape and
returns a :class:`~graphprune.graph.Graph` over an :class:`OnnxFrontend`.  Passes then
read the view and edit through it; ``graph.save_onnx(path)`` (or :func:`save_model` on
``frontend.to_model()``) writes the result atomically.  The ONNX path needs no torch
beyond the tensors the view hands out.

Modules, one job each:

* :mod:`.load` — reading, validation, external data, :class:`OnnxLoadError`, fixing input
  shapes, unsharing ``Identity(initializer)`` and shared weights, folding
  exporter-computed pads and shapes;
* :mod:`.shapes` — ONNX shape inference, with onnxruntime for what it cannot type;
* :mod:`.classify` — ONNX op -> canonical kind, attrs and params (``MatMul + Add`` ->
  ``linear``), and the view built from them;
* :mod:`.edit` — ``set_param``, ``set_attr``, ``replace_node``, ``insert_gather``;
* :mod:`.save` — the model to save (shared initializers re-merged, symbolic dims
  restored) and the atomic write;
* :mod:`.run` — onnxruntime execution and example inputs;
* :mod:`.frontend` — :class:`OnnxFrontend`, which composes them, and :func:`load_onnx`;
* :mod:`.tensors` — small helpers over graphsurgeon nodes and tensors.
"""
from __future__ import annotations

from .frontend import OnnxFrontend, load_onnx
from .load import OnnxLoadError
from .save import EXTERNAL_DATA_THRESHOLD, save_model

__all__ = ["EXTERNAL_DATA_THRESHOLD", "OnnxFrontend", "OnnxLoadError", "load_onnx", "save_model"]
