"""Check probes run channels-last on networks with grouped convs (at least a tenth:
probe_size.prefers_channels_last), fall back to the plain layout when the model's code
cannot take it, and still catch a wrong rewrite."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import graphprune as gp
from graphprune import probe_size
from graphprune.samples.models import randomize_
from graphprune.verify import _CropSearch, check_exact


class Depthwise(nn.Module):
    """Stem, then two depthwise-separable blocks: 2 of 5 convs grouped."""

    def __init__(self, view_after_stem: bool = False) -> None:
        super().__init__()
        self.view_after_stem = view_after_stem
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
        self.pw2 = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        if self.view_after_stem:  # a view of the conv output: fails on a channels-last tensor
            y = y.view(y.size(0), -1).view_as(y)
        y = torch.relu(self.pw1(torch.relu(self.dw1(y))))
        y = torch.relu(self.pw2(torch.relu(self.dw2(y))))
        return self.fc(y.mean((2, 3)))


class Dense(nn.Module):
    """Six convs, ``grouped`` of them with 2 groups."""

    def __init__(self, grouped: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2 if grouped >= 1 else 1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=2 if grouped >= 2 else 1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 8, 3, padding=1)
        self.c6 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in (self.c1, self.c2, self.c3, self.c4, self.c5, self.c6):
            x = torch.relu(c(x))
        return x.mean((2, 3))


def _graph(model: nn.Module) -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(model).eval(), torch.randn(2, 3, 32, 32))


def _layouts_seen(graph: gp.Graph) -> list[tuple[bool, bool]]:
    """Per recorded run of ``graph``: whether its probe was channels-last, and whether the run passed."""
    seen: list[tuple[bool, bool]] = []
    run = graph.frontend.run_with_shapes

    def recording(inputs: list[np.ndarray], values: set[str]) -> object:
        last = torch.from_numpy(inputs[0]).is_contiguous(memory_format=torch.channels_last) and \
            not inputs[0].flags.c_contiguous
        try:
            out = run(inputs, values)
        except Exception:
            seen.append((last, False))
            raise
        seen.append((last, True))
        return out

    graph.frontend.run_with_shapes = recording  # type: ignore[method-assign]
    return seen


def test_the_layout_follows_the_share_of_grouped_convs() -> None:
    assert probe_size.prefers_channels_last(_graph(Depthwise()))  # 2 of 5 convs grouped
    assert not probe_size.prefers_channels_last(_graph(Dense()))  # no grouped conv
    assert probe_size.prefers_channels_last(_graph(Dense(grouped=1)))  # 1 of 6: above a tenth
    arrays = probe_size.channels_last([np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5),
                                       np.zeros((2, 3), np.float32)])
    t = torch.from_numpy(arrays[0])
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert np.array_equal(arrays[0], np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5))
    assert arrays[1].flags.c_contiguous


def test_grouped_network_probes_run_channels_last_and_dense_ones_do_not() -> None:
    for model, want in ((Depthwise(), True), (Dense(), False)):
        graph = _graph(model)
        seen = _layouts_seen(graph)
        search = _CropSearch(graph, [[np.random.default_rng(0).standard_normal((2, 3, 32, 32), np.float32)]])
        assert search.attempt(2.0) is not None
        assert seen == [(want, True)]


def test_a_view_that_needs_the_plain_layout_falls_back_to_it() -> None:
    graph = _graph(Depthwise(view_after_stem=True))
    assert probe_size.prefers_channels_last(graph)
    seen = _layouts_seen(graph)
    search = _CropSearch(graph, [[np.random.default_rng(0).standard_normal((2, 3, 32, 32), np.float32)]])
    assert search.attempt(2.0) is not None and not search.channels_last
    assert seen == [(True, False), (False, True)]  # the channels-last run failed, the plain one passed
    assert search.attempt(4.0) is not None and seen[2:] == [(False, True)]


def test_a_wrong_depthwise_tap_is_caught_on_channels_last_probes() -> None:
    graph = _graph(Depthwise())
    result = gp.run(graph, "prune-channels{ratio=0.5}")
    pruned, reference = result.graph, result.results[0].reference()
    assert check_exact(pruned, reference).passed
    key = "dw2.weight"
    w = pruned.param(key).copy()
    w[1, 0, 2, 2] += 0.5 * float(np.abs(w).max())  # one corner tap of one channel
    pruned.set_param(key, w)
    check = check_exact(pruned, reference)
    assert not check.passed and check.error > 1e-3
