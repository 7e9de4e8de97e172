"""Small helpers over onnx-graphsurgeon nodes and tensors, shared by the ONNX frontend.

A *constant* is an initializer (``gs.Constant``) or the output of a ``Constant`` op; its
param key is the initializer's name or the ``Constant`` op's output name.  Nodes of the
default domain (``""`` or ``"ai.onnx"``) are standard ONNX ops; any other domain is custom.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = [
    "DEFAULT_DOMAINS", "STRIP_NUMEL", "const_key", "const_value", "constant_node", "constant_node_value",
    "fresh_name", "is_default", "np_dtype", "op_name", "outer_scope_inputs", "proto_nbytes", "swap_input",
    "tensor_shape", "value_info_shape",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
STRIP_NUMEL = 1024  # initializers above this size are sent to shape inference and the checker without data


def is_default(node: gs.Node) -> bool:
    """Is ``node`` an op of the default ONNX domain?"""
    return (node.domain or "") in DEFAULT_DOMAINS


def op_name(node: gs.Node) -> str:
    """``Conv`` for a default-domain op, ``domain::Op`` for a custom one."""
    return node.op if is_default(node) else f"{node.domain}::{node.op}"


def swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` read ``new`` wherever it reads ``old``."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def fresh_name(base: str, taken: Iterable[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken``."""
    names = set(taken)
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    return name


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """Value of a ``Constant`` op from whichever value attribute it uses."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def constant_node(t: gs.Tensor) -> gs.Node | None:
    """The ``Constant`` op producing ``t``, if any."""
    if isinstance(t, gs.Variable) and len(t.inputs) == 1:
        prod = t.inputs[0]
        if prod.op == "Constant" and is_default(prod) and len(prod.outputs) == 1:
            return prod
    return None


def const_key(t: gs.Tensor) -> str | None:
    """Param key of ``t`` if it is a constant (initializer or Constant output)."""
    if isinstance(t, gs.Constant):
        return t.name
    if constant_node(t) is not None:
        return t.name
    return None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` if it is a constant, else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = constant_node(t)
    return None if node is None else constant_node_value(node)


def tensor_shape(t: gs.Tensor, shapes: Mapping[str, tuple[int, ...] | None]) -> tuple[int, ...] | None:
    """The shape of a constant from its value, of any other value from ``shapes``."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    value = const_value(t)
    if value is not None:
        return tuple(int(d) for d in value.shape)
    return shapes.get(t.name)


def outer_scope_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Values a node's subgraphs read from the enclosing graph (control flow)."""
    found: list[gs.Tensor] = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            local = {t.name for t in attr.inputs} | {t.name for n in attr.nodes for t in n.outputs}
            for n in attr.nodes:
                for t in n.inputs + outer_scope_inputs(n):
                    if isinstance(t, gs.Variable) and t.name and t.name not in local and t not in found:
                        found.append(t)
    return found


def np_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from whatever graphsurgeon holds (None means float32)."""
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, str):
        return np.dtype(dtype.replace("torch.", ""))
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.dtype(dtype)


def value_info_shape(vi: onnx.ValueInfoProto) -> tuple[tuple[int, ...] | None, str | None]:
    """``(shape, dtype)`` of a value info; the shape is None unless every dim is fixed."""
    if not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    dtype = None
    if tt.elem_type:
        with contextlib.suppress(Exception):
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    if not tt.HasField("shape"):
        return None, dtype
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None, dtype
        dims.append(int(d.dim_value))
    return tuple(dims), dtype


def proto_nbytes(model: onnx.ModelProto) -> int:
    """Roughly the serialized size of ``model``: its embedded initializers' data, from
    dims and type (external data does not count)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        with contextlib.suppress(Exception):
            total += math.prod(init.dims) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total
