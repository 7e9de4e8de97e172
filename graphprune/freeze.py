"""Prune what can be proven: when a pass's exactness check fails, find the decision units
responsible, freeze them, and keep the rest.

A pass's decision splits into independent *units* (``PassResult.units``: a pruning
group of ``prune-channels``, a layer of ``factorize``, ``shrink-kernels`` or
``group-convs``).  :func:`freeze_inexact` bisects them: with the unit set ``U`` failing,
it rewrites with each half of ``U`` applied alone and recurses into the halves that
fail, down to single units, which it freezes with the reason
``"inexact here: max error E"`` (``E`` the error that unit showed applied alone).  Units
that fail only together (neither half fails) are frozen as a whole.  The rest is
rewritten once more and checked; if it still fails (an interaction the halves hid),
the search repeats on what is left, so the returned result always passes its check or
applies nothing.

A subset is applied by ``result.redo(frozen)`` when the pass provides it (the same
decision minus the frozen units), otherwise by running the pass again with the frozen
layers added to its ``ignore`` option (passes whose units are layers).  Each check
compares the rewrite with *its own* projected reference on the same inputs and with
the same tolerance rule as the pass manager (:func:`graphprune.verify.check_exact`).
The cost is about ``2 k log2(n)`` rewrites and checks for ``k`` bad units among ``n``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Collection, Sequence

from .graph import Graph
from .pass_api import Pass, PassResult
from .verify import ExactnessCheck

__all__ = ["can_freeze", "freeze_inexact", "restricted", "units_of"]

logger = logging.getLogger(__name__)

Check = Callable[[PassResult], ExactnessCheck]


def restricted(p: Pass, graph: Graph, result: PassResult, frozen: Collection[str], data: Any = None) -> PassResult:
    """``result``'s decision without the ``frozen`` units, rewritten from ``graph``."""
    if result.redo is not None:
        out = result.redo(frozenset(frozen))
        out.pass_name = result.pass_name
        return out
    fields = {f.name for f in dataclasses.fields(p)}
    if "ignore" not in fields:
        raise NotImplementedError(f"{p.name}: cannot apply part of its decision")
    return dataclasses.replace(p, ignore=tuple(p.ignore) + tuple(sorted(frozen)))(graph, data=data)  # type: ignore[attr-defined]


def can_freeze(p: Pass, result: PassResult) -> bool:
    """Whether part of ``result``'s decision can be applied: it has units, and a ``redo``
    or an ``ignore`` option to leave the frozen ones out."""
    return bool(units_of(result)) and (result.redo is not None or any(f.name == "ignore" for f in dataclasses.fields(p)))


def units_of(result: PassResult) -> dict[str, str]:
    """The result's decision units: its own, or the layers of its records."""
    if result.units:
        return dict(result.units)
    return {str(r["layer"]): str(r["layer"]) for r in result.records if "layer" in r}


def freeze_inexact(
    p: Pass, graph: Graph, result: PassResult, check: Check, data: Any = None,
) -> tuple[PassResult, ExactnessCheck | None]:
    """``result`` with its inexact units frozen, and the check of what is kept (None when
    nothing is kept).  ``check(r)`` compares ``r.graph`` with ``r.reference()``."""
    units = list(units_of(result))
    if not units:
        return result, None
    frozen: dict[str, str] = {}
    active = units
    while active:
        def apply_only(subset: Sequence[str]) -> tuple[PassResult, ExactnessCheck]:
            keep = set(subset)
            r = restricted(p, graph, result, [u for u in units if u not in keep], data)
            return r, check(r)

        found = _bisect(active, apply_only)
        if not found:  # the whole set fails, no half of it does: freeze it all
            r, c = apply_only(active)
            found = {u: c.error for u in active}
        for u, err in found.items():
            frozen[u] = f"inexact here: max error {err:.2g}"
            logger.warning("%s: froze %s: inexact here: max error %.2g", result.pass_name, u, err)
        active = [u for u in active if u not in found]
        if not active:
            break
        kept, c = apply_only(active)
        if c.passed:
            kept.frozen, kept.units = frozen, units_of(result)
            return kept, c
    kept = restricted(p, graph, result, units, data)
    kept.frozen, kept.units = frozen, units_of(result)
    kept.modified = False
    kept.no_change = f"every decision was inexact and frozen ({len(frozen)} units)"
    return kept, None


def _bisect(units: list[str], apply_only: Callable[[Sequence[str]], tuple[PassResult, ExactnessCheck]]) -> dict[str, float]:
    """The failing single units under ``units`` (known to fail as a whole), with the
    error each shows alone; empty when no half fails on its own."""
    if len(units) == 1:
        _, c = apply_only(units)
        return {} if c.passed else {units[0]: c.error}
    mid = len(units) // 2
    found: dict[str, float] = {}
    for half in (units[:mid], units[mid:]):
        _, c = apply_only(half)
        if c.passed:
            continue
        if len(half) == 1:
            found[half[0]] = c.error
        else:
            inner = _bisect(half, apply_only)
            found.update(inner or {u: c.error for u in half})
    return found
