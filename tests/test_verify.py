"""Verification: every output of a graph is compared, each relative to its own scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.verify import relative_error


class TwoOutputs(nn.Module):
    """Two heads; the second one's output is about 1000x smaller than the first's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        with torch.no_grad():
            self.a.weight.mul_(1000.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def two_output_graph() -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(TwoOutputs().eval(), torch.randn(2, 3, 6, 6))


def edited(graph: gp.Graph, key: str, factor: float) -> gp.Graph:
    other = graph.copy()
    other.set_param(key, other.param(key) * factor)
    other.commit()
    return other


def test_relative_error_reads_every_output() -> None:
    a = [torch.ones(3), torch.full((2,), 2.0)]
    b = [torch.ones(3), torch.full((2,), 2.5)]
    assert relative_error(a, b) == pytest.approx(0.2)
    assert relative_error(b, b) == 0.0


def test_relative_error_scales_each_output_by_itself() -> None:
    """A difference of 1e-3 on an output of scale 1e-2 is 10%, whatever the other output's scale."""
    a = [torch.full((4,), 1000.0), torch.full((4,), 0.011)]
    b = [torch.full((4,), 1000.0), torch.full((4,), 0.010)]
    assert relative_error(a, b) == pytest.approx(0.1, rel=1e-6)


def test_relative_error_refuses_mismatched_outputs() -> None:
    with pytest.raises(gp.VerificationError, match="output count differs: 1 vs 2"):
        relative_error([torch.ones(2)], [torch.ones(2), torch.ones(2)])
    with pytest.raises(gp.VerificationError, match=r"output shape differs: \(2,\) vs \(3,\)"):
        relative_error([torch.ones(2)], [torch.ones(3)])


def test_compare_catches_a_change_in_the_second_output_only() -> None:
    g = two_output_graph()
    assert gp.compare(g, g.copy()) == 0.0
    h = edited(g, "b.weight", 1.001)  # 0.1% on the small second output, nothing on the first
    xs = g.random_inputs(0)
    assert torch.equal(h.run(*xs)[0], g.run(*xs)[0])
    err = gp.compare(h, g)
    assert 5e-4 < err < 2e-3
    with pytest.raises(gp.VerificationError, match="output differs from the projected reference"):
        gp.assert_exact(h, g)


def test_compare_catches_a_change_in_the_first_output_only() -> None:
    g = two_output_graph()
    assert gp.compare(edited(g, "a.weight", 1.001), g) > 5e-4


def test_assert_exact_passes_equal_graphs_and_returns_the_error() -> None:
    g = two_output_graph()
    assert gp.assert_exact(g.copy(), g) == 0.0


def test_onnx_two_outputs_second_differs(tmp_path) -> None:
    g = two_output_graph()
    path = str(tmp_path / "two.onnx")
    g.to_onnx(path)
    o = gp.load_onnx(path)
    assert len(o.outputs) == 2
    second = [n for n in o.nodes if n.kind == "conv" and n.outputs[0] == o.outputs[1]][0]
    bad = edited(o, second.params["weight"], 1.001)
    assert gp.compare(bad, o) > 5e-4
    with pytest.raises(gp.VerificationError):
        gp.assert_exact(bad, o)
