"""EPI: the indicator formula, the trigger step on a synthetic score sequence, and pruning
exactly the recorded sub-network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphprune as gp
from graphprune.training import EarlyPruningIndicator, architecture_distance, epi_indicator, fit

from test_importance_data import ResNetTiny, _randomise_bn


def test_indicator_formula() -> None:
    assert architecture_distance([4, 4], [4, 4]) == 0.0
    assert architecture_distance([6, 2], [2, 6]) == pytest.approx(8 / 16)
    assert epi_indicator([[4, 4]], window=1) is None
    assert epi_indicator([[6, 2], [4, 4]], window=1) == pytest.approx(1 - 4 / 16)
    hist = [[6, 2], [5, 3], [4, 4]]
    assert epi_indicator(hist, window=2) == pytest.approx(1 - (2 / 16 + 4 / 16) / 2)


class SyntheticScores:
    """Scores that change group preference on every call before ``stable_from`` and are
    fixed afterwards: the architecture settles at call ``stable_from``.  Scores are
    comparable across groups (no per-group normalisation), so the favoured group keeps
    more channels."""

    comparable = True

    def __init__(self, stable_from: int) -> None:
        self.calls = 0
        self.stable_from = stable_from
        self.seen: set[int] = set()

    def __call__(self, graph: gp.Graph, group: gp.PruningGroup) -> np.ndarray:
        if group.id in self.seen:  # a new step: every group is scored once per step
            self.seen.clear()
            self.calls += 1
        self.seen.add(group.id)
        step = self.calls
        rng = np.random.default_rng(100 + group.id)
        base = rng.random(group.n_classes) + 1.0
        if step < self.stable_from:  # favour one group, then the other
            base = base * (10.0 if (step + group.id) % 2 else 0.1)
            base = base + step * 0.01 * np.arange(group.n_classes)
        return base


def test_trigger_on_a_synthetic_score_sequence() -> None:
    torch.manual_seed(0)
    graph = gp.trace(_randomise_bn(ResNetTiny(c=8)), torch.randn(1, 3, 8, 8))
    scores = SyntheticScores(stable_from=4)
    epi = EarlyPruningIndicator(graph, budget=0.6, criterion=scores, window=2, threshold=0.999)
    fired = [epi.step() for _ in range(9)]
    archs = epi.history
    assert archs[3] != archs[4], "the test needs the architecture to move before it settles"
    assert all(a == archs[4] for a in archs[4:])
    # stable from step 4: the last window+1 = 3 architectures agree first at step 6
    assert fired == [False] * 6 + [True] * 3
    assert epi.triggered_at == 6
    assert epi.indicators[:2] == [None, None] and epi.indicators[6] == 1.0 and epi.indicators[5] < 1.0


def test_pruning_pass_applies_the_recorded_subnetwork() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny(c=8))
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))
    epi = EarlyPruningIndicator(model, budget=0.5, criterion="l1", window=1, threshold=0.0, example=x[:1])
    assert epi.step() is False  # no window yet
    fit(model, [(x, y)], epochs=2, lr=0.1)
    assert epi.step() is True  # threshold 0: fires as soon as the indicator is defined
    decision = {gid: m.copy() for gid, m in epi.decision.items()}
    fit(model, [(x, y)], epochs=3, lr=0.5)  # weights move on; the recorded decision must not
    graph = gp.trace(model, x[:1])
    result = gp.run(graph, epi.pruning_pass())
    assert gp.graph_cost(result.graph).macs <= 0.5 * gp.graph_cost(graph).macs
    kept = {r["group"]: r["kept_classes"] for r in result.results[0].records}
    for gid, mask in decision.items():
        assert kept.get(gid, len(mask)) == int(mask.sum())
    for r in result.results[0].records:
        port_key, kept_idx = next(iter(r["kept"].items()))
        group = gp.analyse(graph).groups[r["group"]]
        port = next(p for p in group.ports if f"{p.value}:{p.axis}" == port_key)
        assert sorted(kept_idx) == np.nonzero(decision[r["group"]][group.class_of[port]])[0].tolist()
    assert gp.compare(result.graph, result.results[0].reference()) <= 1e-5
    other = gp.trace(ResNetTiny(c=6).eval(), x[:1])
    with pytest.raises(gp.GraphError, match="recorded decision does not fit"):
        gp.run(other, epi.pruning_pass())
