"""Small sample models used by the demo, the tests and the examples.

``SampleNet`` packs the structures graphprune must handle into a few layers: a stem, two
residual stages joined by adds (with a projection shortcut), a squeeze-and-excitation gate,
a depthwise-separable block, a grouped conv, a concat of two branches, and a
flatten -> linear head.  Weights are initialised deterministically from a seed.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Block(nn.Module):
    """conv-bn-relu, conv-bn, optional SE, plus a residual (projected when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return torch.relu(y + self.short(x))


class SampleNet(nn.Module):
    """The demo model: residual stages, SE, depthwise, grouped conv, concat, flatten->fc."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = nn.Sequential(Block(w, w), Block(w, w, se=True))
        self.stage2 = nn.Sequential(Block(w, 2 * w, stride=2), Block(2 * w, 2 * w, groups=4))
        self.dw = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1, groups=2 * w, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU6(),
            nn.Conv2d(2 * w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w),
        )
        self.branch_a = nn.Conv2d(2 * w, w, 1)
        self.branch_b = nn.Sequential(nn.Conv2d(2 * w, w, 3, 1, 1), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(2 * w * 4, 4 * w)
        self.fc2 = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        x = x + self.dw(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight, norm statistic, zero-initialised and constant-filled tensor random
    values, so a comparison cannot pass because something is trivially zero, identity or
    scaled down to nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
                if getattr(mod, "running_mean", None) is not None:
                    mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
        for name, p in model.named_parameters():
            if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                # a constant scale (ConvNeXt's layer scale starts at 1e-6 everywhere): O(1) and
                # varied, or its branch is too small for a wrong rewrite there to show
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def sample_net(seed: int = 0, width: int = 16) -> SampleNet:
    """A deterministically initialised :class:`SampleNet` in eval mode."""
    torch.manual_seed(seed)
    return randomize_(SampleNet(width=width), seed).eval()


def sample_input(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
