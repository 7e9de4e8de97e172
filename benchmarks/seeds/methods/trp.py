"""TRP vs post-hoc truncated SVD at equal per-layer ranks (so equal MACs).

Per seed, on a ``small_resnet`` trained from scratch on ``n_per_class`` images per class:

* ``ours``: trained with the TRP hook (projection every ``every`` steps at ``energy``,
  nuclear-norm weight ``lam``), finalised (last projection, BN recalibrated), then
  ``factorize{lossless=true}`` — the slim model, exactly the trained one;
* ``baseline``: the same net trained plainly for the same epochs, each layer truncated
  post hoc to TRP's final rank for that layer (best rank-r approximation, the same
  projection TRP uses), BN recalibrated, then ``factorize{lossless=true}``: the same
  ranks, hence the same MACs;
* ``ours_ft`` / ``baseline_ft``: each slim (factorized) model fine-tuned for
  ``ft_epochs`` epochs;
* ``dense``: the plain model before truncation; ``macs_ratio``: slim/dense MACs (equal for
  both arms by construction; checked).

The factorization scheme is ``spatial`` by default (on 16- and 32-channel 3x3 convs the
channel scheme saves MACs only at ranks below 14/16 and 28/32).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from benchmarks.seeds.common import Data, accuracy, small_resnet, subset_per_class, train
from graphprune.passes.factorize import from_matrix, to_matrix
from graphprune.training.trp import TRP, low_rank_projection, recalibrate_bn

BASELINE_NAME = "post-hoc truncated SVD at TRP's per-layer ranks (same MACs), no fine-tuning"
DEFAULTS: dict[str, Any] = {
    "width": 16, "n_per_class": 400, "n_test": 2000, "epochs": 4, "ft_epochs": 1, "lr": 0.05, "batch": 128,
    "energy": 0.9, "lam": 3e-3, "every": 10, "scheme": "spatial",
}
TINY: dict[str, Any] = {"width": 8, "n_per_class": 30, "n_test": 200, "epochs": 1, "ft_epochs": 1, "every": 2}


def train_with_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
                     seed: int, before: Callable[[int], Any] | None = None, after: Callable[[], Any] | None = None,
                     weight_decay: float = 5e-4) -> nn.Module:
    """``common.train``'s loop (SGD, nesterov momentum 0.9, cosine learning rate) with
    per-step hooks: ``before(step)`` before the forward, ``after()`` after backward."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          nesterov=True, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            if before is not None:
                before(step)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after is not None:
                after()
            opt.step()
            sched.step()
            step += 1
    model.eval()
    return model


def _calib(x: torch.Tensor, batch: int = 128, n: int = 8) -> list[torch.Tensor]:
    return [x[i:i + batch] for i in range(0, min(len(x), n * batch), batch)]


def _slim(model: nn.Module, example: torch.Tensor, scheme: str) -> tuple[nn.Module, int, int]:
    graph = gp.trace(model.eval(), example)
    result = gp.run(graph, f"factorize{{lossless=true,scheme={scheme}}}")
    slim = result.graph.to_module()
    with torch.no_grad():
        a, b = slim(example), model(example)
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= 1e-4, f"slim model differs from the trained one by {err:.3g}"
    return slim, gp.graph_cost(result.graph, with_params=False).macs, gp.graph_cost(graph, with_params=False).macs


def run_seed(seed: int, data: Data, s: dict[str, Any]) -> dict[str, float]:
    sub = subset_per_class(data, s["n_per_class"], seed)
    xt, yt = data.x_test[: s["n_test"]], data.y_test[: s["n_test"]]
    example = sub.x_train[:2]
    calib = _calib(sub.x_train)

    # ours: TRP
    torch.manual_seed(seed)
    ours = small_resnet(data.in_ch, data.n_classes, s["width"])
    trp = TRP(ours, energy=s["energy"], lam=s["lam"], every=s["every"], scheme=s["scheme"])
    train_with_hooks(ours, sub.x_train, sub.y_train, s["epochs"], s["lr"], s["batch"], seed,
                     before=trp.before_forward, after=trp.after_backward)
    ranks = trp.finalize(calib)
    ours.eval()
    slim_ours, macs_ours, macs_dense = _slim(ours, example, s["scheme"])

    # baseline: plain training, post-hoc truncation to the same ranks
    torch.manual_seed(seed)
    plain = small_resnet(data.in_ch, data.n_classes, s["width"])
    train(plain, sub.x_train, sub.y_train, s["epochs"], s["lr"], s["batch"], seed)
    dense_acc = accuracy(plain, xt, yt)
    with torch.no_grad():
        for e in trp.entries:
            w = plain.get_submodule(e.name).weight
            m_r, _, _ = low_rank_projection(to_matrix(w, e.layout), rank=ranks[e.name])
            w.copy_(from_matrix(m_r, e.layout, w.shape).to(w.dtype))
    recalibrate_bn(plain, calib)
    plain.eval()
    slim_base, macs_base, _ = _slim(plain, example, s["scheme"])
    assert macs_base == macs_ours, (macs_base, macs_ours)

    out = {
        "ours": accuracy(slim_ours, xt, yt),
        "baseline": accuracy(slim_base, xt, yt),
        "dense": dense_acc,
        "macs_ratio": macs_ours / macs_dense,
    }
    if s["ft_epochs"] > 0:
        for name, slim in (("ours_ft", slim_ours), ("baseline_ft", slim_base)):
            train(slim, sub.x_train, sub.y_train, s["ft_epochs"], s["lr"] / 5, s["batch"], seed + 1000)
            out[name] = accuracy(slim, xt, yt)
    return out
