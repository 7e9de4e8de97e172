"""The view of an ONNX graph: each op's canonical kind, data inputs, attributes and params.

Every ONNX node is one view node with a canonical kind (the table in
:mod:`graphprune.graph`), except ``MatMul(x, W) + b`` with constant ``W`` (in, out) and
1-D ``b``, which is one ``linear`` node with a bias, as a Gemm is
(:func:`fuse_bias_adds`).  A constant that an op reads as data (an ``Add``'s offset, a
``Mul``'s scale, a ``Gather``'s index) is a ``constant`` view node whose param ``value``
rules can slice.  Param keys are initializer names, or the output name of a ``Constant``
node.  Attribute-like inputs (target shapes, pads, axes, split sizes) that an exporter
computes from constants are folded (:func:`graphprune.frontends.onnx.load.fold`).

Ops the frontend cannot describe exactly become ``unknown`` and their ``target`` says
why (``"Conv: weight `w` is a graph input"``), which ``graphprune inspect`` prints.  A
classifier refuses by raising :class:`Unknown` with the reason.

``auto_pad=SAME_*`` becomes explicit pads
``total = max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)``, the smaller half first for
``SAME_UPPER``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, MutableMapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import Node, ValueInfo
from .load import fold
from .tensors import (
    DEFAULT_DOMAINS, const_key, const_value, constant_node, constant_node_value, is_default, op_name,
    outer_scope_inputs, tensor_shape,
)

__all__ = ["OpContext", "Spec", "Unknown", "build_view", "classify"]

# ------------------------------------------------------------------ op tables
# activation -> f(0) == 0 (ops whose answer depends on attributes are handled below)
ACTIVATIONS: dict[str, bool] = {
    "Relu": True, "LeakyRelu": True, "Elu": True, "Selu": True, "Celu": True, "Tanh": True,
    "Erf": True, "Gelu": True, "HardSwish": True, "Mish": True, "Softsign": True, "Abs": True,
    "Neg": True, "Sin": True, "Sqrt": True, "Floor": True, "Ceil": True, "Round": True,
    "Sign": True, "ThresholdedRelu": True, "Atan": True, "Asin": True, "Sinh": True,
    "Asinh": True, "Atanh": True, "Tan": True,
    "Sigmoid": False, "Softplus": False, "Exp": False, "Log": False, "Reciprocal": False,
    "Cos": False, "Cosh": False, "Acos": False, "Not": False,
}
POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "LpPool", "GlobalLpPool"}
BINARY_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Sum": "add"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
RECURRENT = {"LSTM", "GRU", "RNN"}


class Unknown(Exception):
    """Raised by a classifier: the op becomes ``unknown`` with this reason."""


@dataclass
class Spec:
    """What a classifier found: canonical kind, data inputs, attrs and params."""

    kind: str
    inputs: list[gs.Tensor]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    outputs: list[gs.Tensor] | None = None  # when the view node ends at another op's output


class OpContext:
    """What classifiers and edits read about the graph: shapes, folded constants, opset."""

    def __init__(
        self,
        graph: gs.Graph,
        shapes: dict[str, tuple[int, ...] | None],
        dtypes: dict[str, str],
        opsets: Sequence[onnx.OperatorSetIdProto],
        folded: MutableMapping[str, np.ndarray | None],
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.dtypes = dtypes
        self.opsets = opsets
        self.folded = folded

    def shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        return tensor_shape(t, self.shapes)

    def rank(self, t: gs.Tensor) -> int:
        shape = self.shape(t)
        if shape is None:
            raise Unknown(f"the rank of `{t.name}` is unknown")
        return len(shape)

    def fold(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of ``t`` if it is a constant or computed from constants alone."""
        return fold(t, self.folded, self.opsets)

    def opset(self) -> int:
        """The default-domain opset version."""
        for imp in self.opsets:
            if imp.domain in DEFAULT_DOMAINS:
                return int(imp.version)
        return int(self.graph.opset)

    def weight(self, node: gs.Node, index: int, what: str) -> str:
        """The param key of input ``index`` (a weight), or raise Unknown saying why not."""
        if index >= len(node.inputs) or not node.inputs[index].name:
            raise Unknown(f"{what} is missing")
        t = node.inputs[index]
        key = const_key(t)
        if key is not None:
            return key
        if t in self.graph.inputs:
            raise Unknown(f"{what} `{t.name}` is a graph input")
        producer = t.inputs[0].op if t.inputs else "?"
        raise Unknown(f"{what} `{t.name}` is computed by {producer}, not a constant")

    def optional_weight(self, node: gs.Node, index: int, what: str) -> str | None:
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        return self.weight(node, index, what)

    def input_const(self, node: gs.Node, index: int, what: str) -> np.ndarray | None:
        """Value of an attribute-like constant input (shape, axes, pads); None if absent."""
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        value = self.fold(node.inputs[index])
        if value is None:
            raise Unknown(f"its {what} input is computed at run time, not a constant")
        return value

    def axes(self, node: gs.Node, rank: int, index: int = 1) -> list[int] | None:
        """Axes from the attribute (old opsets) or the input (new opsets), normalised."""
        if "axes" in node.attrs:
            raw = node.attrs["axes"]
        else:
            value = self.input_const(node, index, "axes")
            raw = None if value is None else value.reshape(-1).tolist()
        if raw is None:
            return None
        return sorted(int(a) + rank if int(a) < 0 else int(a) for a in raw)


# ------------------------------------------------------------------ the view
def build_view(ctx: OpContext) -> tuple[tuple[list[Node], dict[str, ValueInfo], list[str], list[str]], dict[str, gs.Node]]:
    """The view ``(nodes, values, inputs, outputs)`` of ``ctx.graph``, and the bias Adds
    absorbed into linear view nodes (MatMul node name -> Add node)."""
    graph = ctx.graph
    values: dict[str, ValueInfo] = {}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name:
            values[name] = ValueInfo(name, ctx.shapes.get(name), ctx.dtypes.get(name))
    specs = [(node, classify(ctx, node)) for node in graph.nodes]
    fused = fuse_bias_adds(ctx, specs)
    absorbed = {add.name for add in fused.values()}
    specs = [(node, spec) for node, spec in specs if node.name not in absorbed]
    data_constants = {t.name: t for _, s in specs for t in s.inputs if const_key(t) is not None}
    nodes: list[Node] = []
    emitted: set[str] = set()
    for node, spec in specs:
        if node.op == "Constant" and spec.kind == "constant" and node.outputs[0].name not in data_constants:
            continue  # a constant read only as a weight or an attribute-like operand
        for t in spec.inputs:
            if isinstance(t, gs.Constant) and t.name not in emitted:
                emitted.add(t.name)
                values[t.name] = ValueInfo(t.name, tuple(int(d) for d in t.shape), str(np.dtype(t.dtype)))
                nodes.append(Node(f"init:{t.name}", "constant", [], [t.name], {}, {"value": t.name}, t.name, "initializer"))
        outs = spec.outputs if spec.outputs is not None else node.outputs
        nodes.append(Node(
            node.name, spec.kind, [t.name for t in spec.inputs], [t.name for t in outs],
            spec.attrs, spec.params, node.name, spec.attrs.pop("_target", op_name(node)),
        ))
    inputs = [t.name for t in graph.inputs if isinstance(t, gs.Variable)]
    outputs = [t.name for t in graph.outputs]
    return (nodes, values, inputs, outputs), fused


def fuse_bias_adds(ctx: OpContext, specs: list[tuple[gs.Node, Spec]]) -> dict[str, gs.Node]:
    """``MatMul(x, W) + b`` with constant 1-D ``b`` is one linear view node with a bias
    (as a Gemm is): the Add is absorbed and the view node ends at its output.  Returns
    MatMul node name -> the absorbed Add."""
    fused: dict[str, gs.Node] = {}
    for node, spec in specs:
        if node.op != "MatMul" or spec.kind != "linear":
            continue
        out = node.outputs[0]
        if len(out.outputs) != 1 or out in ctx.graph.outputs:
            continue
        add = out.outputs[0]
        if add.op != "Add" or not is_default(add) or len(add.inputs) != 2:
            continue
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        key = const_key(other)
        value = const_value(other)
        n_out = ctx.shape(node.inputs[1])[1]  # type: ignore[index]
        if key is None or value is None or value.shape != (n_out,) or len(other.outputs) != 1:
            continue
        spec.params["bias"] = key
        spec.outputs = [add.outputs[0]]
        fused[node.name] = add
    return fused


def classify(ctx: OpContext, node: gs.Node) -> Spec:
    """The view of ``node``; ``unknown`` (reading all its data inputs) with the reason
    when no classifier describes it exactly or a value it touches has no known shape."""
    try:
        spec = _classify_known(ctx, node)
        used = [t for t in node.outputs if t.outputs or t in ctx.graph.outputs]
        for t in [*spec.inputs, *used]:
            if spec.kind != "constant" and t.name and ctx.shape(t) is None:
                raise Unknown(f"the shape of `{t.name}` is unknown (neither shape inference nor onnxruntime could tell)")
        return spec
    except Unknown as why:
        data = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name and constant_node(t) is None]
        data += [t for t in outer_scope_inputs(node) if t not in data]
        reason = str(why)
        return Spec("unknown", data, {"reason": reason, "_target": f"{op_name(node)}: {reason}"})


def _classify_known(ctx: OpContext, node: gs.Node) -> Spec:
    if not is_default(node):
        raise Unknown(f"custom-domain op `{node.domain}::{node.op}` (no channel rule)")
    op = node.op
    if op in CONTROL_FLOW:
        raise Unknown("control flow with subgraphs (channels used inside are kept)")
    if op in RECURRENT:
        raise Unknown("recurrent op (its gates mix channels)")
    fn = CLASSIFIERS.get(op)
    if fn is not None:
        return fn(ctx, node)
    if op in ACTIVATIONS:
        return Spec("act", [node.inputs[0]], {"fn": op.lower(), "zero_preserving": ACTIVATIONS[op]})
    if op in BINARY_OPS:
        return binary(ctx, node)
    if op in POOL_OPS:
        return pool(ctx, node)
    if op in REDUCE_OPS:
        return reduce(ctx, node)
    raise Unknown("no channel rule for this op")


# ------------------------------------------------------- weighted layers
def conv(ctx: OpContext, node: gs.Node) -> Spec:
    """Conv and ConvTranspose: weight, optional bias, groups, strides, dilations, pads."""
    kind = "conv" if node.op == "Conv" else "conv_transpose"
    w = ctx.weight(node, 1, "weight")
    params = {"weight": w}
    b = ctx.optional_weight(node, 2, "bias")
    if b is not None:
        params["bias"] = b
    wshape = ctx.shape(node.inputs[1])
    nd = len(wshape) - 2  # type: ignore[arg-type]
    attrs = {
        "groups": int(node.attrs.get("group", 1)),
        "stride": tuple(int(s) for s in node.attrs.get("strides", [1] * nd)),
        "dilation": tuple(int(d) for d in node.attrs.get("dilations", [1] * nd)),
        "kernel": tuple(int(k) for k in wshape[2:]),  # type: ignore[index]
        "pads": _conv_pads(ctx, node, nd, wshape),
    }
    return Spec(kind, [node.inputs[0]], attrs, params)


def _conv_pads(ctx: OpContext, node: gs.Node, nd: int, wshape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Explicit pads; ``auto_pad=SAME_*`` resolved from shapes:
    total_i = max((ceil(in_i / s_i) - 1) * s_i + (k_i - 1) * d_i + 1 - in_i, 0)."""
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", ""):
        return tuple(int(p) for p in node.attrs.get("pads", [0] * (2 * nd)))
    if auto == "VALID" or node.op != "Conv":
        return (0,) * (2 * nd)
    xshape = ctx.shape(node.inputs[0])
    if xshape is None or wshape is None:
        raise Unknown("auto_pad needs the input shape, which is unknown")
    strides = node.attrs.get("strides", [1] * nd)
    dils = node.attrs.get("dilations", [1] * nd)
    total = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0) for i, s, k, d in zip(xshape[2:], strides, wshape[2:], dils)]
    small = [t // 2 for t in total]
    large = [t - t // 2 for t in total]
    return tuple(small + large) if auto == "SAME_UPPER" else tuple(large + small)


def gemm(ctx: OpContext, node: gs.Node) -> Spec:
    """Gemm ``x W^T + b`` (transB=1) or ``x W + b``: linear when alpha = beta = 1 and x is 2-D."""
    if int(node.attrs.get("transA", 0)):
        raise Unknown("Gemm with transA=1")
    if float(node.attrs.get("alpha", 1.0)) != 1.0:
        raise Unknown("Gemm with alpha != 1")
    if ctx.rank(node.inputs[0]) != 2:
        raise Unknown("Gemm input is not 2-D")
    params = {"weight": ctx.weight(node, 1, "weight")}
    bias = ctx.optional_weight(node, 2, "bias")
    if bias is not None:
        if float(node.attrs.get("beta", 1.0)) != 1.0:
            raise Unknown("Gemm with beta != 1")
        n_out = ctx.shape(node.outputs[0])
        bshape = ctx.shape(node.inputs[2])
        if n_out is None or bshape != (n_out[-1],):
            raise Unknown(f"Gemm bias of shape {bshape} is not one value per output")
        params["bias"] = bias
    axes = (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)
    return Spec("linear", [node.inputs[0]], {"weight_axes": axes}, params)


def matmul(ctx: OpContext, node: gs.Node) -> Spec:
    """MatMul by a constant 2-D ``W`` (in, out) is linear; otherwise a data matmul."""
    a, b = node.inputs[0], node.inputs[1]
    key = const_key(b)
    if key is not None and len(ctx.shape(b) or ()) == 2 and ctx.rank(a) >= 2:
        return Spec("linear", [a], {"weight_axes": (1, 0)}, {"weight": key})
    return Spec("matmul", [t for t in (a, b) if const_key(t) is None])


# -------------------------------------------------------------- norms
def batchnorm(ctx: OpContext, node: gs.Node) -> Spec:
    """BatchNormalization in inference mode with constant scale, bias and statistics."""
    if int(node.attrs.get("training_mode", 0)):
        raise Unknown("BatchNormalization in training mode")
    if any(o.outputs or o in ctx.graph.outputs for o in node.outputs[1:] if o.name):
        raise Unknown("BatchNormalization's running statistics outputs are used")
    roles = ("weight", "bias", "running_mean", "running_var")
    params = {r: ctx.weight(node, i + 1, r) for i, r in enumerate(roles)}
    return Spec("batchnorm", [node.inputs[0]], {"eps": float(node.attrs.get("epsilon", 1e-5))}, params)


def instancenorm(ctx: OpContext, node: gs.Node) -> Spec:
    """InstanceNormalization: a per-channel batchnorm over each sample's own statistics."""
    params = {"weight": ctx.weight(node, 1, "scale"), "bias": ctx.weight(node, 2, "bias")}
    return Spec("batchnorm", [node.inputs[0]], {"eps": float(node.attrs.get("epsilon", 1e-5)), "instance": True}, params)


def layernorm(ctx: OpContext, node: gs.Node) -> Spec:
    """LayerNormalization over the axes from ``axis`` to the last."""
    rank = ctx.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))
    axis = axis + rank if axis < 0 else axis
    params = {"weight": ctx.weight(node, 1, "scale")}
    bias = ctx.optional_weight(node, 2, "bias")
    if bias is not None:
        params["bias"] = bias
    attrs = {"normalized_ndim": rank - axis, "eps": float(node.attrs.get("epsilon", 1e-5))}
    return Spec("layernorm", [node.inputs[0]], attrs, params)


def groupnorm(ctx: OpContext, node: gs.Node) -> Spec:
    """GroupNormalization with one scale and bias per channel (opset >= 21)."""
    x = node.inputs[0]
    shape = ctx.shape(x)
    scale = ctx.shape(node.inputs[1])
    if shape is None or scale != (shape[1],):
        raise Unknown("GroupNormalization with one scale per group (opset < 21 form)")
    params = {"weight": ctx.weight(node, 1, "scale"), "bias": ctx.weight(node, 2, "bias")}
    return Spec("groupnorm", [x], {"num_groups": int(node.attrs["num_groups"])}, params)


# -------------------------------------------------------- elementwise
def clip(ctx: OpContext, node: gs.Node) -> Spec:
    """Clip is zero preserving iff min <= 0 <= max."""
    lo, hi = node.attrs.get("min", -math.inf), node.attrs.get("max", math.inf)
    zero = True
    for index, default in ((1, lo), (2, hi)):
        if index < len(node.inputs) and node.inputs[index].name:
            value = ctx.fold(node.inputs[index])
            if value is None:
                zero = False
                continue
            if index == 1:
                lo = float(value)
            else:
                hi = float(value)
    zero = zero and lo <= 0.0 <= hi
    return Spec("act", [node.inputs[0]], {"fn": "clip", "zero_preserving": zero})


def hardsigmoid(ctx: OpContext, node: gs.Node) -> Spec:
    """HardSigmoid(0) = beta."""
    zero = float(node.attrs.get("beta", 0.5)) == 0.0
    return Spec("act", [node.inputs[0]], {"fn": "hardsigmoid", "zero_preserving": zero})


def shrink(ctx: OpContext, node: gs.Node) -> Spec:
    """Shrink(0) = 0 when lambd >= 0, else -bias."""
    zero = float(node.attrs.get("lambd", 0.5)) >= 0 or float(node.attrs.get("bias", 0.0)) == 0.0
    return Spec("act", [node.inputs[0]], {"fn": "shrink", "zero_preserving": zero})


def prelu(ctx: OpContext, node: gs.Node) -> Spec:
    """PReLU with one slope, or one slope per channel stored as (C, 1, ..., 1)."""
    x = node.inputs[0]
    key = ctx.weight(node, 1, "slope")
    slope = ctx.shape(node.inputs[1]) or ()
    rank = ctx.rank(x)
    per_channel = rank >= 2 and len(slope) == rank - 1 and all(d == 1 for d in slope[1:])
    if math.prod(slope) != 1 and not per_channel:
        raise Unknown(f"PRelu slope of shape {slope} is neither scalar nor (C, 1, ..., 1)")
    return Spec("act", [x], {"fn": "prelu", "zero_preserving": True}, {"weight": key})


def pow_(ctx: OpContext, node: gs.Node) -> Spec:
    """x ** c with a scalar constant c > 0 is elementwise and zero preserving."""
    exponent = ctx.fold(node.inputs[1])
    if exponent is None or exponent.size != 1:
        raise Unknown("Pow with a tensor exponent")
    return Spec("act", [node.inputs[0]], {"fn": "pow", "zero_preserving": float(exponent.reshape(-1)[0]) > 0})


def identity(ctx: OpContext, node: gs.Node) -> Spec:
    """Identity, Cast, CastLike, and Dropout in inference mode with its mask unused."""
    if node.op == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1].name and (node.outputs[1].outputs or node.outputs[1] in ctx.graph.outputs):
            raise Unknown("Dropout's mask output is used")
        training = ctx.input_const(node, 2, "training_mode")
        if training is not None and bool(training.reshape(-1)[0]):
            raise Unknown("Dropout in training mode")
    return Spec("identity", [node.inputs[0]])


def binary(ctx: OpContext, node: gs.Node) -> Spec:
    """Add, Sub, Mul, Div, Sum over all operands; a scalar constant operand is recorded."""
    kind = BINARY_OPS[node.op]
    operands = [t for t in node.inputs if t.name]
    scalar = None
    for t in operands:
        if const_key(t) is not None and math.prod(ctx.shape(t) or (0,)) == 1:
            scalar = float(const_value(t).reshape(-1)[0])  # type: ignore[union-attr]
    return Spec(kind, operands, {"tensor_positions": list(range(len(operands))), "scalar": scalar})


# ------------------------------------------------------- spatial ops
def pool(ctx: OpContext, node: gs.Node) -> Spec:
    """Pooling acts per channel (MaxPool only while its indices output is unused)."""
    if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
        raise Unknown("MaxPool's indices output is used")
    return Spec("pool", [node.inputs[0]], {"op": node.op})


def resize(ctx: OpContext, node: gs.Node) -> Spec:
    """Resize/Upsample act per (batch, channel) plane when they leave the channel axis alone."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in node.attrs.get("axes", range(rank))]
    if node.op == "Upsample" and "scales" in node.attrs:
        scales: np.ndarray | None = np.asarray(node.attrs["scales"])
    else:
        scale_index = 1 if node.op == "Upsample" or ctx.opset() < 11 else 2
        scales = ctx.input_const(node, scale_index, "scales")
    sizes = ctx.input_const(node, 3, "sizes") if node.op == "Resize" else None
    if scales is not None and scales.size:
        by_axis = dict(zip(axes, scales.reshape(-1).tolist()))
        if by_axis.get(1, 1.0) != 1.0 or by_axis.get(0, 1.0) != 1.0:
            raise Unknown("it resizes the batch or channel axis")
    elif sizes is not None and sizes.size and 1 in axes:
        raise Unknown("its constant `sizes` fix the channel count")
    return Spec("pool", [x], {"op": node.op})


def pad(ctx: OpContext, node: gs.Node) -> Spec:
    """Pad: spatial pads in canonical form (begin..., end... over axes 2..); padding the
    batch or channel axis keeps all 2*rank entries, which the rule freezes."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    pads = ctx.input_const(node, 1, "pads") if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
    if pads is None:
        raise Unknown("its pads input is computed at run time, not a constant")
    value = ctx.input_const(node, 2, "constant value") if len(node.inputs) > 1 else np.asarray(node.attrs.get("value", 0.0))
    if mode == "constant" and value is not None and value.size and float(value.reshape(-1)[0]) != 0.0:
        raise Unknown("it pads with a non-zero value")
    pads = [int(p) for p in pads.reshape(-1)]
    axes_v = ctx.input_const(node, 3, "axes")
    full = [0] * (2 * rank)
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes_v.reshape(-1)] if axes_v is not None else list(range(rank))
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    if any(full[a] or full[a + rank] for a in (0, 1)):
        canonical = full
    else:
        canonical = full[2:rank] + full[rank + 2:]
    return Spec("pad", [x], {"pads": canonical, "mode": mode, "rank": rank})


# ------------------------------------------------------ shape ops
def flatten(ctx: OpContext, node: gs.Node) -> Spec:
    """Flatten at axis 1 is a flatten; at another axis a reshape."""
    rank = ctx.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if axis == 1:
        return Spec("flatten", [node.inputs[0]], {"start": 1, "end": -1})
    return Spec("reshape", [node.inputs[0]], {"flatten_axis": axis})


def reshape(ctx: OpContext, node: gs.Node) -> Spec:
    """Reshape to a target shape known before run time, or to the whole shape of another
    value (``Reshape(y, Shape(x))``: the exported group norm's way back to x's shape), which
    follows x when x is pruned (``attrs["shape_of"]`` names x)."""
    target = node.inputs[1]
    src = target.inputs[0] if len(target.inputs) == 1 else None
    if ctx.fold(target) is None and src is not None and src.op == "Shape" and _whole_shape(ctx, src):
        return Spec("reshape", [node.inputs[0]], {"shape_of": src.inputs[0].name})
    ctx.input_const(node, 1, "target shape")
    return Spec("reshape", [node.inputs[0]])


def _whole_shape(ctx: OpContext, node: gs.Node) -> bool:
    rank = ctx.rank(node.inputs[0])
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    return start in (0, -rank) and end >= rank


def transpose(ctx: OpContext, node: gs.Node) -> Spec:
    """Transpose: a permute (default perm reverses the axes)."""
    rank = ctx.rank(node.inputs[0])
    perm = [int(p) for p in node.attrs.get("perm", list(reversed(range(rank))))]
    return Spec("permute", [node.inputs[0]], {"perm": perm})


def squeeze(ctx: OpContext, node: gs.Node) -> Spec:
    """Squeeze the given axes, or every size-1 axis."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        raise Unknown("input shape unknown")
    axes = ctx.axes(node, len(shape))
    if axes is None:
        axes = [a for a, d in enumerate(shape) if d == 1]
    return Spec("squeeze", [node.inputs[0]], {"axes": axes})


def unsqueeze(ctx: OpContext, node: gs.Node) -> Spec:
    """Unsqueeze: axes counted in the output's rank."""
    out = ctx.shape(node.outputs[0])
    if out is None:
        raise Unknown("output shape unknown")
    axes = ctx.axes(node, len(out))
    return Spec("unsqueeze", [node.inputs[0]], {"axes": axes or []})


def slice_(ctx: OpContext, node: gs.Node) -> Spec:
    """Slice: the axes it actually cuts (start > 0, end < size or step != 1)."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        raise Unknown("input shape unknown")
    rank = len(shape)
    if "starts" in node.attrs:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = ctx.input_const(node, 1, "starts").reshape(-1).tolist()  # type: ignore[union-attr]
        ends = ctx.input_const(node, 2, "ends").reshape(-1).tolist()  # type: ignore[union-attr]
        a = ctx.input_const(node, 3, "axes")
        s = ctx.input_const(node, 4, "steps")
        axes = a.reshape(-1).tolist() if a is not None else list(range(len(starts)))
        steps = s.reshape(-1).tolist() if s is not None else [1] * len(starts)
    cut, ranges = [], {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) + rank if int(axis) < 0 else int(axis)
        n = shape[axis]
        start, end = int(start), int(end)
        start = min(n, max(0, start + n if start < 0 else start))
        end = max(start, min(n, end + n if end < 0 else end))
        if not (int(step) == 1 and start == 0 and end >= n):
            cut.append(axis)
            ranges[axis] = (start, end, int(step))
    return Spec("slice", [node.inputs[0]], {"axes": sorted(set(cut)), "ranges": ranges})


def gather(ctx: OpContext, node: gs.Node) -> Spec:
    """Gather with a constant 1-D index of non-negative positions: out[i] = in[index[i]]
    along ``axis`` (a folded permutation or a crop; the gather rule renumbers the index)."""
    x, index = node.inputs[0], node.inputs[1]
    shape = ctx.shape(x)
    if shape is None:
        raise Unknown("input shape unknown")
    if const_key(index) is None:
        raise Unknown("its index is computed at run time")
    axis = int(node.attrs.get("axis", 0))
    axis = axis + len(shape) if axis < 0 else axis
    value = const_value(index)
    if value is not None and value.ndim == 0:  # a scalar index picks one slice: x.select(axis, i)
        i = int(value)
        return Spec("select", [x], {"axis": axis, "index": i + shape[axis] if i < 0 else i})
    if value is None or value.ndim != 1 or not value.size or value.min() < 0 or value.max() >= shape[axis]:
        raise Unknown("its index is not a 1-D list of non-negative positions")
    return Spec("gather", [x, index], {"axis": axis})


def shape_(ctx: OpContext, node: gs.Node) -> Spec:
    """Shape (opset 15 start/end attributes): reads the sizes of its input, not values."""
    rank = ctx.rank(node.inputs[0])
    start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank))
    start, end = start + rank if start < 0 else start, end + rank if end < 0 else end
    return Spec("shape", [node.inputs[0]], {"start": max(0, start), "end": min(rank, end)})


def concat(ctx: OpContext, node: gs.Node) -> Spec:
    """Concat of every non-empty input along ``axis``."""
    return Spec("concat", [t for t in node.inputs if t.name], {"axis": int(node.attrs["axis"])})


def split(ctx: OpContext, node: gs.Node) -> Spec:
    """Split along ``axis`` (the sizes come from the output shapes)."""
    return Spec("split", [node.inputs[0]], {"axis": int(node.attrs.get("axis", 0))})


def reduce(ctx: OpContext, node: gs.Node) -> Spec:
    """Reduce* over the given axes (all axes when none, unless noop_with_empty_axes)."""
    rank = ctx.rank(node.inputs[0])
    axes = ctx.axes(node, rank)
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return Spec("identity", [node.inputs[0]])
        axes = list(range(rank))
    return Spec("reduce", [node.inputs[0]], {"axes": axes, "keepdim": bool(int(node.attrs.get("keepdims", 1))), "op": node.op})


def softmax(ctx: OpContext, node: gs.Node) -> Spec:
    """Softmax and LogSoftmax along one axis (opset < 13 only along the last)."""
    rank = ctx.rank(node.inputs[0])
    opset = ctx.opset()
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
    if opset < 13 and axis != rank - 1:
        raise Unknown("opset < 13 softmax flattens the axes after `axis`")
    return Spec("softmax", [node.inputs[0]], {"axis": axis})


def constant(ctx: OpContext, node: gs.Node) -> Spec:
    """A Constant op: a constant view node whose param ``value`` is its output."""
    if constant_node_value(node) is None:
        raise Unknown("Constant with a sparse or unusual value")
    return Spec("constant", [], {}, {"value": node.outputs[0].name})


Classifier = Callable[[OpContext, gs.Node], Spec]

CLASSIFIERS: dict[str, Classifier] = {
    "Conv": conv, "ConvTranspose": conv, "Gemm": gemm, "MatMul": matmul,
    "BatchNormalization": batchnorm, "InstanceNormalization": instancenorm, "LayerNormalization": layernorm,
    "GroupNormalization": groupnorm, "Clip": clip, "HardSigmoid": hardsigmoid, "Shrink": shrink, "PRelu": prelu,
    "Pow": pow_, "Identity": identity, "Dropout": identity, "Cast": identity, "CastLike": identity,
    "Resize": resize, "Upsample": resize, "Pad": pad, "Flatten": flatten, "Reshape": reshape,
    "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Slice": slice_, "Concat": concat,
    "Split": split, "Gather": gather, "Shape": shape_, "Softmax": softmax, "LogSoftmax": softmax, "Constant": constant,
}
