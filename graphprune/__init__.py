"""graphprune: structured-pruning compiler passes over torch.fx and ONNX graphs.

The core (graph view, analyses, passes, verification, the ONNX frontend) needs numpy,
onnx, onnx-graphsurgeon, onnxruntime and networkx only.  The PyTorch frontends
(``trace``), ``apply``, ``save``/``load`` and the training helpers need torch
(``pip install graphprune[torch]``).

Every public name is imported on first use (module ``__getattr__``), so ``import
graphprune`` (and the command line's ``--help``) loads nothing heavy, and a name that
needs a missing torch raises an ImportError that says how to install it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_CORE_NAMES: dict[str, str] = {
    "Cost": ".cost", "graph_cost": ".cost",
    "CouplingAnalysis": ".coupling", "PruningGroup": ".coupling", "analyse": ".coupling",
    "Graph": ".graph", "GraphError": ".graph", "Node": ".graph", "Port": ".graph",
    "load_onnx": ".frontends.onnx",
    "BudgetError": ".passes_base", "CheckInputError": ".passes_base", "Pass": ".passes_base",
    "PassManager": ".passes_base", "PassOptionError": ".passes_base", "PassResult": ".passes_base",
    "PipelineResult": ".passes_base", "VerificationError": ".passes_base", "get_pass": ".passes_base",
    "parse_pipeline": ".passes_base", "register_pass": ".passes_base", "run": ".passes_base",
    "Projection": ".projection", "bake": ".projection",
    "ExactnessCheck": ".verify", "assert_exact": ".verify", "check_exact": ".verify", "compare": ".verify",
}
"""Public names that need numpy, onnx, onnx-graphsurgeon, onnxruntime and networkx only."""

_TORCH_NAMES: dict[str, str] = {
    "CaptureError": ".frontends.capture", "trace": ".frontends.capture",
    "ApplyError": ".apply", "apply": ".apply",
    "load": ".saving", "save": ".saving",
}
"""Public names that need torch (``pip install graphprune[torch]``)."""

TORCH_EXTRA_HINT = "pip install graphprune[torch]"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from .apply import ApplyError, apply
    from .cost import Cost, graph_cost
    from .coupling import CouplingAnalysis, PruningGroup, analyse
    from .frontends.capture import CaptureError, trace
    from .frontends.onnx import load_onnx
    from .graph import Graph, GraphError, Node, Port
    from .passes_base import (
        BudgetError, CheckInputError, Pass, PassManager, PassOptionError, PassResult, PipelineResult,
        VerificationError, get_pass, parse_pipeline, register_pass, run,
    )
    from .projection import Projection, bake
    from .saving import load, save
    from .verify import ExactnessCheck, assert_exact, check_exact, compare


def _needs_torch(exc: ImportError) -> bool:
    return (exc.name or "").split(".")[0] in ("torch", "torchvision", "onnxscript")


def __getattr__(name: str) -> Any:
    """Import public name ``name`` on first use (then cache it in the module)."""
    module = _CORE_NAMES.get(name) or _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'graphprune' has no attribute '{name}'")
    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ImportError as exc:
        if name not in _TORCH_NAMES or not _needs_torch(exc):
            raise
        raise ImportError(
            f"graphprune.{name} needs PyTorch, which is not installed: {TORCH_EXTRA_HINT} "
            f"(the ONNX path - load_onnx, run, `graphprune optimize` and `inspect` - works without it)",
            name=exc.name,
        ) from exc
    for other, source in (*_CORE_NAMES.items(), *_TORCH_NAMES.items()):
        if source == module:  # every name of that module: importing `.apply` bound the
            globals()[other] = getattr(importlib.import_module(module, __name__), other)  # module to `apply`
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CORE_NAMES) | set(_TORCH_NAMES))


__all__ = sorted(set(_CORE_NAMES) | set(_TORCH_NAMES))
