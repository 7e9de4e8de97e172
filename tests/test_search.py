"""Incremental MAC counting (graphprune.search): equal to a full re-count for every
assignment of port sizes, and the MAC-budget decision it drives is the one a full
re-count per bisection step makes."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.samples.models import randomize_, sample_input, sample_net
from graphprune.search import MacCounter


class Mixed(nn.Module):
    """Plain, grouped, depthwise and transposed convs, a matmul-free linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.upg = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.dw(self.g(y)) + y)
        y = self.upg(self.up(y))
        return self.fc(y.mean((2, 3)))


class Attn(nn.Module):
    """q/k/v projections, 4 heads of 6, scaled dot-product attention, out-projection:
    the attention node's MACs are not a product of port sizes of one input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(24, 24) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, 4, 6).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, 24))


def graphs() -> list[gp.Graph]:
    torch.manual_seed(0)
    return [gp.trace(sample_net(), sample_input(), capture="fx"),
            gp.trace(randomize_(Mixed()).eval(), torch.randn(2, 3, 8, 8), capture="fx"),
            gp.trace(randomize_(Attn()).eval(), torch.randn(2, 5, 24), capture="export")]


def test_attention_graph_has_an_attention_node_with_macs() -> None:
    graph = graphs()[2]
    (att,) = [n for n in graph.nodes if n.kind == "attention"]
    assert gp.graph_cost(graph, with_params=False).per_node[att.label or att.name][0] == 2 * 4 * 5 * 5 * 12


@pytest.mark.parametrize("index", [0, 1, 2])
def test_counter_equals_full_recount(index: int) -> None:
    graph = graphs()[index]
    analysis = gp.analyse(graph)
    ports = [p for g in analysis.groups for p in g.ports]
    counter = MacCounter(graph, ports)
    assert counter.total == gp.graph_cost(graph, with_params=False).macs
    rng = np.random.default_rng(0)
    for step in range(40):  # random assignments, each priced from the previous one's state
        chosen = rng.choice(len(ports), size=rng.integers(0, len(ports) + 1), replace=False)
        sizes = {ports[i]: int(rng.integers(1, counter.original[ports[i]] + 1)) for i in chosen}
        assert counter.macs(sizes) == gp.graph_cost(graph, sizes, with_params=False).macs, step
    assert counter.macs({}) == gp.graph_cost(graph, with_params=False).macs


class _FullRecount:
    """The old way: price every candidate by re-costing the whole graph."""

    def __init__(self, graph: gp.Graph, ports: object) -> None:
        self.graph = graph
        self.total = gp.graph_cost(graph, with_params=False).macs

    def macs(self, sizes: dict) -> int:
        return gp.graph_cost(self.graph, sizes, with_params=False).macs


@pytest.mark.parametrize("budget", [0.3, 0.55, 0.8])
def test_budget_decision_same_as_full_recount(budget: float, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = graphs()[0]
    fast = gp.get_pass("prune-channels")(macs=budget)(graph)
    module = sys.modules[gp.get_pass("prune-channels").__module__]
    monkeypatch.setattr(module, "MacCounter", _FullRecount)
    slow = gp.get_pass("prune-channels")(macs=budget)(graph)
    assert fast.records == slow.records and fast.records
    after = gp.graph_cost(fast.graph, with_params=False).macs
    assert after <= budget * gp.graph_cost(graph, with_params=False).macs
