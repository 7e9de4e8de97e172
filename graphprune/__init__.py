"""graphprune: structured-pruning compiler passes over torch.fx and ONNX graphs."""
from __future__ import annotations

from .cost import Cost, graph_cost
from .coupling import CouplingAnalysis, PruningGroup, analyse
from .frontends.capture import CaptureError, trace
from .graph import Graph, GraphError, Node, Port
from .frontends.onnx import load_onnx
from .passes_base import (
    BudgetError,
    CheckInputError,
    Pass,
    PassManager,
    PassOptionError,
    PassResult,
    PipelineResult,
    VerificationError,
    get_pass,
    parse_pipeline,
    register_pass,
    run,
)
from .projection import Projection, bake
from .apply import ApplyError, apply
from .saving import load, save
from .verify import ExactnessCheck, assert_exact, check_exact, compare

__all__ = [
    "ApplyError", "BudgetError", "CaptureError", "CheckInputError", "Cost", "CouplingAnalysis", "Graph", "GraphError", "Node",
    "Pass", "PassManager", "PassOptionError", "PassResult", "PipelineResult", "Port",
    "ExactnessCheck", "Projection", "PruningGroup", "VerificationError", "analyse", "apply", "assert_exact", "bake", "check_exact", "compare",
    "get_pass", "graph_cost", "load", "load_onnx", "parse_pipeline", "register_pass", "run", "save", "trace",
]
from .version import __version__  # noqa: E402
