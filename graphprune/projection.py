"""Projections: what a pass decided, as a change of weights.

A pass's decision is a projection ``P`` of some parameters (zero a channel, a block mask,
a truncated SVD).  The *projected reference* is the input graph with ``P`` applied to
its weights; the rewritten graph must compute the same function.  The same projection,
registered as a ``torch.nn.utils.parametrize`` parametrization on the original model,
keeps it applied while the model fine-tunes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .graph import Graph


class _Masked(nn.Module):
    """Parametrization ``W -> W * mask`` (mask kept as a buffer, not trained)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _Mapped(nn.Module):
    """Parametrization by an arbitrary projection function (e.g. a truncated SVD)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)


@dataclass
class Projection:
    """Per-parameter projections: multiplicative masks and/or functions.

    Zeroed slices are recorded cheaply and turned into masks only when ``masks`` is read.
    """

    _masks: dict[str, torch.Tensor] = field(default_factory=dict)
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    _zeros: dict[str, tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        for key, (shape, slices) in self._zeros.items():
            mask = self._masks.get(key)
            if mask is None:
                mask = self._masks[key] = torch.ones(shape)
            for axis, index in slices:
                mask.index_fill_(axis, torch.as_tensor(index, dtype=torch.long), 0.0)
        self._zeros.clear()
        return self._masks

    def zero(self, key: str, shape: tuple[int, ...], axis: int, index: list[int]) -> None:
        """Zero ``index`` along ``axis`` of parameter ``key`` (shape ``shape``)."""
        self._zeros.setdefault(key, (tuple(shape), []))[1].append((axis, list(index)))

    def mask(self, key: str, mask: torch.Tensor) -> None:
        """Multiply parameter ``key`` by ``mask``."""
        masks = self.masks
        old = masks.get(key)
        masks[key] = mask.clone() if old is None else old * mask

    def project(self, key: str, value: torch.Tensor) -> torch.Tensor:
        out = value
        if key in self.functions:
            out = self.functions[key](out)
        if key in self.masks:
            out = out * self.masks[key].to(out.dtype)
        return out

    def keys(self) -> set[str]:
        return set(self._masks) | set(self._zeros) | set(self.functions)

    def __bool__(self) -> bool:
        return bool(self.keys())

    def apply(self, graph: Graph) -> Graph:
        """The projected reference: a copy of ``graph`` with projected weights."""
        ref = graph.copy()
        for key in self.keys():
            ref.set_param(key, self.project(key, ref.param(key)))
        return ref

    def projected_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose parameters stay projected while it trains.

        Parameter keys are qualified names (the fx frontend's keys), so this applies to the
        model the graph was traced from.
        """
        out = copy.deepcopy(model)
        for key in sorted(self.keys()):
            path, _, attr = key.rpartition(".")
            owner = out.get_submodule(path) if path else out
            if attr in owner._parameters and owner._parameters[attr] is not None:
                if key in self.functions:
                    parametrize.register_parametrization(owner, attr, _Mapped(self.functions[key]))
                if key in self.masks:
                    parametrize.register_parametrization(owner, attr, _Masked(self.masks[key].clone()))
            elif attr in owner._buffers and owner._buffers[attr] is not None:
                owner._buffers[attr] = self.project(key, owner._buffers[attr])
        return out


def bake(model: nn.Module) -> nn.Module:
    """Make every projection parametrization permanent (in place) and return ``model``:
    after fine-tuning a projected copy, this gives plain weights with the projected
    structure exactly zero, ready for a lossless pass."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
