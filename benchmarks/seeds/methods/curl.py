"""CURL on limited data: KL-divergence channel importance vs L1 at equal MACs, then
label refinement vs plain distillation vs plain fine-tuning.

Per seed:

1. teacher: ``small_resnet`` trained on ``teacher_per_class`` images per class (the
   "pretrained" model; CURL starts from an ImageNet model);
2. limited data: ``per_class`` *other* labelled training images per class (drawn with the
   seed); the proxy batch for KL is ``proxy`` of them;
3. prune to ``macs`` of the teacher's MACs with ``prune-channels{macs=...}`` — residual
   streams included — scored by ``kl`` (on the proxy batch, no labels) or ``l1``;
4. fine-tune the slim model on the limited data for ``epochs``:
   ``ft`` cross-entropy; ``distill`` distillation from the teacher (T, alpha);
   ``lr`` distillation with label refinement (soft-label table from the teacher logits,
   step ``label_lr``, compatibility ``beta`` with the hard labels).

Arms (test accuracy on the full test set): ``ours`` = kl + lr (CURL), ``baseline`` =
l1 + ft; ``kl_ft``, ``kl_distill``, ``l1_distill``, ``l1_lr`` complete the two factors;
``teacher``, ``kl_pruned``/``l1_pruned`` (after pruning, before fine-tuning, batch norms
recalibrated on the limited data) and ``macs_ratio`` describe the setting.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from benchmarks.seeds.common import Data, accuracy, macs, small_resnet, subset_per_class, train
from graphprune.training import LabelRefinement, distillation_loss, recalibrate_bn

BASELINE_NAME = "L1 channel pruning + plain fine-tuning (cross-entropy), same MACs"
DEFAULTS: dict[str, Any] = {
    "width": 16, "teacher_per_class": 600, "teacher_epochs": 6, "per_class": 100, "proxy": 64,
    "macs": 0.4, "epochs": 15, "lr": 0.02, "batch": 64, "T": 4.0, "alpha": 0.7,
    "label_lr": 0.5, "beta": 0.1, "test": 0,
}
TINY: dict[str, Any] = {
    "width": 8, "teacher_per_class": 30, "teacher_epochs": 2, "per_class": 10, "proxy": 16,
    "epochs": 2, "test": 200,
}


def _finetune(kind: str, student: nn.Module, teacher_logits: torch.Tensor, d: Data, s: dict[str, Any], seed: int) -> nn.Module:
    if kind == "ft":
        return train(student, d.x_train, d.y_train, s["epochs"], s["lr"], s["batch"], seed)
    refine = (LabelRefinement(teacher_logits, lr=s["label_lr"], beta=s["beta"], labels=d.y_train)
              if kind == "lr" else None)

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = model(xb)
        targets = refine.targets(idx) if refine is not None else yb
        loss = distillation_loss(logits, teacher_logits[idx], targets, s["T"], s["alpha"])
        if refine is not None:
            refine.step(idx, logits.detach())
        return loss

    return train(student, d.x_train, d.y_train, s["epochs"], s["lr"], s["batch"], seed, loss_fn=loss_fn)


def run_seed(seed: int, data: Data, settings: dict[str, Any]) -> dict[str, float]:
    s = settings
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # teacher and limited data are disjoint draws of the training set
    pool = subset_per_class(data, s["teacher_per_class"] + s["per_class"], seed)
    per = s["teacher_per_class"] + s["per_class"]
    order = torch.argsort(pool.y_train, stable=True).view(data.n_classes, per)
    t_idx, l_idx = order[:, : s["teacher_per_class"]].flatten(), order[:, s["teacher_per_class"] :].flatten()
    test_n = s["test"] or len(data.x_test)
    x_test, y_test = data.x_test[:test_n], data.y_test[:test_n]
    teacher = small_resnet(data.in_ch, data.n_classes, s["width"])
    train(teacher, pool.x_train[t_idx], pool.y_train[t_idx], s["teacher_epochs"], 0.05, s["batch"], seed)
    lim = Data(pool.x_train[l_idx], pool.y_train[l_idx], x_test, y_test, data.n_classes, data.name)
    out: dict[str, float] = {"teacher": accuracy(teacher, x_test, y_test)}
    with torch.no_grad():
        teacher_logits = teacher.eval()(lim.x_train)
    gen = torch.Generator().manual_seed(seed)
    proxy = lim.x_train[torch.randperm(len(lim.x_train), generator=gen)[: s["proxy"]]]
    example = lim.x_train[:1]
    base_macs = macs(teacher, example)
    print(f"  teacher {out['teacher']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    for crit in ("kl", "l1"):
        t1 = time.perf_counter()
        graph = gp.trace(teacher, example)
        result = gp.run(graph, f"prune-channels{{macs={s['macs']},criterion={crit}}}", data=proxy)
        slim = result.graph.to_module()
        out["macs_ratio"] = macs(slim, example) / base_macs
        pruned = recalibrate_bn(_copy(slim), [lim.x_train])
        out[f"{crit}_pruned"] = accuracy(pruned.eval(), x_test, y_test)
        for kind in ("ft", "distill", "lr"):
            if crit == "l1" and kind == "ft" or crit == "kl" and kind == "lr":
                name = "baseline" if crit == "l1" else "ours"
            else:
                name = f"{crit}_{kind}"
            student = _finetune(kind, _copy(slim), teacher_logits, lim, s, seed)
            out[name] = accuracy(student, x_test, y_test)
        print(f"  {crit}: pruned {out[f'{crit}_pruned']:.4f} ({time.perf_counter() - t1:.0f}s)", flush=True)
    return out


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)
