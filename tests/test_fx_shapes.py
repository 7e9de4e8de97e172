"""Shape propagation without the expensive arithmetic (graphprune.frontends.fx_shapes):
the same shapes as a real forward, and a real forward where values decide shapes."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

import graphprune as gp
from graphprune.frontends.fx_shapes import ShapeOnlyProp, values_decide_shapes


class Mixed(nn.Module):
    """Every conv flavour the shortcut computes, plus a subclass it must not shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(8, 8, 5, padding="same", dilation=2, groups=4, padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(0, 2), padding_mode="circular", bias=False)
        self.c1d = nn.Conv1d(6, 4, 4, stride=3)
        self.c3d = nn.Conv3d(1, 2, (2, 3, 3), padding=(1, 0, 1))
        self.odd = _Cropping(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.c1(x)))
        y = self.c3(torch.relu(self.c2(y)))
        y = self.odd(y)
        z = self.c1d(y.flatten(2))
        v = self.c3d(y[:, :1].unsqueeze(1))
        return torch.cat([self.fc(z[..., :7]).flatten(1), v.flatten(1)], 1)


class _Cropping(nn.Conv2d):
    """A conv subclass whose forward crops: its shape is not the plain conv's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., 1:, :]


def _shapes(gm: fx.GraphModule, prop: type, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    prop(gm).propagate(x)
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


@pytest.mark.parametrize("size", [23, 32])
def test_shape_only_propagation_matches_a_real_forward(size: int) -> None:
    gm = fx.symbolic_trace(Mixed().eval())
    x = torch.randn(2, 3, size, size + 5)
    real = _shapes(gm, ShapeProp, x)
    fast = _shapes(gm, ShapeOnlyProp, x)
    assert fast == real and len(real) > 15


def test_conv_forward_is_skipped() -> None:
    calls: list[str] = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    gm = fx.symbolic_trace(model)
    original = nn.Conv2d._conv_forward

    def spy(self, x, w, b):  # type: ignore[no-untyped-def]
        calls.append(str(x.device))
        return original(self, x, w, b)

    nn.Conv2d._conv_forward = spy  # type: ignore[method-assign]
    try:
        ShapeOnlyProp(gm).propagate(torch.randn(1, 3, 16, 16))
    finally:
        nn.Conv2d._conv_forward = original  # type: ignore[method-assign]
    assert calls == []  # shapes from the window arithmetic
    last = list(gm.graph.nodes)[-2]
    assert tuple(last.meta["tensor_meta"].shape) == (1, 4, 12, 12)


class Masking(nn.Module):
    def __init__(self, how: str = "mask") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "nonzero":
            return torch.nonzero(y > 0)[:, 0].float()
        return y[y > 0]  # how many survive depends on the values


@pytest.mark.parametrize("how", ["mask", "nonzero"])
def test_value_dependent_shapes_use_a_real_forward(how: str) -> None:
    gm = fx.symbolic_trace(Masking(how).eval())
    assert values_decide_shapes(gm)
    assert not values_decide_shapes(fx.symbolic_trace(Mixed().eval()))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    graph = gp.trace(Masking(how).eval(), x, capture="fx")
    out = graph.frontend.gm.graph.output_node().args[0]
    n_positive = int((graph.frontend.gm.conv(x) > 0).sum())
    assert tuple(out.meta["tensor_meta"].shape) == (n_positive,)


def test_torchvision_shapes_match() -> None:
    torchvision = pytest.importorskip("torchvision")
    for name in ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "googlenet"):
        gm = fx.symbolic_trace(torchvision.models.get_model(name, weights=None).eval())
        x = torch.randn(1, 3, 96, 80)
        with torch.no_grad():
            assert _shapes(gm, ShapeOnlyProp, x) == _shapes(gm, ShapeProp, x), name


class Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.valid = nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding="valid", dilation=(1, 2))
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.valid(x)[..., :5])


def test_valid_padding_and_unbatched_inputs_match_a_real_forward() -> None:
    gm = fx.symbolic_trace(Unbatched().eval())
    for x in (torch.randn(3, 11, 9), torch.randn(2, 3, 10, 12)):
        assert _shapes(gm, ShapeOnlyProp, x) == _shapes(gm, ShapeProp, x)


def test_an_input_the_conv_cannot_take_fails_capture() -> None:
    with pytest.raises(gp.CaptureError, match="shape propagation failed"):
        gp.trace(nn.Sequential(nn.Conv2d(4, 4, 3)).eval(), torch.randn(1, 3, 8, 8), capture="fx")
    with pytest.raises(gp.CaptureError, match="smaller than its window"):
        gp.trace(nn.Sequential(nn.Conv2d(3, 4, 5)).eval(), torch.randn(1, 3, 4, 4), capture="fx")


class Pools(nn.Module):
    """Every pool flavour the shortcut computes, and element-wise functions it passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.m1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.m2 = nn.MaxPool2d((3, 2), stride=(2, 1), padding=1, dilation=2)
        self.m3 = nn.MaxPool2d(2, ceil_mode=True, padding=1)
        self.a1 = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.a1d = nn.AvgPool1d(2)
        self.m3d = nn.MaxPool3d(2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(self.m1(x))
        y = torch.sigmoid(self.m2(y)) + nn.functional.leaky_relu(self.m3(y)).mean()
        z = self.a1(torch.tanh(y))
        w = self.m3d(z.unsqueeze(1))
        return torch.cat([self.a1d(z.flatten(2)).flatten(1), w.flatten(1)], 1)


@pytest.mark.parametrize("size", [(17, 22), (24, 31), (11, 13)])
def test_pool_shapes_match_a_real_forward(size: tuple[int, int]) -> None:
    gm = fx.symbolic_trace(Pools().eval())
    x = torch.randn(2, 3, *size)
    assert _shapes(gm, ShapeOnlyProp, x) == _shapes(gm, ShapeProp, x)


def test_pools_run_no_kernel() -> None:
    gm = fx.symbolic_trace(Pools().eval())
    calls: list[tuple[int, ...]] = []
    original = torch.nn.functional.max_pool2d

    def spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    torch.nn.functional.max_pool2d = spy
    try:
        ShapeOnlyProp(gm).propagate(torch.randn(1, 3, 16, 16))
        assert calls == []  # shapes from the window arithmetic
        ShapeProp(gm).propagate(torch.randn(1, 3, 16, 16))
        assert len(calls) == 3  # the spy sees a real forward's pools
    finally:
        torch.nn.functional.max_pool2d = original
