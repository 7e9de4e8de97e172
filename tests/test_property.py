"""Property-based test: random conv nets with residual adds, concats, grouped convs,
SE gates and flatten -> linear are pruned and stay exact against their reference, and
something is pruned whenever the ratio asks a stream known to be prunable to lose a channel
(`pytest --hypothesis-show-statistics` reports how often pruning happened)."""
from __future__ import annotations

import torch
import torch.nn as nn
import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.samples.models import randomize_
from graphprune.verify import relative_error

BLOCKS = ("conv", "residual", "concat", "grouped", "depthwise", "se")


class RandomNet(nn.Module):
    """A chain of randomly chosen blocks over a channel count that changes as it goes."""

    def __init__(self, blocks: list[tuple[str, int, int]], head: str) -> None:
        super().__init__()
        self.kinds = [b[0] for b in blocks]
        self.layers = nn.ModuleList()
        c = 3
        for kind, width, k in blocks:
            pad = k // 2
            if kind == "conv":
                self.layers.append(nn.Sequential(nn.Conv2d(c, width, k, padding=pad), nn.BatchNorm2d(width), nn.ReLU()))
                c = width
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, k, padding=pad, bias=False), nn.BatchNorm2d(c)))
            elif kind == "concat":
                self.layers.append(nn.ModuleList([nn.Conv2d(c, width, 1), nn.Conv2d(c, width + 2, k, padding=pad)]))
                c = 2 * width + 2
            elif kind == "grouped":
                g = 2
                c2 = c + (c % g)
                self.layers.append(nn.Sequential(nn.Conv2d(c, c2, 1), nn.Conv2d(c2, 2 * g, k, padding=pad, groups=g)))
                c = 2 * g
            elif kind == "depthwise":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, k, padding=pad, groups=c), nn.BatchNorm2d(c), nn.Hardswish()))
            elif kind == "se":
                self.layers.append(nn.Sequential(nn.Conv2d(c, max(c // 2, 1), 1), nn.ReLU(), nn.Conv2d(max(c // 2, 1), c, 1)))
        self.head = head
        self.fc = nn.Linear(c * (4 if head == "flatten" else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "residual":
                x = torch.relu(x + layer(x))
            elif kind == "concat":
                x = torch.cat([layer[0](x), layer[1](x)], 1)
            elif kind == "se":
                x = x * torch.sigmoid(layer(x.mean((2, 3), keepdim=True)))
            else:
                x = layer(x)
        if self.head == "flatten":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1)
        else:
            x = x.mean((2, 3))
        return self.fc(x)


block = st.tuples(st.sampled_from(BLOCKS), st.integers(2, 8), st.sampled_from([1, 3]))


def new_streams(blocks: list[tuple[str, int, int]]) -> list[int]:
    """Channel counts of the streams that ``conv`` and ``concat`` blocks create: each is
    a pruning group of that many classes that no rule freezes (it reaches neither the model
    input nor the output; residual adds, depthwise convs and SE gates keep its classes)."""
    return [w if kind == "conv" else 2 * w + 2 for kind, w, _ in blocks if kind in ("conv", "concat")]


def must_prune(blocks: list[tuple[str, int, int]], ratio: float) -> bool:
    """Whether ``ratio`` asks to remove at least one class of some stream known prunable
    (group scope: ``floor(ratio * n)`` of each group; global scope removes at least as many)."""
    return any(math.floor(ratio * n) >= 1 for n in new_streams(blocks))


def test_must_prune_reads_the_blocks() -> None:
    assert new_streams([("conv", 4, 3), ("residual", 4, 3), ("concat", 3, 1), ("se", 2, 1)]) == [4, 8]
    assert must_prune([("conv", 4, 3)], 0.25) and not must_prune([("conv", 4, 3)], 0.2)
    assert not must_prune([("residual", 8, 3), ("depthwise", 8, 3)], 0.8)  # input channels: frozen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(block, min_size=1, max_size=6),
    head=st.sampled_from(["flatten", "mean"]),
    ratio=st.floats(0.1, 0.8),
    scope=st.sampled_from(["group", "global"]),
    seed=st.integers(0, 2**16),
)
def test_random_nets_prune_exactly(blocks, head, ratio, scope, seed) -> None:
    torch.manual_seed(seed)
    model = randomize_(RandomNet(blocks, head), seed).eval()
    graph = gp.trace(model, torch.randn(2, 3, 8, 8))
    result = gp.get_pass("prune-channels")(ratio=ratio, scope=scope)(graph)
    err = gp.compare(result.graph, result.reference())
    assert err <= 1e-5, f"{blocks} {head}: error {err:.3g}"
    expected = must_prune(blocks, ratio)
    event(f"pruned: {result.modified}, a stream asked to lose a channel: {expected}")
    if expected:
        assert result.modified, f"{blocks} {head} ratio={ratio} scope={scope}: nothing was pruned"
    if result.modified:
        assert gp.graph_cost(result.graph).params < gp.graph_cost(graph).params
    # the emitted module runs and agrees with the graph
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        err_module = relative_error([result.graph.to_module().eval()(x)], result.graph.run(x))
    assert err_module <= 1e-5, f"{blocks} {head}: emitted module differs by {err_module:.3g}"
