"""Frontends: capture a model and expose it as a :class:`~graphprune.graph.Graph`.

* :mod:`.export` — ``torch.export`` (aten-level graph), the default for PyTorch models;
* :mod:`.fx` — ``torch.fx`` symbolic tracing, for models export cannot take;
* :mod:`.onnx` — ONNX files through onnx-graphsurgeon (needs no torch at run time).

:func:`graphprune.trace` (in :mod:`.capture`) picks between the two PyTorch frontends.
"""
