"""The shared pass-test helper.

``check_pass`` checks the four things STYLE.md asks of every pass test, plus exactness:

1. the expected structural change (MACs or parameters went down when modified);
2. ``modified`` agrees with whether the graph actually changed;
3. idempotence: running the pass's lossless setting on the result changes nothing
   (for a lossless pass: running the pass again changes nothing);
4. exactness: the result equals its projected reference on random inputs (rtol 1e-5
   relative to output scale), and a lossless result equals its input.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

import graphprune as gp
from graphprune.passes_base import Pass, PassResult
from graphprune.verify import relative_error

RTOL = 1e-5


def assert_rel_close(got: Any, want: Any, rtol: float = RTOL, what: str = "") -> float:
    """``max|got - want| / max|want| <= rtol`` (the error measure of :mod:`graphprune.verify`:
    relative to the output's scale, never an absolute tolerance); tensors, arrays or lists
    of them, paired.  Returns the error."""
    pair = lambda v: [torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t.detach() for t in v]  # noqa: E731
    gs = pair(got if isinstance(got, (list, tuple)) else [got])
    ws = pair(want if isinstance(want, (list, tuple)) else [want])
    err = relative_error(gs, ws)
    assert err <= rtol, f"{what + ': ' if what else ''}relative error {err:.3g} > {rtol:g}"
    return err


def params_changed(a: gp.Graph, b: gp.Graph) -> bool:
    ka, kb = set(a.param_keys()), set(b.param_keys())
    if ka != kb:
        return True
    return any(a.param(k).shape != b.param(k).shape or not np.array_equal(a.param(k), b.param(k)) for k in ka)


def check_pass(graph: gp.Graph, p: Pass | str, expect_modified: bool | None = True, rtol: float = RTOL) -> PassResult:
    if isinstance(p, str):
        (p,) = gp.parse_pipeline(p)
    before = gp.graph_cost(graph)
    result = p(graph)
    after = gp.graph_cost(result.graph)
    changed = params_changed(graph, result.graph) or len(graph.nodes) != len(result.graph.nodes)
    assert result.modified == changed, f"modified={result.modified} but graph changed={changed}"
    if expect_modified is not None:
        assert result.modified == expect_modified, f"expected modified={expect_modified}"
    if result.modified:
        assert after.macs < before.macs or after.params < before.params, "modified but nothing got smaller"
    # exactness against the projected reference
    err = gp.compare(result.graph, result.reference(), n=2)
    assert err <= rtol, f"{p.spec()}: differs from its projected reference by {err:.3g}"
    lossless = getattr(p, "lossless", False)
    if lossless:
        err_in = gp.compare(result.graph, graph, n=2)
        assert err_in <= rtol, f"{p.spec()}: lossless result differs from its input by {err_in:.3g}"
    # idempotence
    if any(f.name == "lossless" for f in dataclasses.fields(p)):
        again = _lossless_version(p)(result.graph)
        assert not again.modified, f"{p.spec()}: a lossless re-run still changed the graph"
    return result


def _lossless_version(p: Pass) -> Pass:
    """The same pass at its lossless setting (keeping ``ignore`` if it has one)."""
    keep = {k: v for k, v in p.options().items() if k == "ignore"}
    return type(p)(**keep, lossless=True)
