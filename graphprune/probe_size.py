"""Smaller default probes for the exactness check: same batch and channels, fewer pixels.

The check compares the rewritten graph with its projected reference on random probes.
Its cost is two forwards per probe, proportional to the spatial size.  A smaller
spatial size proves the same thing when every edited op still sees real data under
every tap of its window:

* the passes edit channels (which slices exist), kernel rings, groups and ranks of
  convs and linear layers; all of these act the same at every spatial position, so a
  wrong channel, tap or block shows at any position where the window covers data;
* if every conv's (and pooling window's) input is at least as large as its dilated
  kernel on every spatial axis, every tap of every kernel meets a real input value at
  some output position, and its border positions meet the padding, so each weight and
  each padding change the rewrite made still reaches the output;
* batch and channel axes are kept, so every channel slice of every op is still there.

:func:`shrink_factor` is the largest integer factor ``f <= max_factor`` for which the
captured shapes divided by ``f`` still satisfy the window condition at every conv and
pool; :func:`reduced_samples` crops each image-like probe (rank 4 or 5: batch,
channels, spatial axes) to ``ceil(size / f)`` on its spatial axes.  Only graphs that
run at another size are cropped (``frontend.shape_polymorphic``: fx, whose code is the
model's own Python, and ONNX, which builds a session per size); a graph whose ops fix a
size (a flatten into a linear layer without pooling, fixed position embeddings) fails
there, and the caller then checks at the captured size.  A frontend that can infer
every value's shape at the cropped size without running (``frontend.shapes_at``: ONNX)
has the window condition checked on those shapes, not on the captured ones divided by
``f``: a slice or a fixed-size resize in between would make them differ; where that
inference already fails, nothing is cropped.  User-given check inputs are never shrunk.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .arrays import as_numpy
from .graph import Graph, Node

__all__ = ["reduced_samples", "shrink_factor", "windows_fit_at"]

WINDOW_KINDS = ("conv", "conv_transpose", "pool")


def shrink_factor(graph: Graph, max_factor: int = 4) -> int:
    """The largest ``f <= max_factor`` keeping every conv/pool input at least one dilated
    kernel wide on every spatial axis at ``1/f`` of the captured size (1: do not shrink).
    Axes whose window is one wide never limit it: cropping keeps every axis non-empty."""
    best = max_factor
    for node in graph.nodes:
        shape = _window_input_shape(graph, node)
        if shape is None:
            continue
        for size, extent in zip(shape[2:], _extents(node, len(shape) - 2)):
            if extent > 1:  # a one-wide window fits any non-empty axis (a 1x1 conv after global pooling)
                best = min(best, max(size // extent, 1))
    return best


def _window_input_shape(graph: Graph, node: Node) -> tuple[int, ...] | None:
    """The captured shape of a conv's or pool's input (None for other nodes, or no spatial axes)."""
    if node.kind not in WINDOW_KINDS or not node.inputs:
        return None
    shape = graph.shape(node.inputs[0])
    return tuple(shape) if shape is not None and len(shape) >= 3 else None


def _extents(node: Node, rank: int) -> tuple[int, ...]:
    """Per spatial axis, the dilated kernel's extent ``d * (k - 1) + 1``."""
    kernel = tuple(node.attrs.get("kernel", ())) or (1,) * rank
    dilation = tuple(node.attrs.get("dilation", ())) or (1,) * rank
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))


def windows_fit_at(graph: Graph, input_shapes: Sequence[Sequence[int]]) -> bool:
    """Whether every conv and pool sees a full window when the graph inputs have
    ``input_shapes``, judged on the shapes the frontend infers there
    (``frontend.shapes_at``); False when it cannot infer them (the graph cannot run
    there), True for frontends without that inference (their sizes follow the code)."""
    shapes_at = getattr(graph.frontend, "shapes_at", None)
    if shapes_at is None:
        return True
    shapes = shapes_at(input_shapes)
    if shapes is None:
        return False
    for node in graph.nodes:
        if _window_input_shape(graph, node) is None:
            continue
        small = shapes.get(node.inputs[0])
        if small is None:
            return False
        if any(size < extent for size, extent in zip(small[2:], _extents(node, len(small) - 2))):
            return False
    return True


def reduced_samples(graph: Graph, samples: Sequence[Sequence[Any]], max_factor: int = 4) -> list[list[np.ndarray]] | None:
    """``samples`` (numpy arrays or tensors) as numpy arrays, image-like inputs cropped by
    :func:`shrink_factor`; None when the graph cannot run at another size, nothing
    would shrink, or a window would not fit there (:func:`windows_fit_at`)."""
    if not getattr(graph.frontend, "shape_polymorphic", False):
        return None
    f = shrink_factor(graph, max_factor)
    if f < 2:
        return None
    out, shrunk = [], False
    for xs in samples:
        row = []
        for x in xs:
            x = as_numpy(x)
            if np.issubdtype(x.dtype, np.floating) and x.ndim in (4, 5):
                index = (slice(None), slice(None), *(slice(0, math.ceil(s / f)) for s in x.shape[2:]))
                x = np.ascontiguousarray(x[index])
                shrunk = True
            row.append(x)
        out.append(row)
    if not shrunk:
        return None
    sizes = {tuple(tuple(x.shape) for x in row) for row in out}
    return out if all(windows_fit_at(graph, size) for size in sizes) else None
