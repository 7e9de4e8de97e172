"""What a pass module builds on: the :class:`Pass` base class, :class:`PassResult`, the
registry (:data:`PASSES`, :func:`register_pass`) and the pass errors.

A pass is a frozen dataclass with a kebab-case ``name``; its fields are its options.
Calling a pass checks its precondition, runs :meth:`Pass.call` (decide, then rewrite a
copy) and checks the postcondition on the result.  The built-in passes (``passes/``,
installed as ``graphprune.passes``) import this module; :mod:`graphprune.passes_base`,
which loads them and parses pipelines, imports both, so there is no import cycle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import BudgetError, PassOptionError, VerificationError
from .graph import Graph, GraphError
from .profile import stage
from .projection import Projection

__all__ = [
    "BudgetError", "PASSES", "Pass", "PassOptionError", "PassResult", "VerificationError", "register_pass",
]


@dataclass
class PassResult:
    """What a pass did: the rewritten graph, whether anything changed, and its records.

    ``projection`` is the decision as a change of weights of ``input_graph``;
    :meth:`reference` applies it, :meth:`projected_model` keeps it applied on a model.
    """

    graph: Graph
    modified: bool
    input_graph: Graph
    projection: Projection = field(default_factory=Projection)
    records: list[dict[str, Any]] = field(default_factory=list)
    pass_name: str = ""

    def reference(self) -> Graph:
        """The input graph with projected weights: what ``graph`` must compute."""
        with stage("verify"):
            return self.projection.apply(self.input_graph)

    def projected_model(self, model: Any) -> Any:
        """A trainable copy of ``model`` (the traced original) with the projection held."""
        return self.projection.projected_model(model)

    def summary(self) -> str:
        return f"{self.pass_name}: {'modified' if self.modified else 'unchanged'}, {len(self.records)} records"


@dataclass(frozen=True)
class Pass:
    """Base class: subclasses set ``name`` and implement :meth:`call`."""

    name: ClassVar[str] = ""
    uses_data: ClassVar[bool] = False
    """A pass that can use calibration data sets this; its ``call`` takes ``data=``."""

    def __call__(self, graph: Graph, data: Any = None) -> PassResult:
        self.validate()
        self.requires(graph)
        self.requires_data(data)
        result = self.call(graph, data=data) if self.uses_data else self.call(graph)  # type: ignore[call-arg]
        result.pass_name = self.name
        self.ensures(result)
        return result

    def validate(self) -> None:
        """Check option values; raise :class:`PassOptionError` naming the option."""

    def requires(self, graph: Graph) -> None:
        """Precondition on the input graph."""
        if not graph.nodes:
            raise GraphError(f"{self.name}: the graph is empty")

    def requires_data(self, data: Any) -> None:
        """Precondition on the calibration data (``None`` when none was given): raise
        :class:`PassOptionError` when the options need data that is missing."""

    def call(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        """Postcondition on the result: the rewritten graph still has all its outputs."""
        if len(result.graph.outputs) != len(result.input_graph.outputs):
            raise GraphError(f"{self.name}: the rewritten graph lost outputs")

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """This pass in pipeline syntax, with its non-default options."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                opts.append(f"{f.name}={_format_value(value)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass findable by its kebab-case name."""
    if not cls.name or cls.name != cls.name.lower() or "_" in cls.name:
        raise ValueError(f"pass name `{cls.name}` must be kebab-case")
    PASSES[cls.name] = cls
    return cls


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ";".join(str(v) for v in value)
    return str(value)
