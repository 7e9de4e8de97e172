"""Channel importance criteria.

An :class:`Importance` scores every channel class of a pruning group; higher means more
important.  A class's score sums over every member of its group that owns parameters
on it, so a residual stream's channel is scored by all the filters that write it.  Each
member's norms are divided by their mean first (``s_c = sum_m n_mc / mean_c' n_mc'``), so a
1x1 conv and a 3x3 conv feeding one concat are compared by relative, not absolute, size.

* ``l1`` / ``l2``: the L1 / L2 norm of each produced filter (weight slices of
  producers: a conv's output filter, a linear's row).
* ``bn_scale``: ``|gamma|`` of every batch/group norm on the class (network slimming);
  falls back to ``l1`` for classes with no normalisation.

Data-driven criteria need calibration data (``gp.run(graph, pipeline, data=...)``); they
live in :mod:`graphprune.training.criteria` (torch-heavy, imported on first use):

* ``kl``: KL(p_pruned || p) of the softmax outputs when the class alone is pruned (CURL);
* ``taylor``: ``|sum g*w|`` over the class's parameter slices (first-order loss change).

Their scores are comparable across groups, so a global ranking does not normalise them
by the group mean (the score function carries ``comparable = True``).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from .coupling import PruningGroup
from .graph import Graph


class Importance(Protocol):
    def __call__(self, graph: Graph, group: PruningGroup) -> np.ndarray: ...


_BLOCK = 1 << 15
"""Elements per block in :func:`_slice_norms`: its float64 temporaries stay in cache."""


def _slice_norms(t: np.ndarray, axis: int, p: int) -> np.ndarray:
    """The L``p`` norm (p = 1 or 2, in float64) of every slice of ``t`` along ``axis``,
    a block of slices at a time (no float64 copy of the whole weight)."""
    moved = np.moveaxis(t, axis, 0).reshape(t.shape[axis], -1)
    rows = max(1, _BLOCK // max(moved.shape[1], 1))
    out = np.empty(moved.shape[0], dtype=np.float64)
    for start in range(0, moved.shape[0], rows):
        block = moved[start:start + rows].astype(np.float64)
        out[start:start + rows] = np.abs(block).sum(1) if p == 1 else np.sqrt(np.square(block).sum(1))
    return out


def _accumulate(graph: Graph, group: PruningGroup, roles: set[str], param_roles: set[str], p: int) -> np.ndarray:
    scores = np.zeros(group.n_classes)
    for port, members in group.members.items():
        cls = group.class_of[port]
        for m in members:
            if m.coupling.role not in roles:
                continue
            for role, axis in m.coupling.slices:
                if role not in param_roles:
                    continue
                norms = _slice_norms(graph.node_param(m.node, role), axis, p)  # type: ignore[arg-type]
                mean = norms.mean()
                np.add.at(scores, cls, norms / mean if mean > 0 else norms)
    return scores


def magnitude(p: int) -> Importance:
    def score(graph: Graph, group: PruningGroup) -> np.ndarray:
        return _accumulate(graph, group, {"produce"}, {"weight", "value"}, p)

    score.__name__ = f"l{p}"
    return score


def bn_scale(graph: Graph, group: PruningGroup) -> np.ndarray:
    """|gamma| summed over the normalisations of each class; l1 where there are none."""
    scores = _accumulate(graph, group, {"norm"}, {"weight"}, 1)
    has_norm = np.zeros(group.n_classes, bool)
    for port, members in group.members.items():
        if any(m.coupling.role == "norm" and "weight" in m.node.params for m in members):
            has_norm[group.class_of[port]] = True
    if not has_norm.all():
        fallback = magnitude(1)(graph, group)
        scores = np.where(has_norm, scores, fallback)
    return scores


def _data_criteria() -> Any:
    """:mod:`graphprune.training.criteria`, or a clear error when torch is missing."""
    from .errors import NeedsTorchError

    try:
        from .training import criteria
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        raise NeedsTorchError(
            "the data-driven criteria (kl, taylor) need PyTorch, which is not installed: pip install graphprune[torch] "
            "(the magnitude criteria l1, l2 and bn_scale work without it)"
        ) from exc
    return criteria


def _kl(data: Any) -> Importance:
    return _data_criteria().kl_importance(data)


def _taylor(data: Any) -> Importance:
    return _data_criteria().taylor_importance(data)


CRITERIA: dict[str, Callable[..., Importance]] = {
    "l1": lambda: magnitude(1),
    "l2": lambda: magnitude(2),
    "bn_scale": lambda: bn_scale,
    "kl": _kl,
    "taylor": _taylor,
}
DATA_CRITERIA: frozenset[str] = frozenset({"kl", "taylor"})
"""Criteria whose factory takes the calibration data."""


def needs_data(name: str) -> bool:
    return name in DATA_CRITERIA


def get_importance(name: str, data: Any = None) -> Importance:
    """The criterion ``name``; data-driven criteria get ``data`` (required)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion `{name}` (known: {', '.join(sorted(CRITERIA))})")
    if name in DATA_CRITERIA:
        if data is None:
            raise ValueError(f"criterion `{name}` needs calibration data")
        return CRITERIA[name](data)
    return CRITERIA[name]()
