"""Smaller check probes (graphprune.probe_size): the factor keeps a full window at every
conv, a wrong weight under any tap is still caught at the smaller size, and graphs that
fix a size are checked at the captured size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.probe_size import reduced_samples, shrink_factor
from graphprune.samples.models import randomize_
from graphprune.verify import check_exact


class Strided(nn.Module):
    """24x24 -> conv3x3 -> stride 2 (12x12) -> stride 2 (6x6) -> 3x3 conv -> pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c3(torch.relu(self.c2(y))))
        y = torch.relu(self.c4(y))
        return self.fc(y.mean((2, 3)))


class FixedSize(nn.Module):
    """A flatten into a linear layer: runs at the captured size only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).flatten(1))


def _graph(model: nn.Module, size: int) -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(model).eval(), torch.randn(2, 3, size, size), capture="fx")


def test_factor_keeps_a_full_window_at_every_conv() -> None:
    # inputs of the 3x3 convs: 24, 24, 12 and 6 pixels wide; 6 // 3 = 2 limits the factor
    assert shrink_factor(_graph(Strided(), 24)) == 2
    assert shrink_factor(_graph(Strided(), 48)) == 4
    assert shrink_factor(_graph(Strided(), 8)) == 1  # the last conv sees 2x2 < 3x3: no shrinking
    graph = _graph(Strided(), 24)
    small = reduced_samples(graph, [graph.random_inputs(0)])
    assert small is not None and tuple(small[0][0].shape) == (2, 3, 12, 12)  # batch and channels kept


def _corrupt_outer_tap(result: gp.PassResult, layer: str) -> None:
    """Add 1 to the top-left corner tap of every kept filter of ``layer`` in the rewritten
    graph (a tap that only reaches data at output positions away from the top-left border)."""
    g = result.graph
    key = g.find(layer).params["weight"]
    w = g.param(key).copy()
    w[:, :, 0, 0] += 1.0
    g.set_param(key, w)


def test_wrong_corner_tap_of_the_deepest_conv_is_caught_at_the_smaller_size() -> None:
    graph = _graph(Strided(), 24)
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    assert result.modified
    ok = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert ok.passed and ok.error <= 1e-5
    _corrupt_outer_tap(result, "c4")
    bad = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert not bad.passed and bad.error > 1e-3


def test_graph_that_fixes_its_size_is_checked_at_the_captured_size() -> None:
    graph = _graph(FixedSize(), 16)
    assert reduced_samples(graph, [graph.random_inputs(0)]) is not None  # the crop is offered...
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    check = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert check.passed  # ...fails to run, and the check falls back to 16x16
    _corrupt_outer_tap(result, "c1")
    assert not check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed


def test_export_graphs_are_not_shrunk() -> None:
    torch.manual_seed(0)
    graph = gp.trace(randomize_(Strided()).eval(), torch.randn(2, 3, 24, 24), capture="export")
    assert reduced_samples(graph, [graph.random_inputs(0)]) is None


def test_pipeline_verifies_on_small_probes_by_default() -> None:
    graph = _graph(Strided(), 24)
    seen: list[tuple[int, ...]] = []
    run = graph.frontend.__class__.run

    def recording(self, inputs):  # type: ignore[no-untyped-def]
        seen.append(tuple(inputs[0].shape))
        return run(self, inputs)

    try:
        graph.frontend.__class__.run = recording
        gp.run(graph, "prune-channels{ratio=0.5}")
        assert seen and all(s == (1, 3, 12, 12) or s == (2, 3, 12, 12) for s in seen), seen
        seen.clear()
        gp.run(graph, "prune-channels{ratio=0.5}", small_probes=False, probes=1)
        assert len(seen) == 2 and all(s[2:] == (24, 24) for s in seen), seen
    finally:
        graph.frontend.__class__.run = run


def test_probe_count_is_an_option() -> None:
    graph = _graph(Strided(), 24)

    with pytest.raises(gp.PassOptionError, match="probes must be at least 1"):
        gp.run(graph, "prune-channels{ratio=0.5}", probes=0)
    result = gp.run(graph, "prune-channels{ratio=0.5}", probes=3)
    assert result.checks[0] is not None and result.checks[0].samples == 3 and result.checks[0].passed
