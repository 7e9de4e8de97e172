"""Projections: what a pass decided, as a change of weights.

A pass's decision is a projection ``P`` of some parameters (zero a channel, a block mask,
a truncated SVD).  The *projected reference* is the input graph with ``P`` applied to
its weights; the rewritten graph must compute the same function.  The same projection,
registered as a ``torch.nn.utils.parametrize`` parametrization on the original model,
keeps it applied while the model fine-tunes (:mod:`graphprune.training.parametrize`;
this module itself is numpy only).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .arrays import as_numpy, is_torch_tensor
from .graph import Graph

ProjectionFn = Callable[[Any], Any]
"""A projection of one weight: numpy array -> numpy array (and, for ``projected_model``,
torch tensor -> torch tensor, differentiably)."""


@dataclass
class Projection:
    """Per-parameter projections: multiplicative masks (numpy) and/or functions.

    Zeroed slices are recorded cheaply and turned into masks only when ``masks`` is read.
    """

    _masks: dict[str, np.ndarray] = field(default_factory=dict)
    functions: dict[str, ProjectionFn] = field(default_factory=dict)
    _zeros: dict[str, tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        for key, (shape, slices) in self._zeros.items():
            mask = self._masks.get(key)
            if mask is None:
                mask = self._masks[key] = np.ones(shape, dtype=np.float32)
            for axis, index in slices:
                where: list[Any] = [slice(None)] * mask.ndim
                where[axis] = np.asarray(index, dtype=np.int64)
                mask[tuple(where)] = 0.0
        self._zeros.clear()
        return self._masks

    def zero(self, key: str, shape: tuple[int, ...], axis: int, index: list[int]) -> None:
        """Zero ``index`` along ``axis`` of parameter ``key`` (shape ``shape``)."""
        self._zeros.setdefault(key, (tuple(shape), []))[1].append((axis, list(index)))

    def mask(self, key: str, mask: Any) -> None:
        """Multiply parameter ``key`` by ``mask`` (an array or tensor)."""
        mask = as_numpy(mask)
        masks = self.masks
        old = masks.get(key)
        masks[key] = mask.copy() if old is None else old * mask

    def project(self, key: str, value: np.ndarray) -> np.ndarray:
        """``mask * f(value)`` for parameter ``key`` (numpy, in ``value``'s dtype; a new
        array, ``value`` is not written).  A key with zeroed slices only is copied once and
        the slices set to zero, without building its mask."""
        if key not in self.functions and key not in self._masks and key in self._zeros:
            return _zero_slices(value, self._zeros[key][1])
        out = value
        if key in self.functions:
            out = self.functions[key](out)
        if key in self.masks:
            out = out * self.masks[key].astype(out.dtype, copy=False)
        return out

    def keys(self) -> set[str]:
        return set(self._masks) | set(self._zeros) | set(self.functions)

    def __bool__(self) -> bool:
        return bool(self.keys())

    def apply(self, graph: Graph) -> Graph:
        """The projected reference: a copy of ``graph`` with projected weights."""
        return graph.with_weights({key: self.project(key, graph.param(key)) for key in self.keys()})

    def projected_model(self, model: Any) -> Any:
        """A copy of the ``nn.Module`` ``model`` whose parameters stay projected while it
        trains (``torch.nn.utils.parametrize``: masks as buffers, functions applied to the
        tensor, differentiably).  Needs torch.

        Parameter keys are qualified names (the fx frontend's keys), so this applies to the
        model the graph was traced from.
        """
        from .training.parametrize import register_projection

        out = copy.deepcopy(model)
        for key in sorted(self.keys()):
            path, _, attr = key.rpartition(".")
            owner = out.get_submodule(path) if path else out
            mask = self.masks.get(key)
            register_projection(owner, attr, self.functions.get(key), mask)
        return out


def bake(model: Any) -> Any:
    """Make every projection parametrization permanent (in place) and return ``model``:
    after fine-tuning a projected copy, this gives plain weights with the projected
    structure exactly zero, ready for a lossless pass.  Needs torch."""
    from .training.parametrize import bake as _bake

    return _bake(model)


def _zero_slices(value: np.ndarray, slices: list[tuple[int, list[int]]]) -> np.ndarray:
    """A copy of ``value`` with ``index`` set to zero along ``axis`` for each (axis, index)."""
    out = np.array(value, copy=True)
    for axis, index in slices:
        where: list[Any] = [slice(None)] * out.ndim
        where[axis] = np.asarray(index, dtype=np.int64)
        out[tuple(where)] = 0
    return out
