"""SMOF gates: nesting, exact zeros after thresholding, penalty weights, and end to end
through ``shrink-kernels{lossless=true}`` and ``prune-channels{lossless=true}``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import graphprune as gp
from graphprune.training.smof import ChannelGate, RingGate, SMOFGates, smof_gates, smof_penalty, smof_threshold


class Net(nn.Module):
    """conv5x5-bn-relu, conv3x3-bn-relu, conv3x3-bn added to it (residual), conv3x3 with
    bias, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv2b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2b = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = torch.relu(self.bn2b(self.conv2b(y)) + y)
        y = torch.relu(self.conv3(y))
        return self.fc(y.mean((2, 3)))


def test_nested_ring_gates_cannot_drop_inner_ring_alone() -> None:
    gate = RingGate((5, 5))
    w = torch.ones(1, 1, 5, 5)
    with torch.no_grad():
        gate.gates.copy_(torch.tensor([0.0, 1.0]))  # inner gate 0, outer gate 1
    out = gate(w)[0, 0]
    assert out[2, 2] == 1.0
    assert (out[1:4, 1:4].sum() - out[2, 2]) == 0.0  # ring 1 zero
    assert float(out.detach().abs().sum()) == 1.0  # ... and ring 2 outside it as well: only the centre stays
    with torch.no_grad():
        gate.gates.copy_(torch.tensor([1.0, 0.0]))  # outer alone
    out = gate(w)[0, 0]
    assert float(out.detach()[1:4, 1:4].sum()) == 9.0 and float(out.detach().sum()) == 9.0


def test_per_axis_ring_gates() -> None:
    gate = RingGate((3, 5), per_axis=True)
    with torch.no_grad():
        gate.gates.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # height ring 1; width ring 2
    m = gate.multiplier()
    assert m.shape == (3, 5)
    expected = torch.zeros(3, 5)
    expected[1, 1:4] = 1.0  # middle row, inner three columns
    assert torch.equal(m, expected)
    with pytest.raises(ValueError):
        RingGate((3, 5))


def test_threshold_gives_exact_zeros_and_bakes() -> None:
    torch.manual_seed(0)
    model = Net()
    SMOFGates(model, torch.randn(1, 3, 12, 12))
    ring = model.conv1.parametrizations.weight[0]
    chan = model.bn1.parametrizations.weight[0]
    assert isinstance(ring, RingGate) and isinstance(chan, ChannelGate)
    with torch.no_grad():
        ring.gates.copy_(torch.tensor([0.9, 1e-3]))
        chan.gates[:3] = 1e-4
    counts = smof_threshold(model, 1e-2)
    assert counts["rings"] >= 1 and counts["channels"] >= 3
    assert not parametrize.is_parametrized(model.conv1) and not parametrize.is_parametrized(model.bn1)
    w = model.conv1.weight
    assert torch.count_nonzero(w[:, :, 0, :]) == 0 and torch.count_nonzero(w[:, :, :, 4]) == 0
    assert torch.count_nonzero(w[:, :, 1:4, 1:4]) > 0
    assert torch.count_nonzero(model.bn1.weight[:3]) == 0 and torch.count_nonzero(model.bn1.bias[:3]) == 0


def test_channel_gates_only_where_channels_are_removable() -> None:
    model = Net()
    gates = SMOFGates(model, torch.randn(1, 3, 12, 12))
    # conv2 and conv2b feed the residual add: their channels are tied together
    assert set(gates.channel_gates) == {"conv1", "conv3"}
    assert "residual" in gates.skipped["conv2"] and "conv2b" in gates.skipped
    # conv3 has no norm after it: its gate sits on its weight and bias
    assert isinstance(model.conv3.parametrizations.bias[0], ChannelGate)


def test_penalty_weights_are_mac_savings() -> None:
    model = Net()
    x = torch.randn(1, 3, 12, 12)
    macs = gp.graph_cost(gp.trace(model, x)).macs
    gates = SMOFGates(model, x, channels=False)
    ring = gates.ring_gates["conv1"]
    positions = 12 * 12
    expected = torch.tensor([positions * 12 * 3 * (9 - 1), positions * 12 * 3 * (25 - 9)], dtype=torch.float32) / macs
    torch.testing.assert_close(ring.cost, expected)
    p = smof_penalty(model)
    total = sum(float(g.cost.sum()) for g in gates.ring_gates.values())
    assert abs(float(p.detach()) - total) < 1e-6
    assert len(smof_gates(model)) == 4


def test_latency_weights_measured(tmp_path) -> None:
    model = Net()
    cache = str(tmp_path / "lat.json")
    gates = SMOFGates(model, torch.randn(1, 3, 12, 12), weight="latency", latency_cache=cache, latency_channel_step=4)
    assert (tmp_path / "lat.json").exists()
    assert all(float(g.cost.sum()) >= 0 for g in gates.ring_gates.values())
    assert float(gates.ring_gates["conv1"].cost.sum()) > 0


@pytest.mark.parametrize("per_axis", [False, True])
def test_end_to_end_lossless(per_axis: bool) -> None:
    torch.manual_seed(3)
    model = Net()
    x = torch.randn(2, 3, 12, 12)
    SMOFGates(model, x, per_axis=per_axis)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        xb, yb = torch.randn(8, 3, 12, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(xb), yb) + 0.1 * smof_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # stand-in for a long training run: some gates reach ~0
        model.conv1.parametrizations.weight[0].gates.view(-1)[-1] = 1e-4
        model.bn1.parametrizations.weight[0].gates[:4] = 1e-4
        model.conv3.parametrizations.weight[-1].gates[:5] = -1e-4
    smof_threshold(model, 1e-2)
    model.eval()
    graph = gp.trace(model, x)
    result = gp.run(graph, f"shrink-kernels{{lossless=true,per_axis={str(per_axis).lower()}}},prune-channels{{lossless=true}}")
    assert all(r.modified for r in result.results)
    slim = result.graph.to_module()
    with torch.no_grad():
        a, b = slim(x), model(x)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(graph).macs
    assert slim.get_parameter("conv3.weight").shape[0] == 11
    assert slim.get_parameter("conv1.weight").shape[0] == 8


def test_without_threshold_nothing_is_removed() -> None:
    """Control: trained gates that are small but not exactly zero leave nothing removable."""
    model = Net()
    x = torch.randn(2, 3, 12, 12)
    SMOFGates(model, x)
    with torch.no_grad():
        model.conv1.parametrizations.weight[0].gates.view(-1)[-1] = 1e-4
    gp.bake(model)
    result = gp.run(gp.trace(model.eval(), x), "shrink-kernels{lossless=true},prune-channels{lossless=true}")
    assert not result.modified
