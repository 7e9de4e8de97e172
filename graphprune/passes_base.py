"""Pass infrastructure: the registry lookup that loads the built-in passes, the pipeline
syntax and the pass manager.

A pass is a frozen dataclass with a kebab-case ``name``; its fields are its options, and
the pipeline syntax ``name{opt=value,...},name2`` is derived from those fields, so the
command line and the Python API share one definition of every option.  The base class,
results and registry live in :mod:`graphprune.pass_api` (which pass modules import) and
the errors in :mod:`graphprune.errors`; both are re-exported here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import BudgetError, CheckInputError, PassOptionError, VerificationError  # noqa: F401  (re-exported: they lived here first)
from .graph import Graph
from .pass_api import PASSES, Pass, PassResult, register_pass  # noqa: F401  (re-exported: they lived here first)
from .probes import CheckInputs, check_samples
from .freeze import can_freeze, freeze_inexact
from .verify import ExactnessCheck, check_exact, refusal
from .gcpause import gc_paused

logger = logging.getLogger(__name__)


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
    p.check_lossless()
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
    """The final graph, each pass's result and time, and each verification's numbers
    (``checks[i]`` is None where pass ``i`` changed nothing or verification was off)."""

    graph: Graph
    results: list[PassResult]
    timings: list[float]
    checks: list[ExactnessCheck | None] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.results)

    @property
    def frozen(self) -> dict[str, dict[str, str]]:
        """Per pass that froze decision units: unit -> reason."""
        return {r.pass_name: dict(r.frozen) for r in self.results if r.frozen}

    def __repr__(self) -> str:
        passes = ", ".join(repr(r) for r in self.results)
        return f"<PipelineResult {'modified' if self.modified else 'no change'}: {self.graph!r}; [{passes}]>"


class PassManager:
    """Runs passes in order and verifies between them.

    ``verify`` (default on) checks each result against its projected reference on the
    check inputs: ``check_inputs`` (the user's own, see :func:`graphprune.probes.check_samples`)
    or ``probes`` default probes (random inputs, two unless told; see
    :func:`graphprune.verify.check_exact` for why one already proves exactness almost
    surely and the second guards against an unlucky draw), cropped to a smaller spatial
    size where that still exercises every op (``small_probes``, see
    :mod:`graphprune.probe_size`).  ``rtol`` None measures the tolerance per model from the
    reference's own float noise (:func:`graphprune.verify.measured_tolerance`); a number
    is used as is.  ``lossless`` sets every pass that has the option to its lossless
    setting; ``freeze`` (default on) turns a failed check into a search for the decision
    units responsible, which stay as they were (``PassResult.frozen`` names them and the
    error each showed; :mod:`graphprune.freeze`) while the rest is kept, instead of a
    :class:`VerificationError`.  ``data`` (calibration batches, see
    :func:`graphprune.training.criteria.calibration_batches`) goes to every pass that
    uses data (``Pass.uses_data``), e.g. ``prune-channels{criterion=kl}``.
    """

    def __init__(
        self, passes: Sequence[Pass], verify: bool = True, rtol: float | None = None, lossless: bool = False,
        check_inputs: CheckInputs | None = None, data: Any = None, freeze: bool = True, probes: int = 2,
        small_probes: bool = True,
    ) -> None:
        if probes < 1:
            raise PassOptionError(f"probes must be at least 1, got {probes}")
        self.passes = [_with_lossless(p) if lossless else p for p in passes]
        self.verify = verify
        self.rtol = rtol
        self.check_inputs = check_inputs
        self.data = data
        self.freeze = freeze
        self.probes = probes
        self.small_probes = small_probes

    def _check(self, result: PassResult, samples: list[list[Any]]) -> ExactnessCheck:
        return check_exact(result.graph, result.reference(), rtol=self.rtol, inputs=samples,
                           shrink=self.small_probes and self.check_inputs is None)

    def run(self, graph: Graph, progress: Any = None) -> PipelineResult:
        results, timings, checks = [], [], []
        samples = check_samples(graph, self.check_inputs, n=self.probes) if self.verify else []
        current = graph
        for p in self.passes:
            start = time.perf_counter()
            result = p(current, data=self.data)
            timings.append(time.perf_counter() - start)
            logger.info("%s: %s in %.2fs", p.spec(), "modified" if result.modified else "no change", timings[-1])
            check = None
            if self.verify and result.modified:
                check = self._check(result, samples)
                logger.info("%s: error %.2e, tolerance %s", p.spec(), check.error, check.tolerance_text())
                if not check.passed and self.freeze and can_freeze(p, result):
                    result, check = freeze_inexact(p, current, result, lambda r: self._check(r, samples), self.data)
                    timings[-1] = time.perf_counter() - start
                elif not check.passed:
                    raise VerificationError(refusal(check, p.spec()))
            for earlier in results:  # only the last pass's reference is needed after it
                earlier.forget_reference()
            results.append(result)
            checks.append(check)
            current = result.graph
            if progress is not None:
                progress(p)
        return PipelineResult(current, results, timings, checks)


def _with_lossless(p: Pass) -> Pass:
    if any(f.name == "lossless" for f in dataclasses.fields(p)):
        return dataclasses.replace(p, lossless=True)
    return p


@gc_paused
def run(
    graph: Graph, pipeline: str | Sequence[Pass] | Pass, *, data: Any = None, verify: bool = True,
    lossless: bool = False, rtol: float | None = None, check_inputs: CheckInputs | None = None, freeze: bool = True,
    probes: int = 2, small_probes: bool = True,
) -> PipelineResult:
    """Run a pipeline (string, pass list or one pass) on ``graph``; verify between passes.

    ``data`` is calibration data for passes that use it (a batch tensor, ``(x, labels)``,
    a mapping of input name to array, or an iterable of those, e.g. a ``DataLoader``).
    ``check_inputs`` are the inputs to verify on (an ``.npz`` path, a mapping name ->
    array with samples along a leading axis, or a list of samples; see
    :mod:`graphprune.probes`), default ``probes`` random probes (2), spatially cropped
    where every op still sees a full window (``small_probes``); ``rtol`` None measures the tolerance
    from the model's own float noise, a number is used as is.  ``freeze`` (default on)
    freezes the decision units whose rewrite fails the check and keeps the rest
    (:mod:`graphprune.freeze`); off, a failed check raises :class:`VerificationError`.
    """
    if isinstance(pipeline, str):
        passes = parse_pipeline(pipeline)
    elif isinstance(pipeline, Pass):
        passes = [pipeline]
    else:
        passes = list(pipeline)
    manager = PassManager(passes, verify=verify, rtol=rtol, lossless=lossless, check_inputs=check_inputs, data=data,
                          freeze=freeze, probes=probes, small_probes=small_probes)
    return manager.run(graph)
