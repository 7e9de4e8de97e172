"""factorize: exactness of both schemes, rank rules, lossless low rank, budgets, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import graphprune as gp
from graphprune.passes import Factorize
from graphprune.passes.factorize import TruncatedSVD, from_matrix, to_matrix
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import assert_rel_close, check_pass

from graphprune.frontends.onnx import load_onnx


# ------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """conv(k, stride, dilation) 8 -> 16 -> relu -> conv 3x3 16 -> 12 -> pool -> linear."""

    def __init__(self, k: int, stride: int = 1, dilation: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, k, stride, dilation * (k - 1) // 2, dilation, bias=bias)
        self.conv2 = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 40, bias=False)
        self.fc3 = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def conv_graph(k: int, stride: int = 1, dilation: int = 1, bias: bool = True) -> tuple[nn.Module, gp.Graph]:
    torch.manual_seed(k + 3 * stride + 7 * dilation)
    model = randomize_(ConvNet(k, stride, dilation, bias)).eval()
    return model, gp.trace(model, torch.randn(2, 8, 15, 15))


def plant_low_rank(weight: torch.Tensor, rank: int, layout: str, seed: int = 0) -> None:
    """Overwrite ``weight`` with an exactly rank-``rank`` matrix in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = to_matrix(weight.detach(), layout).shape
    m = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
    with torch.no_grad():
        weight.copy_(from_matrix(m, layout, weight.shape))


def labels(graph: gp.Graph) -> list[str]:
    return [n.label for n in graph.nodes if n.kind in ("conv", "linear")]


CASES = [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 1), (7, 1, 1), (7, 2, 2)]


# ------------------------------------------------------------ exactness
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("k, stride, dilation", CASES)
def test_conv_exact(scheme: str, k: int, stride: int, dilation: int) -> None:
    _, g = conv_graph(k, stride, dilation, bias=k != 5)
    r = check_pass(g, Factorize(rank=3, scheme=scheme))
    rec = {x["layer"]: x for x in r.records}["conv"]
    assert rec["rank"] == 3 and rec["macs_after"] < rec["macs_before"]
    first = r.graph.find("conv_gp0")
    second = r.graph.find("conv_gp1")
    w1 = r.graph.param(first.params["weight"])
    w2 = r.graph.param(second.params["weight"])
    if scheme == "channel":
        assert w1.shape == (3, 8, k, k) and w2.shape == (16, 3, 1, 1)
        assert first.attrs["stride"] == (stride, stride) and second.attrs["stride"] == (1, 1)
    else:
        assert w1.shape == (3, 8, k, 1) and w2.shape == (16, 3, 1, k)
        assert first.attrs["stride"] == (stride, 1) and second.attrs["stride"] == (1, stride)
        assert first.attrs["dilation"] == (dilation, 1) and second.attrs["dilation"] == (1, dilation)
        pad = dilation * (k - 1) // 2
        assert first.attrs["pads"] == (pad, 0, pad, 0) and second.attrs["pads"] == (0, pad, 0, pad)
    assert ("bias" in second.params) == (k != 5) and "bias" not in first.params


def test_linear_exact_on_2d_and_3d_inputs() -> None:
    for shape in [(4, 32), (2, 5, 32)]:
        torch.manual_seed(0)
        g = gp.trace(MLP().eval(), torch.randn(*shape))
        r = check_pass(g, Factorize(energy=0.6))
        assert {rec["layer"] for rec in r.records} >= {"fc1", "fc2"}
        w = r.graph.param(r.graph.find("fc1_gp0").params["weight"])
        rank = {rec["layer"]: rec["rank"] for rec in r.records}["fc1"]
        assert w.shape == (rank, 32)


def test_conv1d_channel_scheme_and_spatial_refused() -> None:
    class C1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(8, 24, 5, stride=2, padding=2, dilation=1)
            self.b = nn.Conv1d(24, 4, 3, padding=2, dilation=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    g = gp.trace(randomize_(C1()).eval(), torch.randn(2, 8, 30))
    r = check_pass(g, Factorize(rank=2))
    assert r.graph.param(r.graph.find("a_gp0").params["weight"]).shape == (2, 8, 5)
    r = Factorize(rank=2, scheme="spatial")(g)
    assert not r.modified and "2-d conv" in r.skipped["a"]


def test_energy_picks_smallest_rank() -> None:
    model, g = conv_graph(3)
    energy = 0.8
    r = Factorize(energy=energy)(g)
    s = np.linalg.svd(model.conv.weight.detach().double().reshape(16, -1).numpy(), compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    want = int(np.searchsorted(cum, energy) + 1)
    rec = {x["layer"]: x for x in r.records}["conv"]
    assert rec["rank"] == want and rec["energy_kept"] >= energy
    assert cum[want - 2] < energy


def test_never_factorizes_into_more_macs() -> None:
    _, g = conv_graph(3)
    r = Factorize(rank=15)(g)  # 15 * (72 + 16) MACs per position > 16 * 72
    assert "conv" not in {x["layer"] for x in r.records}
    assert "not less than" in r.skipped["conv"]
    r = Factorize(rank=100, scheme="spatial")(g)
    assert not r.modified and all("not less" in why or "no rank" in why for why in r.skipped.values())


def test_shared_weight_skipped() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    m = Shared().eval()
    plant_low_rank(m.fc.weight, 2, "linear")
    r = Factorize()(gp.trace(m, torch.randn(2, 16)))
    assert not r.modified and all("shared" in why for why in r.skipped.values()) and r.skipped


# -------------------------------------------------------------- lossless
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_planted_low_rank_removed_losslessly(scheme: str) -> None:
    model, _ = conv_graph(5, 2, 1)
    plant_low_rank(model.conv.weight, 2, scheme)
    plant_low_rank(model.fc.weight, 1, "linear")
    g = gp.trace(model, torch.randn(2, 8, 15, 15))
    r = check_pass(g, Factorize(lossless=True, scheme=scheme))
    ranks = {x["layer"]: x["rank"] for x in r.records}
    assert ranks["conv"] == 2 and "conv2" not in ranks
    assert gp.compare(r.graph, g) <= 1e-5
    assert gp.graph_cost(r.graph).macs < gp.graph_cost(g).macs


def test_no_options_means_lossless() -> None:
    model, _ = conv_graph(3)
    plant_low_rank(model.conv.weight, 4, "channel")
    g = gp.trace(model, torch.randn(2, 8, 15, 15))
    r = check_pass(g, "factorize")
    assert [x["rank"] for x in r.records] == [4]
    assert gp.compare(r.graph, g) <= 1e-5


@pytest.fixture(scope="module")
def resnet18() -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(torchvision.models.resnet18()).eval(), torch.randn(1, 3, 64, 64))


def test_random_model_left_unchanged(resnet18: gp.Graph) -> None:
    r = Factorize()(resnet18)
    assert not r.modified and r.records == []
    assert labels(r.graph) == labels(resnet18)


# ------------------------------------------------------------- budgets
def test_resnet18_macs_budget(resnet18: gp.Graph) -> None:
    r = check_pass(resnet18, Factorize(macs=0.6))
    ratio = gp.graph_cost(r.graph).macs / gp.graph_cost(resnet18).macs
    assert 0.5 < ratio <= 0.6
    for rec in r.records:
        assert rec["macs_after"] < rec["macs_before"]


def test_mobilenet_v2_exact() -> None:
    torch.manual_seed(0)
    g = gp.trace(randomize_(torchvision.models.mobilenet_v2()).eval(), torch.randn(1, 3, 64, 64))
    r = check_pass(g, Factorize(macs=0.8))
    assert any("grouped" in why for why in r.skipped.values())
    assert r.records


def test_impossible_budget(resnet18: gp.Graph) -> None:
    with pytest.raises(gp.BudgetError, match="cannot reach macs=0.001"):
        Factorize(macs=0.001)(resnet18)


@pytest.mark.parametrize("text, message", [
    ("factorize{energy=0}", "energy must be in"),
    ("factorize{energy=1.5}", "energy must be in"),
    ("factorize{rank=0}", "rank must be at least 1"),
    ("factorize{macs=2}", "macs must be in"),
    ("factorize{rank=4,energy=0.9}", "give one of"),
    ("factorize{scheme=diagonal}", "scheme must be one of"),
    ("factorize{rank=two}", "rank"),
])
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(gp.PassOptionError, match=message):
        gp.parse_pipeline(text)


# ------------------------------------------------------------ composition
def test_composes_with_prune_channels() -> None:
    g = gp.trace(sample_net(), sample_input())
    result = gp.run(g, "factorize{macs=0.7},prune-channels{ratio=0.3}")  # verifies each step
    assert [r.modified for r in result.results] == [True, True]
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(result.results[0].graph).macs


def test_lossless_factorize_then_prune_small_net() -> None:
    model, _ = conv_graph(3)
    plant_low_rank(model.conv.weight, 3, "channel")
    g = gp.trace(model, torch.randn(2, 8, 15, 15))
    result = gp.run(g, "factorize,prune-channels{ratio=0.5}")
    first, second = result.results
    assert first.modified and second.modified
    assert gp.compare(first.graph, g) <= 1e-5
    assert gp.compare(result.graph, second.reference()) <= 1e-5


# ------------------------------------------------------------- projection
def test_truncated_svd_function() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    for layout in ("channel", "spatial"):
        p = TruncatedSVD(2, layout)(w)
        m = to_matrix(p, layout)
        assert torch.linalg.matrix_rank(m.double(), rtol=1e-6) == 2
        u, s, vh = torch.linalg.svd(to_matrix(w, layout).double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert_rel_close(m.double(), best)


def test_projected_model_keeps_low_rank_while_training() -> None:
    model, g = conv_graph(3, 2, 1)
    r = Factorize(rank=2)(g)
    projected = r.projected_model(model)
    x = g.random_inputs(5)
    with torch.no_grad():
        assert_rel_close(projected.eval()(*x), r.reference().run(*x)[0])
    projected.train()
    opt = torch.optim.SGD(projected.parameters(), lr=0.1)
    loss = projected(*x).pow(2).mean()
    loss.backward()
    opt.step()
    w = projected.conv.weight.detach().reshape(16, -1).double()
    assert torch.linalg.matrix_rank(w, rtol=1e-6) == 2


# ------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("k, stride, dilation", [(3, 2, 1), (5, 1, 2)])
def test_onnx_exact(tmp_path, scheme: str, k: int, stride: int, dilation: int) -> None:
    model, g = conv_graph(k, stride, dilation)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, tuple(g.example_inputs()), str(path), dynamo=False, opset_version=17)
    graph = load_onnx(str(path))
    r = check_pass(graph, Factorize(rank=3, scheme=scheme))
    assert len(r.records) == 3  # conv, conv2 and the Gemm
    assert any(rec["kind"] == "linear" for rec in r.records)


def test_onnx_lossless_matmul(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    plant_low_rank(model.fc1.weight, 3, "linear")
    plant_low_rank(model.fc2.weight, 5, "linear")
    x = torch.randn(2, 5, 32)  # 3-d input: exported as MatMul (+ Add)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    graph = load_onnx(str(path))
    r = check_pass(graph, Factorize(lossless=True))
    assert sorted(rec["rank"] for rec in r.records) == [3, 5]
    assert gp.compare(r.graph, graph) <= 1e-5


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_onnx_asymmetric_pads(scheme: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 5)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    pads = [0, 2, 1, 1]  # top 0, left 2, bottom 1, right 1
    size, stride = 12, 2
    oh = (size + pads[0] + pads[2] - 3) // stride + 1
    ow = (size + pads[1] + pads[3] - 5) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 5], pads=pads, strides=[stride, stride])]
    graph = helper.make_graph(
        nodes, "asym",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, oh, ow])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    g = load_onnx(model)
    r = check_pass(g, Factorize(rank=4, scheme=scheme))
    assert r.records[0]["rank"] == 4
