"""`prune-channels`: remove channels exactly, inside and outside residual connections.

Decide: the coupling analysis (:mod:`graphprune.coupling`) splits the graph's channels
into pruning groups and channel classes; residual adds tie every tensor they join into
one group, so a residual stream loses the same channels in every block.  Each class is
scored by a criterion (``l1``, ``l2``, ``bn_scale``) summed over its members, and the
lowest-scoring classes are removed to meet the target:

* ``ratio=r``  — remove ``floor(r * n)`` of the ``n`` prunable classes of each group
  (``scope=global``: rank all groups' classes together, scores normalised by each
  group's mean, and remove ``r`` of all prunable classes);
* ``macs=m``   — keep at most ``m`` of the model's MACs, removing classes in global
  score order;
* ``lossless=true`` — remove only classes that are provably zero in the input model.
* ``heads=h`` — remove ``floor(h * n)`` of the ``n`` heads of each attention (groups whose
  classes are attention heads, see :mod:`graphprune.attention_rules`), whatever ``ratio``
  or ``macs`` decide for the other groups; without ``heads`` attention heads are pruned
  like any other group.  ``heads=0`` keeps every head.

Data-driven criteria (``criterion=kl``, ``criterion=taylor``; see
:mod:`graphprune.training.criteria`) need calibration data, passed as
``gp.run(graph, pipeline, data=...)`` (CLI: ``--calibration FILE.npz``); without it the
pass refuses with :class:`PassOptionError`.  Their scores are comparable across groups,
so a global ranking uses them as they are (magnitude criteria are divided by their
group's mean first).

``round_to`` keeps each group's kept class count a multiple of N, ``min_keep`` keeps at
least that many classes per group, ``ignore`` names layers whose channels stay.

Rewrite: the projection zeroes every parameter slice of the removed classes (filters,
biases, norm scales, shifts and statistics, consumer columns, per-channel constants);
the rewrite deletes those slices and resizes the ops on the way, and equals the
projection exactly.

Refused: options out of range, and budgets that the prunable channels cannot meet.
Attention heads are channel classes of the head axis (:mod:`graphprune.attention_rules`):
they go whole, with their q/k/v rows and out-projection columns, and the reshapes' head
counts follow.  Channel slices, partial-channel adds and channel shuffles are offsets and
permutations (:mod:`graphprune.rules`, :mod:`graphprune.reshape_rules`); channels that no
op reads (dropped by a slice) are always removed.

Frozen (never pruned): model inputs and outputs, channels that reach an op without a
channel rule, normalisations across the channel axis (layer norm, so a transformer's
embedding), head dimensions, parameters shared by several ops.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Collection

import numpy as np

from graphprune.channels import channel_projection, kept_indices, provably_zero_classes, remove_channels, unread_classes
from graphprune.coupling import CouplingAnalysis, PruningGroup, analyse
from graphprune.graph import Graph, Port
from graphprune.importance import CRITERIA, Importance, get_importance, needs_data
from graphprune.pass_api import BudgetError, Pass, PassOptionError, PassResult, register_pass
from graphprune.profile import stage
from graphprune.search import MacCounter

__all__ = ["PruneChannels"]

logger = logging.getLogger(__name__)


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important channel classes of every pruning group.

    Options:
        ratio: fraction of each group's prunable channel classes to remove, in [0, 1)
            (with scope=global: of all prunable classes).
        macs: keep at most this fraction of the model's MACs, in (0, 1]; classes go in
            global score order.
        scope: `group` (ratio per group) or `global` (one ranking over all groups).
        criterion: channel score: l1, l2, bn_scale, or kl / taylor (need calibration data).
        round_to: keep a multiple of this many classes per group.
        min_keep: keep at least this many classes per group.
        ignore: layers whose channels stay (node names, module paths such as `fc` or
            `layer1.0.conv1`, or module prefixes; `;`-separated on the command line).
        lossless: remove only channels that are provably zero (output unchanged).
        heads: fraction of each attention's heads to remove, in [0, 1), whatever ratio or
            macs decide for the other groups (heads=0 keeps every head).
    """

    name = "prune-channels"
    uses_data: ClassVar[bool] = True
    ratio: float | None = None
    macs: float | None = None
    scope: str = "group"
    criterion: str = "l1"
    round_to: int = 1
    min_keep: int = 1
    ignore: tuple[str, ...] = ()
    lossless: bool = False
    heads: float | None = None

    def validate(self) -> None:
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PassOptionError(f"{self.name}: ratio must be in [0, 1), got {self.ratio}")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise PassOptionError(f"{self.name}: macs must be in (0, 1], got {self.macs}")
        if self.ratio is not None and self.macs is not None:
            raise PassOptionError(f"{self.name}: give ratio or macs, not both")
        if self.ratio is None and self.macs is None and self.heads is None and not self.lossless:
            raise PassOptionError(f"{self.name}: needs ratio=, macs=, heads= or lossless=true")
        if self.heads is not None and not 0.0 <= self.heads < 1.0:
            raise PassOptionError(f"{self.name}: heads must be in [0, 1), got {self.heads}")
        if self.heads is not None and self.lossless:
            raise PassOptionError(f"{self.name}: heads= is a budget; lossless=true removes only zero channels")
        if self.scope not in ("group", "global"):
            raise PassOptionError(f"{self.name}: scope must be `group` or `global`, got `{self.scope}`")
        if self.criterion not in CRITERIA:
            raise PassOptionError(f"{self.name}: unknown criterion `{self.criterion}` (known: {', '.join(sorted(CRITERIA))})")
        if self.round_to < 1 or self.min_keep < 1:
            raise PassOptionError(f"{self.name}: round_to and min_keep must be at least 1")

    def requires_data(self, data: Any) -> None:
        if data is None and not self.lossless and needs_data(self.criterion):
            raise PassOptionError(
                f"{self.name}: criterion `{self.criterion}` needs calibration data: "
                "gp.run(graph, pipeline, data=batch_or_loader), or --calibration FILE.npz on the command line"
            )

    # ------------------------------------------------------------------ call
    def call(self, graph: Graph, data: Any = None) -> PassResult:
        analysis = analyse(graph, ignore=self.ignore)
        keep = self.decide(graph, analysis, data)
        keep = {gid: k for gid, k in keep.items() if not k.all()}
        result = self._rewrite(graph, analysis, keep)
        if not keep:
            result.no_change = _why_nothing(graph, analysis, self.lossless)
        return result

    def _rewrite(self, graph: Graph, analysis: CouplingAnalysis, keep: dict[int, np.ndarray]) -> PassResult:
        """Remove the classes ``keep`` drops (per group id) from a copy of ``graph``.  The
        result's decision units are the groups; ``redo(frozen)`` rewrites again without the
        frozen groups (same decision for the others)."""
        with stage("rewrite"):
            projection = channel_projection(graph, analysis, keep)
        work = graph.copy()
        with stage("rewrite"):
            removed = remove_channels(work, analysis, keep) if keep else 0
        records = self._records(analysis, keep)
        logger.info("prune-channels: removed %d channels in %d groups", removed, len(keep))
        result = PassResult(work, bool(removed), graph, projection, records)
        groups = {g.id: g for g in analysis.groups}
        result.units = {_unit(gid): f"{_unit(gid)} {_layers(groups[gid])}" for gid in keep}

        def redo(frozen: Collection[str]) -> PassResult:
            return self._rewrite(graph, analysis, {gid: k for gid, k in keep.items() if _unit(gid) not in frozen})

        result.redo = redo
        return result

    def _records(self, analysis: CouplingAnalysis, keep: dict[int, np.ndarray]) -> list[dict]:
        out = []
        for g in analysis.groups:
            if g.id not in keep:
                continue
            kept = kept_indices(g, keep[g.id])
            out.append({
                "group": g.id,
                "heads": g.heads,
                "classes": g.n_classes,
                "kept_classes": int(keep[g.id].sum()),
                "kept": {f"{p.value}:{p.axis}": idx.tolist() for p, idx in kept.items()},
            })
        return out

    # ---------------------------------------------------------------- decide
    def decide(self, graph: Graph, analysis: CouplingAnalysis, data: Any = None) -> dict[int, np.ndarray]:
        """Per group, a keep mask over its channel classes; every port keeps a channel."""
        groups = {g.id: g for g in analysis.groups}
        if self.heads is None:
            keep = self._decide(graph, analysis, data)
        else:
            head, rest = [g for g in analysis.groups if g.heads], [g for g in analysis.groups if not g.heads]
            keep = self._ratio_keep(graph, head, self.heads, data)
            if self.ratio is not None or self.macs is not None:
                keep.update(self._decide(graph, CouplingAnalysis(rest, analysis.graph_nx), data))
        for g in analysis.groups:  # channels nothing reads go whatever the budget
            unread = unread_classes(g)
            if unread.any():
                keep[g.id] = keep.get(g.id, np.ones(g.n_classes, bool)) & ~unread
        return {gid: _keep_every_port(groups[gid], k) for gid, k in keep.items()}

    def importance(self, data: Any = None) -> Importance:
        """The score function of ``criterion`` (data-driven ones on ``data``)."""
        return get_importance(self.criterion, data)

    def _decide(self, graph: Graph, analysis: CouplingAnalysis, data: Any = None) -> dict[int, np.ndarray]:
        if self.lossless:
            keep = {}
            for g in analysis.groups:
                if g.prunable.any():
                    k = ~provably_zero_classes(graph, g)
                    keep[g.id] = self._finish(g, k, np.nonzero(~k)[0].tolist())
            return keep
        score_fn = self.importance(data)
        with stage("scoring"):
            scores = {g.id: score_fn(graph, g) for g in analysis.groups if g.prunable.any()}
        groups = {g.id: g for g in analysis.groups}
        normalise = not getattr(score_fn, "comparable", False)
        if self.macs is not None:
            with stage("search"):
                return self._decide_macs(graph, analysis, scores, normalise)
        if self.scope == "global":
            order = self._global_order(groups, scores, normalise)
            total = sum(int(groups[gid].prunable.sum()) for gid in scores)
            return self._cut(groups, order, math.floor(self.ratio * total))  # type: ignore[operator]
        return self._ratio_keep(graph, [groups[gid] for gid in scores], self.ratio, data, scores)  # type: ignore[arg-type]

    def _ratio_keep(self, graph: Graph, groups: list[PruningGroup], ratio: float, data: Any = None,
                    scores: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Per group, remove the ``floor(ratio * n)`` lowest-scoring of its n prunable classes."""
        keep = {}
        for g in groups:
            if not g.prunable.any():
                continue
            s = scores[g.id] if scores is not None else self.importance(data)(graph, g)
            n_remove = self._allowed(g, math.floor(ratio * int(g.prunable.sum())))
            k = np.ones(g.n_classes, bool)
            cand = np.nonzero(g.prunable)[0]
            removed = cand[np.argsort(s[cand], kind="stable")[:n_remove]]
            k[removed] = False
            keep[g.id] = self._finish(g, k, removed.tolist())
        return keep

    def _allowed(self, g: PruningGroup, n_remove: int) -> int:
        """Clamp a removal count by min_keep and round the kept count to round_to."""
        n_remove = min(n_remove, int(g.prunable.sum()), g.n_classes - self.min_keep)
        kept = g.n_classes - max(n_remove, 0)
        if self.round_to > 1:
            kept = min(g.n_classes, int(math.ceil(kept / self.round_to) * self.round_to))
        return max(g.n_classes - kept, 0)

    def _global_order(
        self, groups: dict[int, PruningGroup], scores: dict[int, np.ndarray], normalise: bool = True
    ) -> list[tuple[int, int]]:
        """All prunable (group, class) pairs, least important first (scores divided by
        their group's mean unless the criterion's scores are comparable across groups)."""
        items = []
        for gid, s in scores.items():
            g = groups[gid]
            cand = np.nonzero(g.prunable)[0]
            mean = float(s[cand].mean()) if len(cand) and normalise else 1.0
            norm = s / (mean if mean > 0 else 1.0)
            items.extend((float(norm[c]), gid, int(c)) for c in cand)
        items.sort()
        return [(gid, c) for _, gid, c in items]

    def _cut(self, groups: dict[int, PruningGroup], order: list[tuple[int, int]], n: int) -> dict[int, np.ndarray]:
        """Remove the first ``n`` of ``order``, respecting min_keep and round_to per group."""
        wanted: dict[int, list[int]] = {}
        for gid, c in order[:n]:
            wanted.setdefault(gid, []).append(c)
        keep = {}
        for gid, cls in wanted.items():
            g = groups[gid]
            allowed = self._allowed(g, len(cls))
            k = np.ones(g.n_classes, bool)
            k[cls[:allowed]] = False
            keep[gid] = self._finish(g, k, cls[:allowed])
        return keep

    def _finish(self, g: PruningGroup, keep: np.ndarray, removed: list[int]) -> np.ndarray:
        """Restore a class in every port that would lose all its channels, then, if that
        broke ``round_to``, restore the last-removed (most important) classes until the
        kept count is a multiple of ``round_to`` again (or the whole group)."""
        keep = _keep_every_port(g, keep)
        if self.round_to > 1:
            target = min(g.n_classes, int(math.ceil(int(keep.sum()) / self.round_to) * self.round_to))
            for c in reversed(removed):
                if int(keep.sum()) >= target:
                    break
                keep[c] = True
        return keep

    def _decide_macs(
        self, graph: Graph, analysis: CouplingAnalysis, scores: dict[int, np.ndarray], normalise: bool = True
    ) -> dict[int, np.ndarray]:
        groups = {g.id: g for g in analysis.groups}
        counter = MacCounter(graph, (p for g in analysis.groups for p in g.ports))
        base = counter.total
        target = self.macs * base  # type: ignore[operator]
        order = self._global_order(groups, scores, normalise)

        def macs_after(n: int) -> int:
            keep = self._cut(groups, order, n)
            return counter.macs(_sizes(groups, keep))

        floor_macs = macs_after(len(order))
        if floor_macs > target:
            raise BudgetError(
                f"{self.name}: cannot reach macs={self.macs}: removing every prunable channel leaves "
                f"{floor_macs / base:.3f} of the MACs ({floor_macs:,} of {base:,}); the rest is frozen "
                "or kept by min_keep (see `graphprune inspect`)"
            )
        lo, hi = 0, len(order)  # smallest n with macs_after(n) <= target
        while lo < hi:
            mid = (lo + hi) // 2
            if macs_after(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        return self._cut(groups, order, lo)


def _unit(gid: int) -> str:
    return f"group {gid}"


def _layers(group: PruningGroup) -> str:
    """``[conv1, bn1, conv2 (+3)]``: the layers whose parameters the group slices."""
    text = group.describe()
    return text[text.index("["):]


def _why_nothing(graph: Graph, analysis: CouplingAnalysis, lossless: bool) -> str:
    """Why no channel was removed: no group, every group frozen (with the commonest
    reasons), or (lossless) no channel provably zero, naming the constant channels (zero
    filter, nonzero bias) that lossless cannot remove."""
    if not analysis.groups:
        return "no pruning groups (no conv or linear produces channels)"
    if not any(g.prunable.any() for g in analysis.groups):
        counts = Counter(r for g in analysis.groups for r in g.reasons.values())
        main = "; ".join(f"{r} ({n}x)" for r, n in counts.most_common(3))
        return f"every group is frozen ({len(analysis.groups)} groups): {main}"
    if lossless:
        constant = _constant_channels(graph, analysis)
        if constant:
            return (f"no prunable channel is zero; {constant} channels have an all-zero filter but a nonzero bias, "
                    "so they output a constant, not zero (a batchnorm folded after zeroed conv weights gives "
                    "bias' = beta - mean * gamma / sqrt(var + eps)): zero the batchnorm's scale and shift instead, "
                    "or prune them with a ratio")
        return "no prunable channel is zero (lossless removes only channels that are provably zero)"
    return "the target removes no channel (ratio too small for the groups, or min_keep/round_to keep them)"


def _constant_channels(graph: Graph, analysis: CouplingAnalysis) -> int:
    """How many prunable produced channels have an all-zero weight slice and a nonzero bias."""
    count = 0
    for g in analysis.groups:
        for port, members in g.members.items():
            for m in members:
                if m.coupling.role != "produce" or "bias" not in m.node.params:
                    continue
                axes = dict(m.coupling.slices)
                w, b = graph.node_param(m.node, "weight"), graph.node_param(m.node, "bias")
                if w is None or b is None or "weight" not in axes:
                    continue
                w = np.moveaxis(np.asarray(w), axes["weight"], 0).reshape(g.sizes[port], -1)
                zero_filter = (w == 0).all(1) & (np.asarray(b).reshape(-1) != 0) & g.prunable[g.class_of[port]]
                count += int(zero_filter.sum())
    return count


def _keep_every_port(group: PruningGroup, keep: np.ndarray) -> np.ndarray:
    """Restore one class in any port that would lose all its channels (a concat input, a
    branch): an empty tensor is not a pruned layer but a deleted one."""
    keep = keep.copy()
    for port in group.ports:
        cls = group.class_of[port]
        if not keep[cls].any():
            keep[cls[0]] = True
    return keep


def _sizes(groups: dict[int, PruningGroup], keep: dict[int, np.ndarray]) -> dict[Port, int]:
    sizes = {}
    for gid, k in keep.items():
        for port, idx in kept_indices(groups[gid], k).items():
            sizes[port] = len(idx)
    return sizes
