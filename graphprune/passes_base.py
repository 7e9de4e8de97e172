"""Pass infrastructure: the pass base class, results, the registry, the pipeline syntax
and the pass manager.

A pass is a frozen dataclass with a kebab-case ``name``; its fields are its options, and
the pipeline syntax ``name{opt=value,...},name2`` is derived from those fields, so the
command line and the Python API share one definition of every option.  Calling a pass
checks its precondition, runs :meth:`Pass.call` (decide, then rewrite a copy) and checks
the postcondition on the result.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from .graph import Graph, GraphError
from .projection import Projection

logger = logging.getLogger(__name__)


class PassOptionError(ValueError):
    """An unknown pass, an unknown option or an option value out of range."""


class BudgetError(ValueError):
    """A budget that the graph cannot meet (the message says what limits it)."""


class VerificationError(AssertionError):
    """A rewritten graph that does not match its projected reference."""


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


def _load_builtin_passes() -> None:
    from . import passes  # noqa: F401  (imports register the built-in passes)


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    try:
        return PASSES[name]
    except KeyError:
        known = ", ".join(sorted(PASSES))
        raise PassOptionError(f"unknown pass `{name}` (known passes: {known})") from None


# ----------------------------------------------------------------- pipeline
def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth < 0:
                raise PassOptionError(f"unbalanced `{ch}` in pipeline `{text}`")
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PassOptionError(f"unbalanced braces in pipeline `{text}`")
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ";".join(str(v) for v in value)
    return str(value)


def _convert(pass_name: str, option: str, raw: str, hint: Any) -> Any:
    """Convert ``raw`` text to the option's annotated type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            try:
                return _convert(pass_name, option, raw, a)
            except PassOptionError as exc:
                errors.append(str(exc))
        raise PassOptionError(f"{pass_name}: option `{option}` cannot take `{raw}`")
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = [s for s in raw.replace("[", "").replace("]", "").split(";") if s]
        return tuple(_convert(pass_name, option, s, inner) for s in items)
    try:
        if hint is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
    except ValueError:
        raise PassOptionError(f"{pass_name}: option `{option}` expects {getattr(hint, '__name__', hint)}, got `{raw}`") from None
    raise PassOptionError(f"{pass_name}: option `{option}` has an unsupported type {hint}")


def make_pass(name: str, options: dict[str, Any]) -> Pass:
    """Build pass ``name`` from options given as text or as Python values."""
    cls = get_pass(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in options.items():
        if key not in fields:
            raise PassOptionError(f"{name}: unknown option `{key}` (options: {', '.join(fields) or 'none'})")
        values[key] = _convert(name, key, raw, hints[key]) if isinstance(raw, str) else raw
    p = cls(**values)
    p.validate()
    return p


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``name{opt=value,...},name2`` into pass objects."""
    passes = []
    for item in _split_top(text):
        name, brace, rest = item.partition("{")
        name = name.strip()
        options: dict[str, str] = {}
        if brace:
            if not rest.endswith("}"):
                raise PassOptionError(f"`{item}`: options must end with `}}`")
            for opt in _split_top(rest[:-1]):
                key, eq, value = opt.partition("=")
                if not eq:
                    raise PassOptionError(f"{name}: option `{opt}` must be written key=value")
                options[key.strip()] = value.strip()
        passes.append(make_pass(name, options))
    if not passes:
        raise PassOptionError("empty pipeline")
    return passes


# -------------------------------------------------------------- pass manager
@dataclass
class PipelineResult:
    graph: Graph
    results: list[PassResult]
    timings: list[float]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.results)


class PassManager:
    """Runs passes in order and verifies between them.

    ``verify`` (default on) checks each result against its projected reference on
    random inputs; ``lossless`` sets every pass that has the option to its lossless
    setting; ``data`` (calibration batches, see
    :func:`graphprune.training.criteria.calibration_batches`) goes to every pass that
    uses data (``Pass.uses_data``), e.g. ``prune-channels{criterion=kl}``.
    """

    def __init__(
        self, passes: Sequence[Pass], verify: bool = True, rtol: float = 1e-5, lossless: bool = False, data: Any = None
    ) -> None:
        self.passes = [_with_lossless(p) if lossless else p for p in passes]
        self.verify = verify
        self.rtol = rtol
        self.data = data

    def run(self, graph: Graph, progress: Any = None) -> PipelineResult:
        from .verify import assert_exact

        results, timings = [], []
        current = graph
        for p in self.passes:
            start = time.perf_counter()
            result = p(current, data=self.data)
            timings.append(time.perf_counter() - start)
            logger.info("%s: %s in %.2fs", p.spec(), "modified" if result.modified else "no change", timings[-1])
            if self.verify and result.modified:
                assert_exact(result.graph, result.reference(), rtol=self.rtol, what=p.spec())
            results.append(result)
            current = result.graph
            if progress is not None:
                progress(p)
        return PipelineResult(current, results, timings)


def _with_lossless(p: Pass) -> Pass:
    if any(f.name == "lossless" for f in dataclasses.fields(p)):
        return dataclasses.replace(p, lossless=True)
    return p


def run(
    graph: Graph,
    pipeline: str | Sequence[Pass] | Pass,
    *,
    data: Any = None,
    verify: bool = True,
    lossless: bool = False,
    rtol: float = 1e-5,
) -> PipelineResult:
    """Run a pipeline (string, pass list or one pass) on ``graph``; verify between passes.

    ``data`` is calibration data for passes that use it (a batch tensor, ``(x, labels)``,
    a mapping of input name to array, or an iterable of those, e.g. a ``DataLoader``)."""
    if isinstance(pipeline, str):
        passes = parse_pipeline(pipeline)
    elif isinstance(pipeline, Pass):
        passes = [pipeline]
    else:
        passes = list(pipeline)
    return PassManager(passes, verify=verify, rtol=rtol, lossless=lossless, data=data).run(graph)
