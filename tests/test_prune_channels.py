"""prune-channels: exactness, targets, lossless removal, and refusals."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import assert_rel_close, check_pass


@pytest.fixture(scope="module")
def sample_graph() -> gp.Graph:
    return gp.trace(sample_net(), sample_input())


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.c2(y))
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.fc(y.view(y.size(0), -1))


def chain_graph() -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(Chain()).eval(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("opts", [
    "ratio=0.3", "ratio=0.5,criterion=l2", "ratio=0.5,criterion=bn_scale", "ratio=0.4,scope=global",
    "macs=0.5", "ratio=0.5,round_to=4", "ratio=0.9,min_keep=3",
])
def test_sample_net_exact(sample_graph: gp.Graph, opts: str) -> None:
    check_pass(sample_graph, f"prune-channels{{{opts}}}")


def test_chain_exact_and_structural() -> None:
    g = chain_graph()
    r = check_pass(g, "prune-channels{ratio=0.5}")
    shapes = {n.label: r.graph.param(n.params["weight"]).shape for n in r.graph.nodes if "weight" in n.params}
    assert shapes["c1"][0] == 4 and shapes["c2"] == (4, 4, 3, 3)
    assert shapes["fc"] == (5, 4 * 16)  # flatten -> linear: 16 features per kept channel
    assert shapes["b1"] == (4,)


def test_residual_stream_keeps_same_channels(sample_graph: gp.Graph) -> None:
    r = check_pass(sample_graph, "prune-channels{ratio=0.5}")
    stream = ["stem.0", "stage1.0.conv2", "stage1.1.conv2"]
    kept = [r.graph.param(f"{name}.weight").shape[0] for name in stream]
    assert len(set(kept)) == 1 and kept[0] < 16
    analysis = gp.analyse(sample_graph)
    group = analysis.group_of(gp.Port(sample_graph.find("stem.0").outputs[0], 1))
    labels = {m.node.label for ms in group.members.values() for m in ms}
    assert {"stem.0", "stage1.0.conv2", "stage1.1.conv2", "stage1.1.se.fc2"} <= labels


def test_macs_budget_met_not_overshot(sample_graph: gp.Graph) -> None:
    base = gp.graph_cost(sample_graph).macs
    for target in (0.8, 0.5, 0.3):
        r = gp.get_pass("prune-channels")(macs=target)(sample_graph)
        ratio = gp.graph_cost(r.graph).macs / base
        assert ratio <= target
        assert ratio > target - 0.15, "budget search removed far more than needed"


def test_ratio_zero_changes_nothing(sample_graph: gp.Graph) -> None:
    check_pass(sample_graph, "prune-channels{ratio=0}", expect_modified=False)


def test_ignore_keeps_layer(sample_graph: gp.Graph) -> None:
    r = check_pass(sample_graph, "prune-channels{ratio=0.5,ignore=branch_a;stage1.1.se.fc1}")
    assert r.graph.param("branch_a.weight").shape[0] == 16
    assert r.graph.param("stage1.1.se.fc1.weight").shape[0] == 4


def test_grouped_conv_loses_whole_groups(sample_graph: gp.Graph) -> None:
    r = check_pass(sample_graph, "prune-channels{ratio=0.5}")
    conv = r.graph.find("stage2.1.conv2")
    assert conv.attrs["groups"] < 4 and r.graph.param("stage2.1.conv2.weight").shape[1] == 8


def test_depthwise_stays_depthwise(sample_graph: gp.Graph) -> None:
    r = check_pass(sample_graph, "prune-channels{ratio=0.5}")
    dw = r.graph.find("dw.0")
    assert dw.attrs["groups"] == r.graph.param("dw.0.weight").shape[0] < 32


# ------------------------------------------------------------------ lossless
def plant_zero_channels(model: nn.Module) -> nn.Module:
    """Zero some filters (weight and bias) and BN scale+shift in several groups."""
    with torch.no_grad():
        model.stage1[0].conv1.weight[[1, 5]] = 0          # zeroed filters, BN kills the rest below
        model.stage1[0].bn1.weight[[1, 5]] = 0
        model.stage1[0].bn1.bias[[1, 5]] = 0
        model.stage2[0].bn1.weight[[0, 7, 9]] = 0         # a normalisation with zero scale and shift
        model.stage2[0].bn1.bias[[0, 7, 9]] = 0
        model.fc1.weight[[3, 4]] = 0                      # zero rows and bias of a linear
        model.fc1.bias[[3, 4]] = 0
    return model


def test_lossless_removes_planted_zeros() -> None:
    model = plant_zero_channels(sample_net())
    g = gp.trace(model, sample_input())
    r = check_pass(g, "prune-channels{lossless=true}")
    assert r.graph.param("stage1.0.conv1.weight").shape[0] == 14
    assert r.graph.param("stage2.0.conv1.weight").shape[0] == 29
    assert r.graph.param("fc1.weight").shape[0] == 62
    assert gp.graph_cost(r.graph).macs < gp.graph_cost(g).macs
    out = r.graph.to_module()(sample_input())
    assert_rel_close(out, model(sample_input()))


def test_lossless_keeps_nonzero_shift() -> None:
    """A zero filter followed by a BN with a non-zero shift is not a zero channel."""
    model = sample_net()
    with torch.no_grad():
        model.stage1[0].conv1.weight[2] = 0
    g = gp.trace(model, sample_input())
    check_pass(g, "prune-channels{lossless=true}", expect_modified=False)


def test_lossless_on_dense_model_is_unchanged(sample_graph: gp.Graph) -> None:
    check_pass(sample_graph, "prune-channels{lossless=true}", expect_modified=False)


# ------------------------------------------------------------------- refusals
@pytest.mark.parametrize("spec, message", [
    ("prune-channels{ratio=1.0}", "ratio must be in [0, 1)"),
    ("prune-channels{ratio=-0.1}", "ratio must be in [0, 1)"),
    ("prune-channels{macs=0}", "macs must be in (0, 1]"),
    ("prune-channels", "needs ratio="),
    ("prune-channels{ratio=0.2,macs=0.5}", "not both"),
    ("prune-channels{ratio=abc}", "cannot take `abc`"),
    ("prune-channels{criterion=magic,ratio=0.2}", "unknown criterion"),
    ("prune-channels{speed=2}", "unknown option `speed`"),
    ("prune-everything", "unknown pass `prune-everything`"),
])
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(gp.PassOptionError, match=re.escape(message)):
        gp.parse_pipeline(spec)


def test_impossible_budget(sample_graph: gp.Graph) -> None:
    with pytest.raises(gp.BudgetError, match="cannot reach macs=0.001") as info:
        gp.run(sample_graph, "prune-channels{macs=0.001}")
    found = re.search(r"leaves ([0-9.]+) of the MACs \(([0-9,]+) of ([0-9,]+)\); the rest is frozen or kept by min_keep",
                      str(info.value))
    assert found, str(info.value)
    floor, base = (int(found.group(i).replace(",", "")) for i in (2, 3))
    assert base == gp.graph_cost(sample_graph).macs and 0 < floor < base
    assert float(found.group(1)) == pytest.approx(floor / base, abs=5e-4)


def test_macs_budget_of_one_removes_nothing(sample_graph: gp.Graph) -> None:
    check_pass(sample_graph, "prune-channels{macs=1.0}", expect_modified=False)


# ------------------------------------------------------------ kept counts
@pytest.mark.parametrize("opts, kept", [
    ("ratio=0.75", 2),                              # 8 channels, floor(6.0) removed
    ("ratio=0.75,round_to=4", 4),                   # 2 kept, rounded up to 4
    ("ratio=0.75,round_to=3", 3),                   # 2 kept, rounded up to 3
    ("ratio=0.3,round_to=4", 8),                    # 6 kept, rounded up to 8: nothing removed
    ("ratio=0.9,min_keep=3", 3),                    # floor(7.2) = 7 would leave 1
    ("ratio=0.9,min_keep=3,round_to=2", 4),         # min_keep 3, then rounded up to 4
    ("ratio=0.75,scope=global,round_to=4", 4),      # 12 of 16 removed: at most 4 left per group
    ("ratio=0.9,scope=global,min_keep=3", 3),       # 14 of 16 removed: at most 2 left per group
])
def test_kept_counts_under_round_to_and_min_keep(opts: str, kept: int) -> None:
    """Both hidden groups of Chain have 8 channels (c1 with b1, c2 with the linear's inputs)."""
    g = chain_graph()
    r = check_pass(g, f"prune-channels{{{opts}}}", expect_modified=kept < 8)
    assert r.graph.param("c1.weight").shape[0] == kept
    assert r.graph.param("c2.weight").shape[0] == kept
    assert r.graph.param("fc.weight").shape[1] == kept * 16
    assert all(rec["kept_classes"] == kept for rec in r.records)


@pytest.mark.parametrize("opts", ["macs=0.5", "macs=0.3", "ratio=0.9", "ratio=0.9,scope=global"])
def test_round_to_holds_in_every_group(sample_graph: gp.Graph, opts: str) -> None:
    """Also where a concat input would lose all its channels and gets one back (the
    `branch_a`/`branch_b` concat): the group's kept count is still a multiple of 4."""
    r = check_pass(sample_graph, f"prune-channels{{{opts},round_to=4}}")
    assert r.records
    for rec in r.records:
        assert rec["kept_classes"] % 4 == 0 or rec["kept_classes"] == rec["classes"], rec
    if opts.startswith("macs"):
        target = float(opts.split("=")[1])
        assert gp.graph_cost(r.graph).macs <= target * gp.graph_cost(sample_graph).macs


def test_sample_net_round_to_and_min_keep_per_group(sample_graph: gp.Graph) -> None:
    analysis = gp.analyse(sample_graph)
    sizes = {g.id: g.n_classes for g in analysis.groups if g.prunable.all() and g.n_classes >= 8}
    r = gp.get_pass("prune-channels")(ratio=0.9, round_to=4, min_keep=5)(sample_graph)
    kept = {rec["group"]: rec["kept_classes"] for rec in r.records}
    assert sizes and set(sizes) <= set(kept)
    for gid, n in sizes.items():
        assert kept[gid] % 4 == 0 and kept[gid] >= 5, (gid, n, kept[gid])
        assert kept[gid] == min(n, 8), (gid, n, kept[gid])  # floor(0.9 n) leaves < 5, rounded to 8


def test_global_scope_ranks_classes_by_group_normalised_scores() -> None:
    """scope=global: each group's scores are divided by their mean over its prunable
    classes, then the lowest of all groups go first (per-group min_keep still holds)."""
    from test_importance import build, expected_hidden, expected_stream, kept_channels

    model, graph = build()  # a 4-channel stream (two producers) and a 6-channel hidden group
    stream, hidden = expected_stream(1, model), expected_hidden(1, model)
    items = sorted([(v / stream.mean(), "c0", i) for i, v in enumerate(stream)]
                   + [(v / hidden.mean(), "ch", i) for i, v in enumerate(hidden)])
    removed = {"c0": set(), "ch": set()}
    for _, label, i in items[:5]:  # floor(0.5 * 10)
        removed[label].add(i)
    want = {"c0": set(range(4)) - removed["c0"], "ch": set(range(6)) - removed["ch"]}
    assert all(0 < len(k) for k in want.values()) and len(removed["c0"]) < 4
    # unnormalised scores (the stream's sums of two members dominate) would remove other channels
    raw = sorted([(v, "c0", i) for i, v in enumerate(stream)] + [(v, "ch", i) for i, v in enumerate(hidden)])
    assert {(label, i) for _, label, i in raw[:5]} != {(label, i) for _, label, i in items[:5]}
    r = gp.run(graph, "prune-channels{ratio=0.5,scope=global}").results[0]
    assert {label: kept_channels(r, graph, label) for label in ("c0", "ch")} == want
