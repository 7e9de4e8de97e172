"""Capture a PyTorch model: ``torch.export`` by default, ``torch.fx`` as the way out.

``capture="auto"`` (the default) tries ``torch.export`` (non-strict: it follows a real
forward, so Python control flow over lists, data-dependent shapes resolved at the
example input, and any module or functional spelling are captured) and falls back to
fx symbolic tracing; a model neither can take gets one :class:`CaptureError` that lists
both failures.  ``capture="export"`` or ``"fx"`` picks one, and its error names the
other as the way out.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..graph import Graph
from .fx import CaptureError, trace_fx

__all__ = ["trace", "CaptureError", "CAPTURES"]

logger = logging.getLogger(__name__)

CAPTURES = ("auto", "export", "fx")


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    capture: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Graph:
    """Capture ``model`` on ``example_inputs`` as a :class:`Graph` (eval mode; the caller's
    model is never edited).  ``leaf_modules`` and ``concrete_args`` apply to fx only."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURES)}, got `{capture}`")
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    inputs = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
    fx_options = bool(leaf_modules) or concrete_args is not None
    if capture == "fx" or (capture == "auto" and fx_options):
        try:
            return trace_fx(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        except CaptureError as exc:
            if capture == "fx":
                raise CaptureError(f"{exc} Or capture with torch.export: trace(..., capture=\"export\").") from exc
            raise
    from .export import capture_export

    try:
        return capture_export(model, inputs)
    except CaptureError as export_error:
        if capture == "export":
            raise CaptureError(f"{export_error}. Or trace with torch.fx: trace(..., capture=\"fx\").") from export_error
        logger.info("torch.export failed (%s); trying torch.fx", export_error)
        try:
            return trace_fx(model, inputs)
        except CaptureError as fx_error:
            raise CaptureError(
                f"cannot capture `{type(model).__name__}` with either frontend:\n"
                f"  torch.export: {export_error}\n  torch.fx: {fx_error}"
            ) from fx_error
