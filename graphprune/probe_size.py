"""Smaller default probes for the exactness check: same batch and channels, fewer pixels.

The check compares the rewritten graph with its projected reference on random probes.
Its cost is two forwards per probe, proportional to the spatial size.  A smaller
spatial size proves the same thing when every edited op still sees real data under
every tap of its window:

* the passes edit channels (which slices exist), kernel rings, groups and ranks of
  convs and linear layers; all of these act the same at every spatial position, so a
  wrong channel, tap or block shows at any output position where that tap reads data;
* so the condition is, per conv and spatial axis: every tap ``j`` of the kernel that
  reads a real input pixel at the captured size, i.e. ``0 <= t*stride - pad + j*dilation
  < size`` for some output position ``0 <= t < out`` (:func:`reached_taps`), still does
  at the smaller size.  Then each weight that reaches the output in use still does, and
  so does each padding position (the border outputs read it); a tap that reads only
  padding at the captured size (a dilation wider than the map, as in DeepLab's ASPP)
  cannot matter at any size; a transposed conv must see an input at least one dilated
  kernel wide (or as wide as at the captured size);
* batch and channel axes are kept, so every channel slice of every op is still there.

Sizes at a smaller input are not known before running, so the check picks candidate
factors ``f`` (16 down to 1.25) from sizes estimated as ``ceil(captured / f)``
(:func:`candidate_factors`),
crops each image-like probe (rank 4 or 5: batch, channels, spatial axes) to
``ceil(size / f)`` on its spatial axes (:func:`crop`), runs the reference there recording
the real input and output sizes of every conv (:func:`window_values`), and accepts the
factor only if the condition holds on those recorded sizes (:func:`violated_window`);
otherwise the next candidate is tried, and at last the captured size.  Only graphs
whose code computes sizes at run time (the fx frontend: the model's own Python) run at
another size; a graph whose ops fix a size (a flatten into a linear layer without
pooling, fixed position embeddings) fails there and is checked at the captured size.
User-given check inputs are never shrunk.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .arrays import as_numpy
from .graph import Graph, Node

__all__ = ["candidate_factors", "channels_last", "crop", "prefers_channels_last", "reduced_samples", "shrink_factor", "stacked", "reached_taps", "taps_reach_data", "violated_window",
           "window_values"]

WINDOW_KINDS = ("conv", "conv_transpose")
FACTORS = (16.0, 12.0, 10.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.75, 1.5, 1.25)
"""The crop factors considered (a probe of spatial size ``s`` is cropped to ``ceil(s / f)``)."""
MAX_FACTOR = FACTORS[0]

SizeOf = Callable[[str], "tuple[int, ...] | None"]


def reached_taps(size: int, out: int, kernel: int, stride: int = 1, dilation: int = 1, pad: int = 0) -> list[bool]:
    """For each tap ``j < kernel``: whether it reads an input index in ``[0, size)`` at
    some output position ``t < out``, i.e. ``0 <= t*stride - pad + j*dilation < size``."""
    reached = []
    for j in range(kernel):
        offset = j * dilation - pad
        t = max(0, -(offset // stride))  # the first t with t*stride + offset >= 0
        reached.append(t < out and t * stride + offset < size)
    return reached


def taps_reach_data(size: int, out: int, kernel: int, stride: int = 1, dilation: int = 1, pad: int = 0) -> bool:
    """True when every tap reads data somewhere (:func:`reached_taps`)."""
    return all(reached_taps(size, out, kernel, stride, dilation, pad))


def _window(node: Node, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """kernel, stride, dilation, begin pads, end pads of a conv over ``rank`` spatial axes."""
    one = (1,) * rank
    kernel = tuple(node.attrs.get("kernel", ())) or one
    stride = tuple(node.attrs.get("stride", ())) or one
    dilation = tuple(node.attrs.get("dilation", ())) or one
    pads = tuple(node.attrs.get("pads", ())) or (0,) * (2 * rank)
    return kernel, stride, dilation, pads[:rank], pads[rank:]


def _node_ok(node: Node, size: Sequence[int], out: Sequence[int] | None, full: Sequence[int],
             full_out: Sequence[int] | None) -> bool:
    """The window condition at one conv with input spatial ``size`` (output ``out``, None:
    from the window formula): every tap that reads data at the captured sizes ``full``
    (``full_out``) still does.  A transposed conv needs an input one dilated kernel wide
    (or as wide as the captured one)."""
    return _window_ok(node.kind, _window(node, len(size)), tuple(size), None if out is None else tuple(out),
                      tuple(full), None if full_out is None else tuple(full_out))


@functools.lru_cache(maxsize=4096)
def _window_ok(kind: str, window: tuple[tuple[int, ...], ...], size: tuple[int, ...], out: tuple[int, ...] | None,
               full: tuple[int, ...], full_out: tuple[int, ...] | None) -> bool:
    """:func:`_node_ok` on plain values (convs of a network share a few windows and sizes,
    so the answers are cached)."""
    kernel, stride, dilation, begin, end = window
    for axis, s in enumerate(size):
        k, st, d, pb, pe = kernel[axis], stride[axis], dilation[axis], begin[axis], end[axis]
        if kind == "conv_transpose":
            if s < min(d * (k - 1) + 1, full[axis]):
                return False
            continue

        def outputs(n: int, given: Sequence[int] | None) -> int:
            return given[axis] if given is not None else (n + pb + pe - d * (k - 1) - 1) // st + 1

        now = reached_taps(s, outputs(s, out), k, st, d, pb)
        before = reached_taps(full[axis], outputs(full[axis], full_out), k, st, d, pb)
        if any(b and not n for n, b in zip(now, before)):
            return False
    return True


def _windows(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.kind in WINDOW_KINDS and n.inputs and n.outputs]


def violated_window(graph: Graph, size_of: SizeOf) -> Node | None:
    """The first conv of ``graph`` where some tap reads no data at the sizes ``size_of``
    gives (value name -> full shape, None if unknown); None when every conv passes."""
    for node, full, full_out in _captured(graph):
        shape, out = size_of(node.inputs[0]), size_of(node.outputs[0])
        if shape is None or len(shape) < 3:
            continue
        if not _node_ok(node, shape[2:], out[2:] if out is not None and len(out) == len(shape) else None, full, full_out):
            return node
    return None


def _captured(graph: Graph) -> list[tuple[Node, tuple[int, ...], tuple[int, ...] | None]]:
    """Each conv with the captured spatial sizes of its input and output (None if unknown)."""
    out = []
    for node in _windows(graph):
        shape, result = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
        if shape is not None and len(shape) >= 3:
            out.append((node, shape[2:], result[2:] if result is not None and len(result) == len(shape) else None))
    return out


def window_values(graph: Graph) -> set[str]:
    """The values whose sizes :func:`violated_window` reads: input and output of each conv."""
    return {v for n in _windows(graph) for v in (n.inputs[0], n.outputs[0])}


def candidate_factors(graph: Graph, max_factor: float = MAX_FACTOR) -> list[float]:
    """The :data:`FACTORS` up to ``max_factor`` (largest first) at which the window
    condition holds on sizes estimated as ``ceil(captured / f)``; the recorded sizes
    decide (see the module docstring)."""
    windows = {(node.kind, _window(node, len(full)), tuple(full), None if full_out is None else tuple(full_out))
               for node, full, full_out in _captured(graph)}  # convs sharing a window and sizes: one test
    images = [shape[2:] for v in graph.inputs if (shape := graph.shape(v)) is not None and len(shape) in (4, 5)]
    out = []
    for f in FACTORS:
        if not any(math.ceil(s / f) < s for size in images for s in size):
            continue  # crops nothing
        if f <= max_factor and all(_window_ok(kind, window, tuple(math.ceil(s / f) for s in full), None, full, full_out)
                                   for kind, window, full, full_out in windows):
            out.append(f)
    return out


def shrink_factor(graph: Graph, max_factor: float = MAX_FACTOR) -> float:
    """The largest candidate factor (:func:`candidate_factors`), 1 when none."""
    factors = candidate_factors(graph, max_factor)
    return factors[0] if factors else 1


def crop(samples: Sequence[Sequence[Any]], f: float) -> list[list[np.ndarray]] | None:
    """``samples`` as numpy arrays, each floating rank-4/5 input cropped to ``ceil(size /
    f)`` on its spatial axes (batch and channels kept); None when nothing is image-like."""
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
    return out if shrunk else None


GROUPED_SHARE = 0.1
"""Share of grouped convs from which probes run channels-last (:func:`prefers_channels_last`)."""


def prefers_channels_last(graph: Graph) -> bool:
    """At least :data:`GROUPED_SHARE` of the graph's 2-d convs are grouped (depthwise,
    ResNeXt, RegNet): on one CPU thread at probe sizes, PyTorch runs such networks
    1.3-1.9x faster on channels-last inputs (ConvNeXt, ShuffleNet: about even), while
    dense ResNets slow down 1.5-3x (``benchmarks/probe_layout.py``).  The layout
    changes no value beyond rounding, and both graphs of a check run in the same one."""
    convs = [n for n in graph.nodes if n.kind == "conv" and len(n.attrs.get("kernel", ())) == 2]
    grouped = sum(int(n.attrs.get("groups", 1)) > 1 for n in convs)
    return bool(convs) and grouped >= GROUPED_SHARE * len(convs)


def channels_last(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The rank-4 floating arrays of ``arrays`` with channels-last memory (same shape
    and values; a tensor made from one shares its strides), the rest as they are."""
    return [np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            if a.ndim == 4 and np.issubdtype(a.dtype, np.floating) else a for a in arrays]


def stacked(samples: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray] | None:
    """All samples as one: each input concatenated along its leading (batch) axis; None
    when an input has no axis or the samples' shapes beyond the batch axis differ."""
    if not samples:
        return None
    out = []
    for parts in zip(*samples):
        if any(p.ndim == 0 or p.shape[1:] != parts[0].shape[1:] for p in parts):
            return None
        out.append(np.concatenate(parts, axis=0))
    return out


def reduced_samples(graph: Graph, samples: Sequence[Sequence[Any]], max_factor: float = MAX_FACTOR) -> list[list[np.ndarray]] | None:
    """``samples`` cropped by :func:`shrink_factor` (not yet confirmed by recorded sizes);
    None when the graph cannot run at another size or nothing would shrink."""
    if not getattr(graph.frontend, "shape_polymorphic", False):
        return None
    f = shrink_factor(graph, max_factor)
    return crop(samples, f) if f > 1 else None


def recorded_size_of(shapes: Mapping[str, tuple[int, ...]]) -> SizeOf:
    """``size_of`` over the shapes a recording run returned."""
    return lambda value: shapes.get(value)
