"""Capture a PyTorch model: ``torch.fx`` when it sees every op, else ``torch.export``.

``capture="auto"`` (the default) first traces with fx (symbolic: about a tenth of the
time of ``torch.export``) and keeps that graph when the trace succeeds and its view
gives every op a canonical kind (no ``unknown`` or ``mha`` node, whose channels would be
frozen only because fx sees a module or function where the aten graph would show its
ops).  Otherwise it captures with ``torch.export`` (non-strict: it follows a real
forward, so Python control flow over lists, data-dependent shapes resolved at the
example input, and any module or functional spelling are captured), and a model neither
can take gets one :class:`CaptureError` that lists both failures.  Measured on twelve
torchvision classifiers (``benchmarks/profile_compile.py``): fx is complete on eleven,
keeps exactly the channels export keeps, and captures 4-12x faster; on ViT it sees
``nn.MultiheadAttention`` as one op, so auto uses export there.  ``capture="export"``
or ``"fx"`` picks one, and its error names the other as the way out.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..graph import Graph
from .fx import CaptureError, trace_fx
from ..gcpause import gc_paused

__all__ = ["trace", "CaptureError", "CAPTURES"]

logger = logging.getLogger(__name__)

CAPTURES = ("auto", "export", "fx")


@gc_paused
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

    fx_error: CaptureError | None = None
    if capture == "auto":
        graph, fx_error = _complete_fx(model, inputs)
        if graph is not None:
            return graph
    try:
        return capture_export(model, inputs)
    except CaptureError as export_error:
        if capture == "export":
            raise CaptureError(f"{export_error}. Or trace with torch.fx: trace(..., capture=\"fx\").") from export_error
        if fx_error is None:  # fx traced but saw ops without a kind: its graph is still usable
            logger.info("torch.export failed (%s); using the torch.fx graph", export_error)
            return trace_fx(model, inputs)
        raise CaptureError(
            f"cannot capture `{type(model).__name__}` with either frontend:\n"
            f"  torch.export: {export_error}\n  torch.fx: {fx_error}"
        ) from export_error


INCOMPLETE_KINDS = ("unknown", "mha")
"""View kinds that mean fx saw a call it has no canonical op for (auto then uses export)."""


def _complete_fx(model: nn.Module, inputs: list[Any]) -> tuple[Graph | None, CaptureError | None]:
    """The fx graph of ``model`` if fx traces it and gives every op a canonical kind;
    else None and the fx error (None when fx traced but left ops without a kind)."""
    try:
        graph = trace_fx(model, inputs)
    except CaptureError as exc:
        logger.info("torch.fx cannot trace `%s` (%s); capturing with torch.export", type(model).__name__, exc)
        return None, exc
    incomplete = [n for n in graph.nodes if n.kind in INCOMPLETE_KINDS]
    if incomplete:
        logger.info("torch.fx sees %d op(s) without a kind (first: %s); capturing with torch.export",
                    len(incomplete), incomplete[0])
        return None, None
    return graph, None
