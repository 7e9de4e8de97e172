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
from typing import Any, Callable, ClassVar, Collection

from .errors import BudgetError, PassOptionError, VerificationError
from .gcpause import gc_paused
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

    ``units`` names the decision's independent parts (a pruning group, a layer) with what
    each covers (those in ``frozen`` were not applied); ``redo(frozen)``, when the pass provides it, rewrites ``input_graph``
    again with the same decision minus the ``frozen`` units.  ``frozen`` maps the units
    left as they were to the reason (``"inexact here: max error 2e-04"``, filled by the
    pass manager, :mod:`graphprune.freeze`); ``no_change`` says why nothing changed.
    """

    graph: Graph = field(repr=False)
    modified: bool
    input_graph: Graph = field(repr=False)
    projection: Projection = field(default_factory=Projection, repr=False)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    pass_name: str = ""
    units: dict[str, str] = field(default_factory=dict, repr=False)
    frozen: dict[str, str] = field(default_factory=dict)
    no_change: str = ""
    redo: Callable[[Collection[str]], PassResult] | None = field(default=None, compare=False, repr=False)
    _reference: Graph | None = field(default=None, init=False, compare=False, repr=False)

    def __repr__(self) -> str:
        what = "modified" if self.modified else f"no change{': ' + self.no_change if self.no_change else ''}"
        frozen = f", {len(self.frozen)} units frozen" if self.frozen else ""
        return f"<{type(self).__name__} {self.pass_name or '?'}: {what}, {len(self.records)} records{frozen}>"

    def reference(self) -> Graph:
        """The input graph with projected weights: what ``graph`` must compute.  Built once
        and kept (the pass manager's check, the CLI's file check and its noise measurement
        share it and its runtime session); treat it as read-only."""
        if self._reference is None:
            with stage("verify"):
                self._reference = self.projection.apply(self.input_graph)
        return self._reference

    def forget_reference(self) -> None:
        """Drop the kept reference (a full copy of the weights)."""
        self._reference = None

    def projected_model(self, model: Any) -> Any:
        """A trainable copy of ``model`` (the traced original) with the projection held."""
        return self.projection.projected_model(model)

    def summary(self) -> str:
        """One line: modified or why not, and what was frozen."""
        if not self.modified:
            return f"{self.pass_name}: no change" + (f" ({self.no_change})" if self.no_change else "")
        frozen = f"; froze {len(self.frozen)} ({', '.join(self.frozen)})" if self.frozen else ""
        return f"{self.pass_name}: modified, {len(self.records)} records{frozen}"


@dataclass(frozen=True)
class Pass:
    """Base class: subclasses set ``name`` and implement :meth:`call`."""

    name: ClassVar[str] = ""
    uses_data: ClassVar[bool] = False
    """A pass that can use calibration data sets this; its ``call`` takes ``data=``."""

    @gc_paused
    def __call__(self, graph: Graph, data: Any = None) -> PassResult:
        self.check_lossless()
        self.validate()
        self.requires(graph)
        self.requires_data(data)
        result = self.call(graph, data=data) if self.uses_data else self.call(graph)  # type: ignore[call-arg]
        result.pass_name = self.name
        self.ensures(result)
        if not result.modified and not result.no_change:
            result.no_change = self.why_unchanged(result)
        return result

    def why_unchanged(self, result: PassResult) -> str:
        """Why ``result`` changed nothing, from the layers the pass left alone
        (``result.skipped``, layer -> reason) when it records them."""
        skipped: dict[str, str] = getattr(result, "skipped", {}) or {}
        lossless = bool(getattr(self, "is_lossless", getattr(self, "lossless", False)))
        shown = "; ".join(f"{layer}: {why}" for layer, why in list(skipped.items())[:3])
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        alone = f"; {len(skipped)} layers left alone: {shown}{more}" if skipped else ""
        if lossless:
            return f"no structure is already zero or low-rank (the lossless setting removes only that){alone}"
        return f"no layer qualified under {self.spec()}{alone}"

    def validate(self) -> None:
        """Check option values; raise :class:`PassOptionError` naming the option."""

    def check_lossless(self) -> None:
        """``lossless=true`` removes only structure that is already zero, so a target
        (``ratio``, ``macs``, ``energy``, ``rank``) beside it would be silently ignored:
        refuse the pair, naming both.  (``group-convs`` takes ``groups``/``budget`` with
        ``lossless`` as a constraint: only lossless group counts.)"""
        if not getattr(self, "lossless", False):
            return
        given = [f"{n}={getattr(self, n)}" for n in TARGET_OPTIONS if getattr(self, n, None) is not None]
        if given:
            raise PassOptionError(
                f"{self.name}: lossless conflicts with {', '.join(given)} (lossless removes only what is already "
                "zero; a target prunes more): give one of them"
            )

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


TARGET_OPTIONS = ("ratio", "macs", "energy", "rank")
"""Options that set how much a pass removes; none may be given with ``lossless``."""

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
