"""EPI: when to prune during training.

Per seed, ``small_resnet`` is trained from scratch for ``epochs`` epochs on
``per_class`` images per class (SGD, one cosine schedule over the whole run).  Pruning
at epoch ``t`` means: train the dense model ``t`` epochs, prune to ``macs`` of its MACs
with ``prune-channels{macs=...}`` (``criterion``, residual streams included), and train
the slim model for the remaining ``epochs - t`` epochs on the same schedule (a fresh
optimizer).  The dense trajectory is shared by every arm.

* ``ours``: prune at the epoch where the early pruning indicator first reaches
  ``threshold`` (window ``window``; checked after every dense epoch; if it never does
  by ``max_epoch``, prune there), applying the sub-network EPI recorded;
* ``baseline``: prune at initialisation (``t = 0``);
* ``prune_at_T`` for every ``T`` in ``sweep``: the oracle sweep;
* ``dense``: no pruning (reference);
* compute: ``*_tmacs`` = training cost in tera-MACs (3 x forward MACs per sample per
  epoch: forward plus backward), for ``ours``, ``baseline``, ``dense`` and the sweep;
  ``ours_epoch`` = the epoch EPI chose; ``macs_ratio``.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from benchmarks.seeds.common import Data, accuracy, macs, small_resnet, subset_per_class
from graphprune.training import EarlyPruningIndicator

BASELINE_NAME = "prune at initialisation (same MAC budget, same total epochs)"
DEFAULTS: dict[str, Any] = {
    "width": 16, "per_class": 200, "epochs": 10, "macs": 0.35, "criterion": "l1", "lr": 0.05,
    "batch": 64, "window": 2, "threshold": 0.95, "max_epoch": 5, "sweep": [0, 1, 2, 3, 4, 5], "test": 0,
}
TINY: dict[str, Any] = {"width": 8, "per_class": 10, "epochs": 3, "max_epoch": 2, "window": 1, "sweep": [0, 1], "test": 200}


class _Trainer:
    """SGD (momentum 0.9, nesterov, weight decay 5e-4) with a per-epoch cosine rate over
    ``total`` epochs; shuffling depends on (seed, epoch) only, so every arm sees the same
    batches."""

    def __init__(self, model: nn.Module, total: int, lr: float, batch: int, seed: int) -> None:
        self.model, self.total, self.lr, self.batch, self.seed = model, total, lr, batch, seed
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def epoch(self, e: int, x: torch.Tensor, y: torch.Tensor) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * e / self.total))
        gen = torch.Generator().manual_seed(self.seed * 1000 + e)
        order = torch.randperm(len(x), generator=gen)
        self.model.train()
        for start in range(0, len(x), self.batch):
            idx = order[start : start + self.batch]
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.model.eval()


def run_seed(seed: int, data: Data, settings: dict[str, Any]) -> dict[str, float]:
    s = settings
    torch.manual_seed(seed)
    d = subset_per_class(data, s["per_class"], seed)
    x, y = d.x_train, d.y_train
    test_n = s["test"] or len(data.x_test)
    x_test, y_test = data.x_test[:test_n], data.y_test[:test_n]
    example = x[:1]
    E = s["epochs"]
    dense = small_resnet(data.in_ch, data.n_classes, s["width"])
    dense_macs = macs(dense, example)
    trainer = _Trainer(dense, E, s["lr"], s["batch"], seed)
    epi = EarlyPruningIndicator(dense, s["macs"], s["criterion"], window=s["window"], threshold=s["threshold"], example=example)

    snapshots: dict[int, nn.Module] = {}
    epi_epoch: int | None = None
    recorded: dict[int, Any] = {}
    t0 = time.perf_counter()
    for e in range(0, E + 1):
        if e > 0:
            trainer.epoch(e - 1, x, y)
        if e <= s["max_epoch"]:
            fired = epi.step()
            recorded[e] = epi.pruning_pass()
            if e in s["sweep"] or epi_epoch is None:
                snapshots[e] = copy.deepcopy(dense)
            if epi_epoch is None and (fired or e == s["max_epoch"]):
                epi_epoch = e
            ind = epi.indicators[-1]
            print(f"  epoch {e}: EPI {'-' if ind is None else f'{ind:.3f}'} kept {epi.architecture}", flush=True)
    out: dict[str, float] = {"dense": accuracy(dense, x_test, y_test), "dense_tmacs": 3 * dense_macs * len(x) * E / 1e12}
    assert epi_epoch is not None

    def prune_at(t: int, pass_: Any = None) -> tuple[float, float, float]:
        model = snapshots[t]
        graph = gp.trace(model, example)
        p = pass_ if pass_ is not None else f"prune-channels{{macs={s['macs']},criterion={s['criterion']}}}"
        slim = gp.run(graph, p).graph.to_module()
        slim_macs = macs(slim, example)
        tr = _Trainer(slim, E, s["lr"], s["batch"], seed)
        for e in range(t, E):
            tr.epoch(e, x, y)
        cost = 3 * len(x) * (dense_macs * t + slim_macs * (E - t)) / 1e12
        return accuracy(slim, x_test, y_test), cost, slim_macs / dense_macs

    results: dict[int, tuple[float, float, float]] = {}
    for t in s["sweep"]:
        results[t] = prune_at(t)
        out[f"prune_at_{t}"], out[f"prune_at_{t}_tmacs"], out["macs_ratio"] = results[t]
    ours = prune_at(epi_epoch, recorded[epi_epoch])
    out["ours"], out["ours_tmacs"] = ours[0], ours[1]
    out["baseline"], out["baseline_tmacs"] = results[0][0], results[0][1]
    out["ours_epoch"] = float(epi_epoch)
    print(f"  EPI chose epoch {epi_epoch} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out
