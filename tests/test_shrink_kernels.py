"""shrink-kernels: exactness, lossless ring removal, budgets, crops, folds, refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import graphprune as gp
from graphprune.passes import ShrinkKernels
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import assert_rel_close, check_pass

from graphprune.frontends.onnx import load_onnx


# ------------------------------------------------------------------ models
class Stack(nn.Module):
    """conv(k, stride, dilation) -> bn -> relu -> conv 3x3 -> pool -> linear."""

    def __init__(self, k: int, stride: int = 1, dilation: int = 1, padding: int | None = None, groups: int = 1) -> None:
        super().__init__()
        pad = dilation * (k - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(8, 8, k, stride, pad, dilation, groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3)))


def outer_mask(shape: torch.Size, rings: int, axes: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """1 on the ``rings`` outermost rings (along ``axes``) of a conv weight, else 0."""
    mask = torch.zeros(shape)
    for a in axes:
        k = shape[a]
        idx = torch.tensor([i for i in range(k) if i < rings or i >= k - rings], dtype=torch.long)
        mask.index_fill_(a, idx, 1.0)
    return mask


def scale_rings(conv: nn.Conv2d, rings: int, factor: float, axes: tuple[int, ...] = (2, 3)) -> None:
    with torch.no_grad():
        m = outer_mask(conv.weight.shape, rings, axes)
        conv.weight.mul_(1 - m + m * factor)


def stack_graph(k: int, stride: int = 1, dilation: int = 1, size: int = 17, **kw) -> tuple[nn.Module, gp.Graph]:
    torch.manual_seed(k * 10 + stride + dilation)
    model = randomize_(Stack(k, stride, dilation, **kw)).eval()
    return model, gp.trace(model, torch.randn(2, 8, size, size))


def kernel_of(graph: gp.Graph, label: str) -> tuple[int, ...]:
    return tuple(graph.param(graph.find(label).params["weight"]).shape[2:])


CASES = [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 1), (7, 1, 1), (7, 2, 2)]


# --------------------------------------------------------------- lossless
@pytest.mark.parametrize("k, stride, dilation", CASES)
def test_zero_rings_removed_losslessly(k: int, stride: int, dilation: int) -> None:
    model, _ = stack_graph(k, stride, dilation)
    scale_rings(model.conv, (k - 1) // 2, 0.0)  # only the centre tap is left
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert kernel_of(r.graph, "conv") == (1, 1)
    assert kernel_of(r.graph, "conv2") == (3, 3)
    (rec,) = r.records
    assert rec["old_kernel"] == (k, k) and rec["new_kernel"] == (1, 1) and rec["energy_dropped"] == 0.0
    assert rec["new_pads"] == (0, 0, 0, 0) and rec["macs_saved"] > 0


def test_no_options_means_lossless_and_one_ring_at_a_time() -> None:
    model, _ = stack_graph(7)
    scale_rings(model.conv, 1, 0.0)  # 7 -> 5 only
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = check_pass(g, "shrink-kernels")
    assert kernel_of(r.graph, "conv") == (5, 5)
    assert gp.compare(r.graph, g) <= 1e-5
    assert r.graph.find("conv").attrs["pads"] == (2, 2, 2, 2)


def test_random_model_left_unchanged() -> None:
    g = gp.trace(randomize_(torchvision.models.resnet18()).eval(), torch.randn(1, 3, 64, 64))
    r = check_pass(g, ShrinkKernels(), expect_modified=False)
    assert r.records == [] and gp.graph_cost(r.graph).macs == gp.graph_cost(g).macs


# ------------------------------------------------------------ energy mode
@pytest.mark.parametrize("k, stride, dilation", CASES)
def test_energy_tolerance_exact(k: int, stride: int, dilation: int) -> None:
    model, _ = stack_graph(k, stride, dilation)
    scale_rings(model.conv, 1, 1e-3)  # a negligible outer ring, non-zero
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    assert not ShrinkKernels()(g).modified  # not zero: lossless keeps it
    r = check_pass(g, ShrinkKernels(energy=1e-4))
    assert kernel_of(r.graph, "conv") == (k - 2, k - 2)
    assert 0 < r.records[0]["energy_dropped"] <= 1e-4
    assert gp.compare(r.graph, g) > 0  # not lossless: the reference is the projected model


def test_energy_budget_is_cumulative() -> None:
    model, _ = stack_graph(7)
    scale_rings(model.conv, 2, 1e-2)  # rings 1 and 2 small, centre 3x3 large
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    energy = model.conv.weight.detach().double().pow(2)
    share_outer = float((energy * outer_mask(energy.shape, 1)).sum() / energy.sum())
    share_two = float((energy * outer_mask(energy.shape, 2)).sum() / energy.sum())
    r = check_pass(g, ShrinkKernels(energy=(share_outer + share_two) / 2))
    assert kernel_of(r.graph, "conv") == (5, 5)
    r = check_pass(g, ShrinkKernels(energy=share_two * 1.01))
    assert kernel_of(r.graph, "conv") == (3, 3)


def test_per_axis() -> None:
    model, _ = stack_graph(3)
    scale_rings(model.conv, 1, 0.0, axes=(3,))  # side columns zero: 3x3 -> 3x1
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    assert not ShrinkKernels()(g).modified  # the full ring is not zero
    r = check_pass(g, ShrinkKernels(per_axis=True, lossless=True))
    assert kernel_of(r.graph, "conv") == (3, 1)
    assert r.graph.find("conv").attrs["pads"] == (1, 0, 1, 0)


def test_per_axis_energy_prefers_the_cheap_axis() -> None:
    model, _ = stack_graph(5, stride=2)
    scale_rings(model.conv, 1, 1e-3, axes=(2,))  # rows 0 and 4 negligible
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = check_pass(g, ShrinkKernels(per_axis=True, energy=1e-3))
    assert kernel_of(r.graph, "conv") == (3, 5)


# --------------------------------------------------------------- padding
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (5, 2, 1), (3, 1, 2)])
def test_crop_when_padding_is_smaller_than_the_shrink(k: int, stride: int, dilation: int) -> None:
    model, _ = stack_graph(k, stride, dilation, padding=0)
    scale_rings(model.conv, 1, 0.0)
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert kernel_of(r.graph, "conv") == (k - 2, k - 2)
    assert r.records[0]["crop"] == ((dilation, dilation), (dilation, dilation))
    kept = ShrinkKernels(lossless=True, crop=False)(g)  # (check_pass's lossless re-run would crop)
    assert not kept.modified and "crop=false" in kept.skipped["conv"]


def test_partial_crop_with_small_padding() -> None:
    model, _ = stack_graph(5, dilation=2, padding=1)  # pads 1 < d = 2
    scale_rings(model.conv, 1, 0.0)
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert r.records[0]["crop"] == ((1, 1), (1, 1)) and r.graph.find("conv").attrs["pads"] == (0, 0, 0, 0)


def test_even_kernel_with_asymmetric_same_padding() -> None:
    model, _ = stack_graph(4, padding="same")  # torch pads 1 before, 2 after
    scale_rings(model.conv, 1, 0.0)
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    assert g.find("conv").attrs["pads"] == (1, 1, 2, 2)
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert kernel_of(r.graph, "conv") == (2, 2) and r.records[0]["new_pads"] == (0, 0, 1, 1)
    assert any(n.kind == "pad" for n in r.graph.nodes)  # the asymmetric part: an F.pad


def test_conv1d() -> None:
    class C1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(4, 6, 5, stride=2, padding=2)
            self.b = nn.Conv1d(6, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    m = randomize_(C1()).eval()
    with torch.no_grad():
        m.a.weight[..., 0] = 0
        m.a.weight[..., -1] = 0
    g = gp.trace(m, torch.randn(2, 4, 20))
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert kernel_of(r.graph, "a") == (3,)


# ------------------------------------------------------------------ folds
class DwPw(nn.Module):
    def __init__(self, mid: str = "dropout", multiplier: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8, bias=True)
        self.mid = nn.Dropout() if mid == "dropout" else nn.BatchNorm2d(8 * multiplier)
        self.pw = nn.Conv2d(8 * multiplier, 5, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.mid(self.dw(torch.relu(self.stem(x)))))


def dwpw_graph(mid: str = "dropout", multiplier: int = 1) -> gp.Graph:
    torch.manual_seed(1)
    m = randomize_(DwPw(mid, multiplier)).eval()
    with torch.no_grad():
        m.dw.bias.normal_()
    scale_rings(m.dw, 1, 0.0)
    return gp.trace(m, torch.randn(2, 3, 10, 10))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_pointwise_depthwise_folds_into_following_conv(multiplier: int) -> None:
    g = dwpw_graph(multiplier=multiplier)
    r = check_pass(g, ShrinkKernels(lossless=True))
    assert r.records[0]["folded_into"] == "pw"
    assert all(n.label != "dw" for n in r.graph.nodes)
    assert r.graph.param(r.graph.find("pw").params["weight"]).shape == (5, 8, 1, 1)
    assert all(not k.startswith("dw.") for k, _ in r.graph.to_module().named_parameters())
    kept = check_pass(g, ShrinkKernels(lossless=True, fold=False))
    assert kernel_of(kept.graph, "dw") == (1, 1)


def test_pointwise_depthwise_before_batchnorm_is_not_folded() -> None:
    r = check_pass(dwpw_graph("bn"), ShrinkKernels(lossless=True))
    assert r.records[0]["folded_into"] is None and "not folded" in r.skipped["dw"]
    assert kernel_of(r.graph, "dw") == (1, 1)


def test_transposed_conv_skipped() -> None:
    class T(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(x)

    m = T().eval()
    with torch.no_grad():
        m.up.weight.mul_(1 - outer_mask(m.up.weight.shape, 1))
    r = check_pass(gp.trace(m, torch.randn(1, 4, 6, 6)), ShrinkKernels(), expect_modified=False)
    assert "transposed" in r.skipped["up"]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def test_shared_weight_skipped() -> None:
    m = Shared().eval()
    scale_rings(m.conv, 1, 0.0)
    r = check_pass(gp.trace(m, torch.randn(1, 4, 8, 8)), ShrinkKernels(), expect_modified=False)
    assert all("shared" in why for why in r.skipped.values()) and r.skipped


# --------------------------------------------------------- budgets, zoo
@pytest.fixture(scope="module")
def resnet18() -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(torchvision.models.resnet18()).eval(), torch.randn(1, 3, 64, 64))


@pytest.fixture(scope="module")
def mobilenet() -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(torchvision.models.mobilenet_v2()).eval(), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("opts, target", [("macs=0.7", 0.7), ("macs=0.5,per_axis=true", 0.5)])
def test_resnet18_macs_budget(resnet18: gp.Graph, opts: str, target: float) -> None:
    r = check_pass(resnet18, f"shrink-kernels{{{opts}}}")
    ratio = gp.graph_cost(r.graph).macs / gp.graph_cost(resnet18).macs
    assert ratio <= target and ratio > target - 0.15
    for rec in r.records:  # the graph carries what the records say
        node = r.graph.find(rec["layer"])
        assert kernel_of(r.graph, rec["layer"]) == rec["new_kernel"] == node.attrs["kernel"]
        assert node.attrs["pads"] == rec["new_pads"] and rec["crop"] is None
        assert all(n <= o for n, o in zip(rec["new_kernel"], rec["old_kernel"]))


def test_mobilenet_v2_exact(mobilenet: gp.Graph) -> None:
    r = check_pass(mobilenet, "shrink-kernels{macs=0.95,per_axis=true}")  # depthwise 3x3: ~9% of MACs
    assert any(n.attrs.get("groups", 1) > 1 and n.attrs["kernel"] != (3, 3) for n in r.graph.nodes if n.kind == "conv")


def test_impossible_budget(resnet18: gp.Graph) -> None:
    with pytest.raises(gp.BudgetError, match="cannot reach macs=0.01"):
        ShrinkKernels(macs=0.01)(resnet18)


@pytest.mark.parametrize("text, message", [
    ("shrink-kernels{energy=1.5}", "energy must be in"),
    ("shrink-kernels{macs=0}", "macs must be in"),
    ("shrink-kernels{energy=0.1,macs=0.5}", "not both"),
    ("shrink-kernels{per_axis=maybe}", "per_axis"),
    ("shrink-kernels{ring=1}", "unknown option"),
])
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(gp.PassOptionError, match=message):
        gp.parse_pipeline(text)


# ------------------------------------------------------------ composition
def test_composes_with_prune_channels() -> None:
    g = gp.trace(sample_net(), sample_input())
    result = gp.run(g, "shrink-kernels{macs=0.8,per_axis=true},prune-channels{ratio=0.3}")  # verifies each step
    assert [r.modified for r in result.results] == [True, True]
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(result.results[0].graph).macs


def test_lossless_shrink_then_prune_on_sample_net() -> None:
    model = sample_net()
    for conv in (model.stage1[0].conv1, model.stage2[1].conv2, model.dw[0]):
        scale_rings(conv, 1, 0.0)
    g = gp.trace(model, sample_input())
    result = gp.run(g, "shrink-kernels,prune-channels{ratio=0.3}")
    shrink, prune = result.results
    assert {rec["layer"] for rec in shrink.records} == {"stage1.0.conv1", "stage2.1.conv2", "dw.0"}
    assert gp.compare(shrink.graph, g) <= 1e-5 and prune.modified
    assert gp.compare(result.graph, prune.reference()) <= 1e-5


def test_projected_model_matches_reference() -> None:
    model, _ = stack_graph(5, 2, 1)
    scale_rings(model.conv, 1, 0.1)
    g = gp.trace(model, torch.randn(2, 8, 17, 17))
    r = ShrinkKernels(energy=0.05)(g)
    assert r.records[0]["new_kernel"] == (3, 3)
    projected = r.projected_model(model).eval()
    x = g.random_inputs(3)
    with torch.no_grad():
        want = r.reference().run(*x)[0]
        got = projected(*x)
    assert_rel_close(got, want)
    assert float(projected.conv.weight.detach()[..., 0, :].abs().max()) == 0.0


# ------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("k, stride, dilation", [(3, 2, 1), (5, 1, 2), (7, 2, 1)])
def test_onnx_exact(tmp_path, k: int, stride: int, dilation: int) -> None:
    model, g = stack_graph(k, stride, dilation)
    scale_rings(model.conv, (k - 1) // 2, 0.0)
    scale_rings(model.conv2, 1, 1e-3)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, tuple(g.example_inputs()), str(path), dynamo=False, opset_version=17)
    graph = load_onnx(str(path))
    r = check_pass(graph, ShrinkKernels(lossless=True))
    assert [rec["new_kernel"] for rec in r.records] == [(1, 1)]
    r = check_pass(graph, ShrinkKernels(energy=1e-4))
    assert sorted(rec["new_kernel"] for rec in r.records) == [(1, 1), (1, 1)]


def asymmetric_conv_model(pads: list[int], k: int = 3, stride: int = 2, zero_rings: int = 1) -> "object":
    """Conv with ONNX pads ``pads`` (begin.., end..) and zero outer rings, then Relu and
    a 1x1 conv, built directly with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, k, k)).astype(np.float32)
    w *= (1 - outer_mask(torch.Size(w.shape), zero_rings).numpy()).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((3, 6, 1, 1)).astype(np.float32)
    size = 11
    out = (size + pads[0] + pads[2] - (k - 1) - 1) // stride + 1
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k, k], pads=pads, strides=[stride, stride]),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
        helper.make_node("Conv", ["z", "w2"], ["out"], name="proj", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "asym",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, out, out])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("pads, k, zero_rings, new_kernel", [
    ([0, 0, 1, 1], 3, 1, (1, 1)),        # TF "SAME_UPPER", stride 2: needs a crop at the start
    ([2, 1, 2, 3], 5, 1, (3, 3)),        # asymmetric, stays non-negative
    ([3, 3, 2, 2], 7, 2, (3, 3)),        # two rings, asymmetric
])
def test_onnx_asymmetric_pads(pads: list[int], k: int, zero_rings: int, new_kernel: tuple[int, int]) -> None:
    graph = load_onnx(asymmetric_conv_model(pads, k, zero_rings=zero_rings))
    r = check_pass(graph, ShrinkKernels(lossless=True))
    (rec,) = r.records
    assert rec["new_kernel"] == new_kernel
    assert gp.compare(r.graph, graph) <= 1e-5
    assert gp.graph_cost(r.graph).macs < gp.graph_cost(graph).macs


def test_onnx_fold(tmp_path) -> None:
    g = dwpw_graph()
    path = tmp_path / "dw.onnx"
    g.to_onnx(str(path))
    graph = load_onnx(str(path))
    r = check_pass(graph, ShrinkKernels(lossless=True))
    assert r.records[0]["folded_into"] is not None
    assert not any(n.kind == "conv" and n.attrs.get("groups", 1) > 1 for n in r.graph.nodes)
    assert math.isclose(gp.compare(r.graph, graph), 0.0, abs_tol=1e-5)
