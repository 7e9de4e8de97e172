"""Keeping a pass's projection applied to an ``nn.Module`` while it trains.

:meth:`graphprune.projection.Projection.projected_model` registers, per projected
parameter ``W``, a ``torch.nn.utils.parametrize`` parametrization ``W -> M * f(W)``: the
projection function ``f`` (e.g. a truncated SVD, evaluated on the tensor so gradients
flow through it) and the mask ``M`` (a buffer, not trained).  Buffers (running
statistics) are projected once.  :func:`bake` makes the parametrizations permanent.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["bake", "register_projection"]


class _Masked(nn.Module):
    """Parametrization ``W -> W * mask`` (mask kept as a buffer, not trained)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _Mapped(nn.Module):
    """Parametrization by a projection function on tensors (e.g. a truncated SVD)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)


def register_projection(owner: nn.Module, attr: str, fn: Callable[[Any], Any] | None, mask: np.ndarray | None) -> None:
    """Keep ``owner.<attr>`` projected: a parameter gets the parametrizations ``fn`` then
    ``* mask``; a buffer is replaced once by its projection."""
    if attr in owner._parameters and owner._parameters[attr] is not None:
        device = owner._parameters[attr].device
        if fn is not None:
            parametrize.register_parametrization(owner, attr, _Mapped(fn))
        if mask is not None:
            parametrize.register_parametrization(owner, attr, _Masked(torch.tensor(mask, device=device)))
    elif attr in owner._buffers and owner._buffers[attr] is not None:
        value = owner._buffers[attr]
        if fn is not None:
            value = fn(value)
        if mask is not None:
            value = value * torch.as_tensor(mask, device=value.device).to(value.dtype)
        owner._buffers[attr] = value


def bake(model: nn.Module) -> nn.Module:
    """Make every projection parametrization permanent (in place) and return ``model``:
    after fine-tuning a projected copy, this gives plain weights with the projected
    structure exactly zero, ready for a lossless pass."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
