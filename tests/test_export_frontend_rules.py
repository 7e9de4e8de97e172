"""Entries of the export frontend's aten table (graphprune/frontends/aten.py), one tiny
model per op: captured with torch.export, pruned, exact against the projected
reference, and smaller."""
from __future__ import annotations

import torch
import torch.nn as nn

import graphprune as gp

RTOL = 1e-5


class ExpandAsGate(nn.Module):
    """A squeeze-excitation gate spelled with ``expand_as`` (timm's ECA and SK blocks)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.conv2 = nn.Conv2d(c, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        y = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * y.expand_as(x))


def _prune(model: nn.Module, x: torch.Tensor) -> tuple[gp.Graph, gp.PipelineResult]:
    torch.manual_seed(0)
    graph = gp.trace(model.eval(), x, capture="export")
    return graph, gp.run(graph, "prune-channels{ratio=0.5}")


def test_expand_as_is_an_identity_of_its_first_input() -> None:
    torch.manual_seed(0)
    graph, result = _prune(ExpandAsGate(), torch.randn(2, 3, 8, 8))
    node = next(n for n in graph.nodes if n.target == "aten.expand_as")
    assert node.kind == "identity"
    reasons = " ".join(r for g in gp.analyse(graph).groups for r in g.reasons.values())
    assert "expand_as" not in reasons
    r = result.results[0]
    assert r.modified
    assert gp.compare(result.graph, r.reference()) <= RTOL
    after = gp.graph_cost(result.graph).macs
    assert after < gp.graph_cost(graph).macs
    # the gated stream itself lost channels: conv1's filters, fc2's filters and conv2's inputs together
    shapes = {k: tuple(result.graph.param(k).shape) for k in result.graph.param_keys()}
    assert shapes["conv1.weight"][0] == shapes["fc2.weight"][0] == shapes["conv2.weight"][1] < 16
