"""Numerical verification: a rewritten graph against its projected reference.

**Error.** ``max |a - b| / max(max |b|, tiny)`` per output, i.e. relative to the
output's scale, worst over the outputs and the check inputs (default probes of
:mod:`graphprune.probes`, or the user's own inputs).

**Tolerance.** Given explicitly (``rtol=``, ``--rtol``), it is used as is.  Otherwise it
is measured per model (:func:`measured_tolerance`): the reference's own float noise,
i.e. how far its outputs move between onnxruntime's optimisation levels
(``ORT_DISABLE_ALL`` vs ``ORT_ENABLE_ALL``: fusions and layout changes that round
differently) on the same inputs, times :data:`NOISE_FACTOR`, floored at
:data:`RTOL_FLOOR` (1e-5) and capped at :data:`RTOL_CAP` (1e-4, relative, fp32).  A
frontend that cannot measure its noise (fx, export) gets the floor.  fp32 rewrites stay
near 1e-7 on well-conditioned models, so the floor leaves room for rounding and none
for a wrong channel; a deep or ill-conditioned model whose own rounding noise exceeds
the floor gets a tolerance that follows it, but never more than the cap.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import probe_size
from .arrays import as_numpy
from .graph import Graph
from .errors import VerificationError
from .profile import stage

__all__ = [
    "ExactnessCheck", "NOISE_FACTOR", "RTOL_CAP", "RTOL_FLOOR", "assert_exact", "check_exact", "compare",
    "measured_tolerance", "reference_noise", "relative_error",
]

logger = logging.getLogger(__name__)

RTOL_FLOOR = 1e-5
RTOL_CAP = 1e-4
NOISE_FACTOR = 4.0

Samples = Sequence[Sequence[Any]]


def relative_error(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Largest scale-relative difference over paired outputs (numpy arrays or torch
    tensors), computed in float64."""
    if len(a) != len(b):
        raise VerificationError(f"output count differs: {len(a)} vs {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = as_numpy(x), as_numpy(y)
        if x.shape != y.shape:
            raise VerificationError(f"output shape differs: {tuple(x.shape)} vs {tuple(y.shape)}")
        x, y = x.astype(np.float64), y.astype(np.float64)
        scale = max(float(np.abs(y).max()) if y.size else 0.0, 1e-12)
        diff = float(np.abs(x - y).max()) if x.size else 0.0
        worst = max(worst, diff / scale)
    return worst


def measured_tolerance(noise: float | None) -> float:
    """``clamp(NOISE_FACTOR * noise, RTOL_FLOOR, RTOL_CAP)``; the floor when ``noise`` is
    unknown or not finite."""
    if noise is None or not math.isfinite(noise):
        return RTOL_FLOOR
    return min(max(NOISE_FACTOR * noise, RTOL_FLOOR), RTOL_CAP)


def reference_noise(reference: Graph, samples: Samples, outputs: Sequence[Sequence[Any]] | None = None) -> float | None:
    """How far ``reference``'s outputs move between onnxruntime optimisation levels on
    ``samples`` (worst relative difference); None when its frontend has no optimised run.
    ``outputs``: ``reference``'s own outputs on ``samples``, when the caller has them."""
    run_optimised = getattr(reference.frontend, "run_optimised", None)
    if run_optimised is None:
        return None
    worst = 0.0
    for k, xs in enumerate(samples):
        try:
            optimised = run_optimised(list(xs))
        except Exception as exc:  # an optimisation onnxruntime cannot apply to this model
            logger.warning("cannot measure the model's noise (onnxruntime with all optimisations: %s); tolerance %g",
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__, RTOL_FLOOR)
            return None
        worst = max(worst, relative_error(optimised, outputs[k] if outputs is not None else reference.run(*xs)))
    return worst


def _samples(reference: Graph, n: int, seed: int, inputs: Samples | None) -> list[list[Any]]:
    if inputs is not None:
        return [list(xs) for xs in inputs]
    return [reference.random_inputs(seed + i) for i in range(n)]


def compare(graph: Graph, reference: Graph, n: int = 2, seed: int = 0, inputs: Samples | None = None) -> float:
    """The worst relative error of ``graph`` against ``reference`` on ``inputs`` (a list of
    samples, each a list of arrays or tensors in input order), or on ``n`` default probes."""
    worst = 0.0
    for xs in _samples(reference, n, seed, inputs):
        worst = max(worst, relative_error(graph.run(*xs), reference.run(*xs)))
    return worst


@dataclass(frozen=True)
class ExactnessCheck:
    """One check's numbers: the error, the tolerance, and where the tolerance came from
    (``noise`` is the reference's measured float noise, None if not measured)."""

    error: float
    rtol: float
    noise: float | None
    samples: int
    measured: bool

    @property
    def passed(self) -> bool:
        return self.error <= self.rtol

    def tolerance_text(self) -> str:
        """``1e-05`` or ``1e-05 (measured: model noise 2.1e-06 x 4, floor 1e-05, cap 0.0001)``."""
        if not self.measured:
            return f"{self.rtol:g}"
        if self.noise is None:
            return f"{self.rtol:g} (the floor; the model's noise was not measured)"
        return (f"{self.rtol:.2g} (measured: model noise {self.noise:.2g} between onnxruntime optimisation levels "
                f"x {NOISE_FACTOR:g}, floor {RTOL_FLOOR:g}, cap {RTOL_CAP:g})")

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {"max_difference": self.error, "rtol": self.rtol, "noise": self.noise, "inputs": self.samples,
                "rtol_source": "measured" if self.measured else "given"}


def check_exact(
    graph: Graph, reference: Graph, rtol: float | None = None, n: int = 2, inputs: Samples | None = None,
    always_measure: bool = False, shrink: bool = False,
) -> ExactnessCheck:
    """Compare ``graph`` with ``reference``; ``rtol`` None measures the tolerance from the
    reference's own noise on the same inputs (:func:`measured_tolerance`).  The noise is
    measured only when the error exceeds the floor (below it the tolerance cannot
    matter), unless ``always_measure`` (reports that show it).  ``shrink`` first checks on
    the samples cropped to the smallest spatial size at which every conv tap still reads
    data (:mod:`graphprune.probe_size`, which states why that proves the same), and on
    the samples as given when the graphs cannot run at that size or the check fails there
    (rounding grows differently with the size: a failure counts only at the size given).

    One random probe already proves exactness almost surely: the difference of the two
    graphs is a piecewise-analytic function of the input, so unless it is zero on a
    whole region a random input lands where it is not; ``n`` more probes (each an
    independent draw) guard against an unlucky draw near a region's boundary."""
    with stage("verify"):
        samples = _samples(reference, n, 0, inputs)
        if shrink:
            small = _compare_small(graph, reference, samples)
            if small is not None:
                check = _outcome(small[0], reference, small[1], len(samples), rtol, always_measure)
                if check.passed:
                    return check
        error = compare(graph, reference, inputs=samples)
        return _outcome(error, reference, samples, len(samples), rtol, always_measure)


def _outcome(
    error: float, reference: Graph, samples: Samples, count: int, rtol: float | None, always_measure: bool
) -> ExactnessCheck:
    """The check's numbers for ``error`` measured on ``samples`` (``count`` probes):
    ``rtol`` if given, else the tolerance from the reference's noise on the same samples."""
    if rtol is not None:
        return ExactnessCheck(error, rtol, None, count, measured=False)
    noise = reference_noise(reference, samples) if always_measure or error > RTOL_FLOOR else None
    return ExactnessCheck(error, measured_tolerance(noise), noise, count, measured=True)


SMALL_ATTEMPTS = 5
"""Reference runs at candidate crop factors before checking at the captured size."""


def _compare_small(graph: Graph, reference: Graph, samples: Samples) -> tuple[float, list[list[Any]]] | None:
    """The error on the samples cropped by the largest factor found at which the
    reference's recorded conv sizes meet the window condition (:mod:`graphprune.probe_size`),
    with the samples it ran (one batch, or the cropped probes); None when nothing crops,
    the frontend cannot run or record at another size, or no tried factor qualifies
    (then the caller checks at the captured size).

    The largest candidate factor is tried first; when the recorded sizes refuse it (or
    the model cannot run there), a bisection over the smaller candidates follows, at most
    :data:`SMALL_ATTEMPTS` reference runs in all, each no larger than the one accepted.
    The probes run as one batch (their inputs concatenated on the batch axis: one
    forward of each graph instead of one per probe) unless the model refuses that."""
    factors = probe_size.candidate_factors(reference)
    if not hasattr(reference.frontend, "run_with_shapes") or not getattr(reference.frontend, "shape_polymorphic", False) \
            or not factors:
        return None
    search = _CropSearch(reference, samples)
    best, tries = search.attempt(factors[0]), 1
    left, right = 1, len(factors) - 1
    searching = best is None  # bisection for the largest factor that passes
    while searching and left <= right and tries < SMALL_ATTEMPTS:
        mid = (left + right) // 2
        found, tries = search.attempt(factors[mid]), tries + 1
        if found is not None:
            best, right = found, mid - 1
        else:
            left = mid + 1
    if best is None:
        return None
    small, first = best
    try:
        worst = relative_error(graph.run(*small[0]), first)
        for xs in small[1:]:
            worst = max(worst, relative_error(graph.run(*xs), reference.run(*xs)))
    except Exception as exc:  # the rewritten graph fixes a size the reference does not: check at full size
        logger.debug("the rewritten graph cannot run at the smaller size (%s)", _first_line(exc))
        return None
    return worst, small


class _CropSearch:
    """Reference runs at candidate crop factors, with the window condition checked on
    the recorded sizes; :meth:`attempt` gives the (cropped samples, first outputs) to
    compare against, or None.  Probes run channels-last where the frontend keeps an
    array's strides and the network is partly grouped convs
    (:func:`graphprune.probe_size.prefers_channels_last`), until a run fails in that
    layout (a ``view`` of a permuted tensor)."""

    def __init__(self, reference: Graph, samples: Samples) -> None:
        self.reference = reference
        self.samples = samples
        self.watched = probe_size.window_values(reference)
        self.stack = len(samples) > 1  # until the model refuses one batch
        self.channels_last = getattr(reference.frontend, "keeps_strides", False) and \
            probe_size.prefers_channels_last(reference)
        self._raised = False

    def attempt(self, f: float) -> tuple[list[list[Any]], list[Any]] | None:
        small = probe_size.crop(self.samples, f)
        if small is None:
            return None
        if self.channels_last:
            self._raised = False
            found = self._attempt(f, [probe_size.channels_last(xs) for xs in small])
            if found is not None or not self._raised:
                return found
            logger.debug("the probes cannot run channels-last; plain layout from now on")
            self.channels_last = False
        return self._attempt(f, small)

    def _attempt(self, f: float, small: list[list[Any]]) -> tuple[list[list[Any]], list[Any]] | None:
        batch = probe_size.stacked(small) if self.stack else None
        if batch is not None:
            if self.channels_last:
                batch = probe_size.channels_last(batch)
            try:
                return self._accepted(f, [batch])
            except Exception:  # the batch, or the size? the run below tells
                pass
        try:
            found = self._accepted(f, small)
        except Exception as exc:  # a size the model's code fixes, or a window larger than its input
            logger.debug("the reference cannot run at 1/%g of the size (%s)", f, _first_line(exc))
            self._raised = True
            return None
        if batch is not None:
            logger.debug("the probes cannot run as one batch; running them one by one")
            self.stack = False
        return found

    def _accepted(self, f: float, small: list[list[Any]]) -> tuple[list[list[Any]], list[Any]] | None:
        if not self._inferred_ok(f, small[0]):
            return None
        first, shapes = self.reference.frontend.run_with_shapes(small[0], self.watched)
        bad = probe_size.violated_window(self.reference, probe_size.recorded_size_of(shapes))
        if bad is not None:
            logger.debug("at 1/%g of the size a tap of %s reads no data", f, bad)
            return None
        return small, first

    def _inferred_ok(self, f: float, xs: Sequence[Any]) -> bool:
        """Where the frontend infers shapes at another size without running (``shapes_at``:
        ONNX), the window condition on those shapes, so that a refused size costs no run;
        True for frontends without it (their recorded run decides)."""
        shapes_at = getattr(self.reference.frontend, "shapes_at", None)
        if shapes_at is None:
            return True
        shapes = shapes_at([tuple(as_numpy(x).shape) for x in xs])
        bad = "(no inferred shapes)" if shapes is None else \
            probe_size.violated_window(self.reference, probe_size.recorded_size_of(shapes))
        if bad is not None:
            logger.debug("at 1/%g of the size a tap of %s reads no data (inferred shapes)", f, bad)
            return False
        return True


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def assert_exact(
    graph: Graph, reference: Graph, rtol: float | None = None, n: int = 2, what: str = "rewrite",
    inputs: Samples | None = None,
) -> float:
    """Raise :class:`VerificationError` unless ``graph`` matches ``reference``; the error."""
    check = check_exact(graph, reference, rtol=rtol, n=n, inputs=inputs)
    if not check.passed:
        raise VerificationError(refusal(check, what))
    return check.error


def refusal(check: ExactnessCheck, what: str) -> str:
    """The message of a failed check, with both numbers."""
    return (f"{what}: output differs from the projected reference by {check.error:.3g} on {check.samples} inputs "
            f"(tolerance {check.tolerance_text()})")
