"""The array type of the graph view: numpy, shared by every frontend.

Weights read from a :class:`~graphprune.graph.Graph` are ``numpy.ndarray``\\ s (the
PyTorch frontends hand out zero-copy views of their parameters); inputs and outputs of
:meth:`Graph.run` may be numpy arrays or torch tensors.  This module converts whatever a
caller holds to numpy *without importing torch*: a torch tensor is recognised by its
``detach``/``numpy`` methods, so the ONNX path runs where torch is not installed.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["as_numpy", "as_numpy_list", "is_floating", "is_torch_tensor"]


def is_torch_tensor(x: Any) -> bool:
    """``x`` is a torch tensor (duck-typed: torch is not imported here)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array: zero-copy for CPU torch tensors and arrays; a torch
    ``bfloat16`` tensor (numpy has no such type) becomes float32."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def as_numpy_list(xs: Sequence[Any]) -> list[np.ndarray]:
    """Each item of ``xs`` as a numpy array."""
    return [as_numpy(x) for x in xs]


def is_floating(x: Any) -> bool:
    """``x`` (array, tensor or dtype-bearing object) holds floating-point values."""
    return bool(np.issubdtype(as_numpy(x).dtype, np.floating))
