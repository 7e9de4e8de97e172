"""Shape propagation for fx graphs without computing the expensive ops.

``torch.fx``'s ``ShapeProp`` runs the model on the example input to record every
node's shape; at 224x224 that is a full forward, most of it convolutions.  Shapes
do not need the values, so :class:`ShapeOnlyProp` replaces the arithmetic of the ops
whose output shape is a function of input *shapes* alone:

* ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules (exact types: a subclass may pad or
  reshape in its own ``forward``): the output shape is computed from the window
  arithmetic, ``out = floor((in + 2*pad - dilation*(kernel-1) - 1) / stride) + 1`` per
  spatial axis (a non-zero padding mode pads by the same amounts first; ``same`` keeps
  ``in``), or ``(*lead, out_features)``, and a zero tensor of that shape is passed on;
* max and average pool modules (exact types, no returned indices): the same window
  arithmetic, with PyTorch's ceil mode (``ceil`` instead of ``floor``, and a last
  window that would start in the end padding dropped);
* shape-preserving modules (norms, activations, dropout, identity) and element-wise
  functions (``relu``, ``sigmoid``... with no other tensor argument): the input itself
  is passed on.

Everything else runs for real on these stand-in values.  This is exact for shapes as
long as no op's output *shape* depends on tensor *values*; graphs that contain such
an op (``nonzero``, ``item``, boolean masking... :func:`values_decide_shapes`) are
propagated with real values instead.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["ShapeOnlyProp", "values_decide_shapes"]

_COMPUTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PRESERVING_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout,
}
"""Element-wise functions: the output has the input's shape whatever the other arguments."""
_SHAPE_PRESERVING = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_VALUE_SHAPED = {
    "item", "tolist", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "histc",
    "repeat_interleave", "__bool__", "__int__", "__index__", "__float__", "nonzero_static", "masked_scatter",
}
"""Ops whose output shape (or a Python value that later sets a shape) depends on tensor values."""


def values_decide_shapes(gm: fx.GraphModule) -> bool:
    """True when some node's result shape may depend on tensor values: an op of
    :data:`_VALUE_SHAPED`, one-argument ``torch.where``, or indexing with a tensor."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name in _VALUE_SHAPED or (n.target is torch.where and len(n.args) + len(n.kwargs) == 1):
            return True
        if n.target is operator.getitem and len(n.args) > 1 and _holds_tensor_node(n.args[1]):
            return True
    return False


def _holds_tensor_node(index: Any) -> bool:
    if isinstance(index, fx.Node):
        return True  # an index computed by the graph (a tensor, or a value read from one)
    if isinstance(index, (tuple, list)):
        return any(_holds_tensor_node(i) for i in index)
    return False


class ShapeOnlyProp(ShapeProp):
    """``ShapeProp`` that computes conv/linear shapes from their arithmetic, passes
    shape-preserving modules' inputs through (see the module docstring) and records a
    tensor's shape, dtype and strides only (no memory-format or quantisation probes)."""

    def run_node(self, n: fx.Node) -> Any:
        result = fx.Interpreter.run_node(self, n)
        found = False

        def tensor_meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return TensorMetadata(obj.shape, obj.dtype, obj.requires_grad, obj.stride(), None, False, {})
            return obj

        meta = map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        mod = self.fetch_attr(target)
        kind = type(mod)
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if kind in _SHAPE_PRESERVING:
                return x
            if kind in _COMPUTED:
                return torch.zeros(_output_shape(mod, x.shape), dtype=x.dtype, device=x.device)
            if kind in _POOLS and not getattr(mod, "return_indices", False):
                return torch.zeros(_pool_shape(mod, x.shape), dtype=x.dtype, device=x.device)
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if target in _PRESERVING_FUNCTIONS and isinstance(x, torch.Tensor) and x.is_floating_point() \
                and not any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
            return x
        return super().call_function(target, args, kwargs)


def _output_shape(mod: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    """The output shape of the conv or linear module ``mod`` on an input of ``shape``."""
    if isinstance(mod, nn.Linear):
        if not shape or shape[-1] != mod.in_features:
            raise RuntimeError(f"{mod}: input of shape {tuple(shape)} has not {mod.in_features} features")
        return (*shape[:-1], mod.out_features)
    nd = len(mod.kernel_size)  # type: ignore[arg-type]
    if len(shape) not in (nd + 1, nd + 2) or shape[-nd - 1] != mod.in_channels:
        raise RuntimeError(f"{mod}: input of shape {tuple(shape)} is not (batch, {mod.in_channels}, {nd} spatial axes)")
    out = []
    for axis, size in enumerate(shape[-nd:]):
        k, st, d = mod.kernel_size[axis], mod.stride[axis], mod.dilation[axis]  # type: ignore[index]
        if mod.padding == "same":
            out.append(size)
            continue
        pad = 0 if mod.padding == "valid" else mod.padding[axis]  # type: ignore[index]
        n = (size + 2 * pad - d * (k - 1) - 1) // st + 1
        if n < 1:
            raise RuntimeError(f"{mod}: input of shape {tuple(shape)} is smaller than its window")
        out.append(n)
    return (*shape[:-nd - 1], mod.out_channels, *out)


def _pool_shape(mod: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    """The output shape of a max or average pool module on an input of ``shape``:
    ``floor`` (or ``ceil`` in ceil mode, where a last window starting in the end
    padding is dropped) of ``(in + 2*pad - dilation*(kernel-1) - 1) / stride``, plus 1."""
    nd = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2}.get(type(mod), 3)
    if len(shape) not in (nd + 1, nd + 2):
        raise RuntimeError(f"{mod}: input of shape {tuple(shape)} has not {nd} spatial axes")

    def per_axis(value: Any) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd

    kernel = per_axis(mod.kernel_size)
    stride = per_axis(mod.stride if mod.stride else mod.kernel_size)  # type: ignore[attr-defined]
    pad, dilation = per_axis(mod.padding), per_axis(getattr(mod, "dilation", 1))
    out = []
    for size, k, st, p, d in zip(shape[-nd:], kernel, stride, pad, dilation):
        span = size + 2 * p - d * (k - 1) - 1
        n = (span + (st - 1 if mod.ceil_mode else 0)) // st + 1
        if mod.ceil_mode and (n - 1) * st >= size + p:
            n -= 1
        if n < 1:
            raise RuntimeError(f"{mod}: input of shape {tuple(shape)} is smaller than its window")
        out.append(n)
    return (*shape[:-nd], *out)
