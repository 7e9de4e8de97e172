"""Numerical verification: a rewritten graph against its projected reference.

The error measure is ``max |a - b| / max(max |b|, tiny)`` per output, i.e. relative to the
output's scale, on a few random inputs; fp32 rewrites stay near 1e-6 on it, so the
default tolerance of 1e-5 leaves room for rounding and none for a wrong channel.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .graph import Graph
from .errors import VerificationError


def relative_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest scale-relative difference over paired outputs."""
    if len(a) != len(b):
        raise VerificationError(f"output count differs: {len(a)} vs {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"output shape differs: {tuple(x.shape)} vs {tuple(y.shape)}")
        x, y = x.double(), y.double()
        scale = max(float(y.abs().max()) if y.numel() else 0.0, 1e-12)
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / scale)
    return worst


def compare(graph: Graph, reference: Graph, n: int = 2, seed: int = 0) -> float:
    """Run both graphs on ``n`` random inputs and return the worst relative error."""
    worst = 0.0
    for i in range(n):
        inputs = reference.random_inputs(seed + i)
        worst = max(worst, relative_error(graph.run(*inputs), reference.run(*inputs)))
    return worst


def assert_exact(graph: Graph, reference: Graph, rtol: float = 1e-5, n: int = 2, what: str = "rewrite") -> float:
    """Raise :class:`VerificationError` unless ``graph`` matches ``reference``."""
    err = compare(graph, reference, n=n)
    if not err <= rtol:
        raise VerificationError(f"{what}: output differs from the projected reference by {err:.3g} (tolerance {rtol:g})")
    return err
