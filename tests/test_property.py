"""Property-based test: random conv nets with residual adds, concats, grouped convs,
SE gates and flatten -> linear are pruned and stay exact against their reference."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.samples.models import randomize_

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
    if result.modified:
        assert gp.graph_cost(result.graph).params < gp.graph_cost(graph).params
    # the emitted module runs and agrees with the graph
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(result.graph.to_module().eval()(x), result.graph.run(x)[0])
