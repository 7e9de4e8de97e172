"""Aten ops -> canonical kinds: the classification table of the export frontend.

``torch.export`` (non-strict, training IR) spells every operation one way: ``nn.Conv2d``,
``F.conv2d`` and a timm ``Conv2dSame`` all arrive as ``aten.conv2d``; a fused
``BatchNormAct2d``, ``F.batch_norm`` and ``nn.BatchNorm2d`` as ``aten.batch_norm``.  So
one entry per aten op covers every model that uses it.  Each entry is a small function
``(node) -> Classified`` that names the canonical kind, its attrs, the tensor inputs
that carry channels and the parameters (role -> ``get_attr`` node) it owns.

Parameters must come straight from a ``get_attr`` node (a weight of the model).  A conv
whose weight is computed in the graph (weight standardisation, a parametrization) is
classified ``unknown``, which freezes its channels with a reason that names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

__all__ = ["Classified", "classify_aten", "is_aten", "packet_name", "conv_args", "slice_range", "CONV_ARG_NAMES"]


@dataclass
class Classified:
    """What one aten node is in the view: ``params`` maps a role to the fx node feeding it."""

    kind: str
    inputs: list[fx.Node]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, fx.Node] = field(default_factory=dict)


def is_aten(n: fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)


def packet_name(n: fx.Node) -> str:
    """``aten.conv2d.default`` -> ``conv2d``."""
    return n.target._overloadpacket.__name__  # type: ignore[union-attr]


def _arg(n: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _is_node(a: Any) -> bool:
    return isinstance(a, fx.Node)


def _ints(v: Any, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(x) for x in v)
    return v * nd if len(v) == 1 else v


# -------------------------------------------------------------- weighted ops
CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def conv_args(n: fx.Node) -> list[Any]:
    """The positional arguments of an ``aten.conv{1,2,3}d`` node, defaults filled in."""
    return [_arg(n, i, name, d) for i, (name, d) in enumerate(zip(CONV_ARG_NAMES, _CONV_DEFAULTS))]


def _weights(kind: str, x: fx.Node, n: fx.Node, **params: Any) -> Classified:
    """A weighted op whose parameters must all be weights of the model (get_attr)."""
    roles = {r: p for r, p in params.items() if p is not None}
    if not all(_is_node(p) and p.op == "get_attr" for p in roles.values()):
        return Classified("unknown", [x], {"why": "its weights are computed in the graph"})
    return Classified(kind, [x], {}, roles)


def _conv_attrs(w: fx.Node, stride: Any, padding: Any, dilation: Any, groups: Any) -> dict[str, Any] | None:
    """Canonical conv attrs from aten arguments; ``None`` for a string padding other than
    ``valid`` or a stride-1 ``same`` (which pad by ``d(k-1)``, the extra one at the end)."""
    shape = w.meta["tensor_meta"].shape
    nd = len(shape) - 2
    kernel = tuple(int(k) for k in shape[2:])
    dil = _ints(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads: tuple[int, ...] = (0,) * (2 * nd)
        elif padding == "same" and _ints(stride, nd) == (1,) * nd:
            total = [d * (k - 1) for d, k in zip(dil, kernel)]
            pads = tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
        else:
            return None
    else:
        pads = _ints(padding, nd) * 2
    return {"groups": int(groups), "stride": _ints(stride, nd), "dilation": dil, "kernel": kernel, "pads": pads}


def _conv(n: fx.Node) -> Classified:
    """aten.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)."""
    x, w, b, stride, padding, dilation, groups = conv_args(n)
    c = _weights("conv", x, n, weight=w, bias=b)
    if c.kind == "conv":
        attrs = _conv_attrs(w, stride, padding, dilation, groups)
        if attrs is None:
            return Classified("unknown", [x], {"why": f"padding `{padding}`"})
        c.attrs = attrs
    return c


def _convolution(n: fx.Node) -> Classified:
    """aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups): a plain conv when not transposed."""
    if bool(_arg(n, 6, "transposed", False)):
        return Classified("unknown", [n.args[0]], {"why": "transposed aten.convolution"})
    x, w, b = n.args[0], n.args[1], _arg(n, 2, "bias")
    c = _weights("conv", x, n, weight=w, bias=b)
    if c.kind == "conv":
        c.attrs = _conv_attrs(w, _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0), _arg(n, 5, "dilation", 1),
                              _arg(n, 8, "groups", 1)) or {}
    return c


def _conv_transpose(n: fx.Node) -> Classified:
    """aten.conv_transpose{1,2,3}d(input, weight, bias, stride, padding, output_padding, groups, dilation)."""
    x, w, b = n.args[0], n.args[1], _arg(n, 2, "bias")
    c = _weights("conv_transpose", x, n, weight=w, bias=b)
    if c.kind == "conv_transpose":
        c.attrs = _conv_attrs(w, _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0), _arg(n, 7, "dilation", 1),
                              _arg(n, 6, "groups", 1)) or {}
    return c


def _linear(n: fx.Node) -> Classified:
    """aten.linear(input, weight, bias): weight (out, in)."""
    return _weights("linear", n.args[0], n, weight=n.args[1], bias=_arg(n, 2, "bias"))


def _batch_norm(n: fx.Node) -> Classified:
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum,
    eps, cudnn): in eval mode a per-channel affine map.  Batch statistics (training=True
    or no running stats) are per channel too.  aten.instance_norm has the same arguments
    (``use_input_stats`` for ``training``) and normalises each channel of each sample."""
    c = _weights(
        "batchnorm", n.args[0], n, weight=_arg(n, 1, "weight"), bias=_arg(n, 2, "bias"),
        running_mean=_arg(n, 3, "running_mean"), running_var=_arg(n, 4, "running_var"),
    )
    if c.kind == "batchnorm":
        c.attrs = {"eps": float(_arg(n, 7, "eps", 1e-5))}
        if packet_name(n) == "instance_norm":
            c.attrs["instance"] = True
    return c


def _native_batch_norm(n: fx.Node) -> Classified:
    """aten._native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)."""
    x = n.args[0]
    c = _weights("batchnorm", x, n, weight=n.args[1], bias=n.args[2], running_mean=n.args[3], running_var=n.args[4])
    if c.kind == "batchnorm":
        c.attrs = {"eps": float(_arg(n, 6, "eps", 1e-5))}
    return c


def _layer_norm(n: fx.Node) -> Classified:
    """aten.layer_norm(input, normalized_shape, weight, bias, eps)."""
    c = _weights("layernorm", n.args[0], n, weight=_arg(n, 2, "weight"), bias=_arg(n, 3, "bias"))
    c.attrs["normalized_ndim"] = len(n.args[1])
    return c


def _group_norm(n: fx.Node) -> Classified:
    """aten.group_norm(input, num_groups, weight, bias, eps)."""
    c = _weights("groupnorm", n.args[0], n, weight=_arg(n, 2, "weight"), bias=_arg(n, 3, "bias"))
    if c.kind == "groupnorm":
        c.attrs = {"num_groups": int(n.args[1])}
    return c


def _prelu(n: fx.Node) -> Classified:
    c = _weights("act", n.args[0], n, weight=n.args[1])
    if c.kind == "act":
        c.attrs = {"fn": "prelu", "zero_preserving": True}
    return c


# ------------------------------------------------------------ elementwise ops
# f(0) == 0 decides whether removing a zeroed channel before the op is exact.
_ZERO_PRESERVING = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "mish", "mish_",
    "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_",
    "hardshrink", "softshrink", "neg", "abs", "sin", "sinh", "asinh", "atan", "erf",
}
_NOT_ZERO_PRESERVING = {
    "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "softplus", "exp", "exp_", "log_sigmoid",
    "cos", "cosh", "reciprocal", "rsqrt", "sqrt", "square", "pow", "log", "logit",
}


def _activation(n: fx.Node) -> Classified:
    """Elementwise unary functions; ``zero_preserving`` records f(0) == 0."""
    name = packet_name(n)
    if name in ("hardtanh", "hardtanh_"):
        lo, hi = float(_arg(n, 1, "min_val", -1.0)), float(_arg(n, 2, "max_val", 1.0))
        return Classified("act", [n.args[0]], {"fn": "hardtanh", "zero_preserving": lo <= 0.0 <= hi})
    if name in ("clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"):
        return _clamp(n, name)
    return Classified("act", [n.args[0]], {"fn": name.rstrip("_"), "zero_preserving": name in _ZERO_PRESERVING})


def _clamp(n: fx.Node, name: str) -> Classified:
    lo = _arg(n, 1, "min") if name.startswith(("clamp_min", "clamp_")) and not name.startswith("clamp_max") else None
    hi = _arg(n, 1, "max") if name.startswith("clamp_max") else _arg(n, 2, "max")
    if name.startswith("clamp_min"):
        hi = None
    if _is_node(lo) or _is_node(hi):
        return Classified("unknown", list(_tensor_args(n)), {"why": "clamp bounds are tensors"})
    zero = (lo is None or float(lo) <= 0.0) and (hi is None or float(hi) >= 0.0)
    return Classified("act", [n.args[0]], {"fn": "clamp", "zero_preserving": zero})


def _identity(n: fx.Node) -> Classified:
    """Ops that leave values where they are: dropout (eval), copies, casts, aliases."""
    return Classified("identity", [n.args[0]])


def _expand_as(n: fx.Node) -> Classified:
    """aten.expand_as(y, x): y broadcast to x's shape (an SE gate's ``y.expand_as(x)``).
    Values come from y alone, index for index on every axis whose size it keeps, so it
    is an identity of y; x is an input too, because the output takes x's shape: the
    identity rule ties x's equal-size axes (its channels) to y's, and x's values, which
    the output never reads, do not count for the output's zero channels."""
    return Classified("identity", [n.args[0], n.args[1]])


def _binary(kind: str) -> Callable[[fx.Node], Classified]:
    def classify(n: fx.Node) -> Classified:
        operands = list(n.args[:2])
        positions = [i for i, a in enumerate(operands) if _is_node(a) and _tensor_meta(a) is not None]
        scalars = [a for i, a in enumerate(operands) if i not in positions]
        scalar: Any = None
        if scalars:
            s = scalars[0]
            scalar = float(s) if isinstance(s, (int, float, bool)) else "dynamic"
        alpha = _arg(n, 2, "alpha")
        inputs = [operands[i] for i in positions]
        return Classified(kind, inputs, {"tensor_positions": positions, "scalar": scalar, "alpha": alpha})

    classify.__doc__ = f"aten.{kind}: elementwise with broadcasting (tensor or scalar operands)."
    return classify


def _rsub(n: fx.Node) -> Classified:
    """aten.rsub.Scalar(x, c) = c - x: a sub whose tensor operand is in position 1."""
    c = n.args[1]
    return Classified("sub", [n.args[0]], {"tensor_positions": [1], "scalar": float(c) if not _is_node(c) else "dynamic", "alpha": None})


# ----------------------------------------------------------------- layout ops
def _cat(n: fx.Node) -> Classified:
    return Classified("concat", list(n.args[0]), {"axis": int(_arg(n, 1, "dim", 0))})


def _split(n: fx.Node) -> Classified:
    """split.Tensor (by size), split_with_sizes, chunk; ``equal`` marks a chunk, whose
    Python spelling (``x.chunk(2, 1)``) splits into equal parts whatever the width."""
    name = packet_name(n)
    return Classified("split", [n.args[0]], {"axis": int(_arg(n, 2, "dim", 0)), "equal": name == "chunk"})


def _reshape(n: fx.Node) -> Classified:
    return Classified("reshape", [n.args[0]])


def _flatten(n: fx.Node) -> Classified:
    return Classified("flatten", [n.args[0]], {"start": int(_arg(n, 1, "start_dim", 0)), "end": int(_arg(n, 2, "end_dim", -1))})


def _permute(n: fx.Node) -> Classified:
    return Classified("permute", [n.args[0]], {"perm": [int(d) for d in n.args[1]]})


def _transpose(n: fx.Node) -> Classified:
    if packet_name(n) == "t":
        return Classified("transpose", [n.args[0]], {"axes": (0, 1)})
    return Classified("transpose", [n.args[0]], {"axes": (int(n.args[1]), int(n.args[2]))})


def _reduce(n: fx.Node) -> Classified:
    dims = _arg(n, 1, "dim")
    axes = None if dims is None or (isinstance(dims, (list, tuple)) and not dims and packet_name(n) != "amax") else dims
    if isinstance(axes, int):
        axes = [axes]
    return Classified("reduce", [n.args[0]], {"axes": axes, "keepdim": bool(_arg(n, 2, "keepdim", False))})


def _softmax(n: fx.Node) -> Classified:
    return Classified("softmax", [n.args[0]], {"axis": int(_arg(n, 1, "dim", -1))})


def _squeeze(n: fx.Node) -> Classified:
    x = n.args[0]
    dims = _arg(n, 1, "dim")
    if dims is None:  # squeeze every size-1 axis
        shape = _tensor_meta(x).shape  # type: ignore[union-attr]
        dims = [i for i, s in enumerate(shape) if s == 1]
    return Classified("squeeze", [x], {"axes": [dims] if isinstance(dims, int) else list(dims)})


def _unsqueeze(n: fx.Node) -> Classified:
    return Classified("unsqueeze", [n.args[0]], {"axes": [int(n.args[1])]})


def _slice(n: fx.Node) -> Classified:
    """aten.slice(x, dim, start, end, step): a slice that keeps the whole axis is an identity."""
    x = n.args[0]
    dim, start, end, step = int(_arg(n, 1, "dim", 0)), _arg(n, 2, "start"), _arg(n, 3, "end"), _arg(n, 4, "step", 1)
    shape = _tensor_meta(x).shape  # type: ignore[union-attr]
    size = shape[dim]
    if (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= size)) and step == 1:
        return Classified("identity", [x])
    if not all(isinstance(v, int) or v is None for v in (start, end, step)):
        return Classified("slice", [x], {"axes": [dim]})
    dim = dim + len(shape) if dim < 0 else dim
    return Classified("slice", [x], {"axes": [dim], "ranges": {dim: slice_range(start, end, step, size)}})


def slice_range(start: int | None, end: int | None, step: int | None, size: int) -> tuple[int, int, int]:
    """Python/ONNX slice bounds normalised to ``0 <= start <= end <= size`` (positive step)."""
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = max(0, min(start, size)), max(0, min(end, size))
    return start, max(start, end), 1 if step is None else int(step)


def _index(n: fx.Node) -> Classified:
    """aten.index(x, [None, ..., idx]) with one index tensor: a gather along its axis (the
    relative-position bias tables of Swin); other index patterns are ``unknown``."""
    x, indices = n.args[0], list(n.args[1])
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1 or not _is_node(indices[given[0]]) or len(_tensor_meta(indices[given[0]]).shape) != 1:
        return Classified("unknown", list(_tensor_args(n)), {"why": "advanced indexing"})
    return Classified("gather", [x, indices[given[0]]], {"axis": given[0]})


def _index_select(n: fx.Node) -> Classified:
    return Classified("gather", [n.args[0], n.args[2]], {"axis": int(n.args[1])})


def _spatial(kind: str) -> Callable[[fx.Node], Classified]:
    def classify(n: fx.Node) -> Classified:
        attrs: dict[str, Any] = {}
        if kind == "pad":
            pads = [int(p) for p in n.args[1]]
            rank = len(_tensor_meta(n.args[0]).shape)  # type: ignore[union-attr]
            attrs["pads"] = pads
            # torch order: (lo, hi) pairs from the last axis backwards
            attrs["padded_axes"] = [rank - 1 - i // 2 for i in range(0, len(pads), 2) if pads[i] or pads[i + 1]]
        return Classified(kind, [n.args[0]], attrs)

    classify.__doc__ = f"Spatial ops ({kind}): channels pass through."
    return classify


def _matmul(n: fx.Node) -> Classified:
    """Products of activations; an einsum's subscripts are not read, so it is marked."""
    if packet_name(n) == "einsum":
        return Classified("matmul", list(_tensor_args(n)), {"einsum": n.args[0]})
    return Classified("matmul", list(_tensor_args(n)))


def _sdpa(n: fx.Node) -> Classified:
    """aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa): inputs q, k, v and the mask when it is a tensor."""
    q, k, v = n.args[:3]
    mask = _arg(n, 3, "attn_mask")
    inputs = [q, k, v] + ([mask] if _is_node(mask) else [])
    attrs = {"scale": _arg(n, 6, "scale"), "causal": bool(_arg(n, 5, "is_causal", False)),
             "gqa": bool(_arg(n, 7, "enable_gqa", False))}
    return Classified("attention", inputs, attrs)


def _select(n: fx.Node) -> Classified:
    """aten.select(x, dim, index) and aten.unbind(x, dim): single indices of one axis."""
    if packet_name(n) == "unbind":
        return Classified("unbind", [n.args[0]], {"axis": int(_arg(n, 1, "dim", 0))})
    return Classified("select", [n.args[0]], {"axis": int(n.args[1]), "index": n.args[2]})


def _tensor_meta(n: Any) -> Any:
    meta = n.meta.get("tensor_meta") if _is_node(n) else None
    return meta if hasattr(meta, "shape") else None


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a) or a)
    return [a for a in out if _tensor_meta(a) is not None or isinstance(a.meta.get("tensor_meta"), (list, tuple))]


_TABLE: dict[str, Callable[[fx.Node], Classified]] = {}


def _register(fn: Callable[[fx.Node], Classified], *names: str) -> None:
    for name in names:
        _TABLE[name] = fn


_register(_conv, "conv1d", "conv2d", "conv3d")
_register(_convolution, "convolution")
_register(_conv_transpose, "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_register(_linear, "linear")
_register(_batch_norm, "batch_norm", "instance_norm")
_register(_native_batch_norm, "_native_batch_norm_legit_no_training")
_register(_layer_norm, "layer_norm")
_register(_group_norm, "group_norm")
_register(_prelu, "prelu", "_prelu_kernel")
_register(_activation, *_ZERO_PRESERVING, *_NOT_ZERO_PRESERVING, "hardtanh", "hardtanh_", "clamp", "clamp_",
          "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")
_register(_identity, "dropout", "dropout_", "alpha_dropout", "feature_dropout", "feature_alpha_dropout", "clone",
          "contiguous", "alias", "detach", "detach_", "lift_fresh_copy", "_to_copy", "to", "type_as")
for _kind, _names in {"add": ("add", "add_"), "sub": ("sub", "sub_"), "mul": ("mul", "mul_"), "div": ("div", "div_")}.items():
    _register(_binary(_kind), *_names)
_register(_expand_as, "expand_as")
_register(_rsub, "rsub")
_register(_cat, "cat", "concat", "concatenate")
_register(_split, "split", "split_with_sizes", "chunk")
_register(_reshape, "view", "reshape", "_unsafe_view", "unflatten")
_register(_flatten, "flatten")
_register(_permute, "permute")
_register(_transpose, "transpose", "swapaxes", "swapdims", "t")
_register(_reduce, "mean", "sum", "amax")
_register(_softmax, "softmax", "_softmax", "log_softmax", "_log_softmax")
_register(_squeeze, "squeeze", "squeeze_")
_register(_unsqueeze, "unsqueeze", "unsqueeze_")
_register(_slice, "slice")
_register(_index_select, "index_select")
_register(_index, "index")
_register(_spatial("pool"), "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
          "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices", "upsample_nearest1d",
          "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d",
          "upsample_linear1d", "upsample_trilinear3d", "_upsample_bilinear2d_aa")
_register(_spatial("pad"), "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
          "replication_pad1d", "replication_pad2d", "replication_pad3d")
_register(_matmul, "matmul", "bmm", "mm", "einsum", "baddbmm")
_register(_sdpa, "scaled_dot_product_attention")
_register(_select, "select", "unbind")


def classify_aten(n: fx.Node) -> Classified:
    """The canonical view of aten node ``n`` (``unknown`` for ops with no entry)."""
    fn = _TABLE.get(packet_name(n))
    if fn is None:
        return Classified("unknown", _tensor_args(n))
    return fn(n)

