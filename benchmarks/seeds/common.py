"""Shared pieces of the seed-repeated evidence runs (``benchmarks/seeds/run.py``).

* :func:`load_dataset` reads ``fashion-mnist`` (the IDX files, parsed here with numpy and
  gzip), ``digits`` (scikit-learn's 8x8 digits, a fixed stratified split) or ``npz:PATH``
  (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``) into :class:`Data`: float32
  NCHW tensors in [0, 1] and int64 labels.
* :func:`subset_per_class` draws ``n`` training images per class (the limited-data regime).
* :func:`small_resnet` is a small CNN with batch norm and residual adds (a projection
  shortcut between its two stages), so pruning the residual stream matters.
* :func:`train`, :func:`accuracy`, :func:`macs`: a plain SGD loop, test accuracy, and
  MACs by graphprune's cost model.

Everything runs on CPU; keep ``torch.set_num_threads(1)`` (the runner sets it).
"""
from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

__all__ = ["Data", "load_dataset", "subset_per_class", "small_resnet", "train", "accuracy", "macs", "read_idx"]


@dataclass
class Data:
    """Images as float32 NCHW in [0, 1]; labels as int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str = ""

    @property
    def in_ch(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> str:
        return (f"{self.name}: train {tuple(self.x_train.shape)}, test {tuple(self.x_test.shape)}, "
                f"{self.n_classes} classes")


# ------------------------------------------------------------------ loading
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): magic ``00 00 tt nd`` (type code
    ``tt``, ``nd`` dimensions), ``nd`` big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in types:
        raise ValueError(f"{path}: unknown IDX type code {raw[2]:#x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, types[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def _images(a: np.ndarray) -> torch.Tensor:
    """uint8 (0..255) or float images, NHW or NCHW, to float32 NCHW in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise ValueError(f"images must be NHW or NCHW, got shape {a.shape}")
    t = torch.from_numpy(np.array(a, copy=True))
    if a.dtype == np.uint8:
        return t.float() / 255.0
    t = t.float()
    hi = float(t.max()) if t.numel() else 1.0
    return t / hi if hi > 1.0 else t


def _labels(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).astype(np.int64).reshape(-1))


def load_dataset(spec: str) -> Data:
    """``fashion-mnist`` | ``digits`` | ``npz:PATH``."""
    if spec == "fashion-mnist":
        part = lambda name: read_idx(os.path.join(FASHION_DIR, name))  # noqa: E731
        return Data(
            _images(part("train-images-idx3-ubyte.gz")), _labels(part("train-labels-idx1-ubyte.gz")),
            _images(part("t10k-images-idx3-ubyte.gz")), _labels(part("t10k-labels-idx1-ubyte.gz")),
            10, spec,
        )
    if spec == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
        return Data(_images(xtr), _labels(ytr), _images(xte), _labels(yte), 10, spec)
    if spec.startswith("npz:"):
        path = spec[4:]
        with np.load(path) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}")
            ytr, yte = _labels(z["y_train"]), _labels(z["y_test"])
            return Data(_images(z["x_train"]), ytr, _images(z["x_test"]), yte,
                        int(max(ytr.max(), yte.max())) + 1, spec)
    raise ValueError(f"unknown dataset `{spec}` (fashion-mnist, digits, npz:PATH)")


def subset_per_class(data: Data, n: int, seed: int) -> Data:
    """``n`` training images per class drawn with ``seed`` (test set unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(data.n_classes):
        idx = torch.nonzero(data.y_train == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    idx = torch.cat(picks).sort().values
    return replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx])


# ------------------------------------------------------------------ model
class _Block(nn.Module):
    """conv-bn-relu, conv-bn, plus the (projected when shapes change) shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class SmallResNet(nn.Module):
    """stem, stage 1 (two residual blocks at ``width``), stage 2 (two blocks at
    ``2*width``, stride 2), global average pool, linear."""

    def __init__(self, in_ch: int, n_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_ch, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = nn.Sequential(_Block(w, w, 1), _Block(w, w, 1))
        self.stage2 = nn.Sequential(_Block(w, 2 * w, 2), _Block(2 * w, 2 * w, 1))
        self.fc = nn.Linear(2 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def small_resnet(in_ch: int, n_classes: int, width: int = 16) -> nn.Module:
    return SmallResNet(in_ch, n_classes, width)


# ------------------------------------------------------------------ training
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Hook = Callable[[int, nn.Module], None]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    loss_fn: LossFn | None = None,
    hooks: Sequence[Hook] | None = None,
    weight_decay: float = 5e-4,
) -> nn.Module:
    """SGD (momentum 0.9, nesterov) with a cosine learning rate, ``epochs`` passes over
    ``(x, y)`` in shuffled batches.  ``loss_fn(model, xb, yb, idx)`` replaces the default
    cross-entropy (``idx`` are the batch's row indices into ``x``, for per-sample tables);
    each hook is called as ``hook(epoch, model)`` after every epoch (epoch counts from 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model, xb, yb, idx) if loss_fn is not None else F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        for hook in hooks or ():
            hook(epoch, model)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch):
        correct += int((model(x[start : start + batch]).argmax(1) == y[start : start + batch]).sum())
    model.train(was)
    return correct / max(len(x), 1)


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of ``model`` on ``example`` (graphprune's cost model on an fx capture)."""
    import graphprune as gp

    return gp.graph_cost(gp.trace(model, example), with_params=False).macs
