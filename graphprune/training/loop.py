"""A reference fine-tuning loop and batch-norm recalibration.

These are plain functions for the user's own loop, not a framework: :func:`fit` shows
how the pieces combine (distillation, label refinement, mixup, per-epoch hooks such as
:class:`~graphprune.training.epi.EarlyPruningIndicator`) and is what the tests and the
seed benchmarks use.

Batch-norm recalibration.  After pruning (or a projection), the running statistics no
longer describe the activations.  :func:`recalibrate_bn` resets them and re-estimates
them as the *cumulative* average over ``batches`` forward passes in training mode
(``momentum=None``: ``mu = (1/n) sum_b mu_b``, likewise the unbiased variances), without
touching any weight.  Under ``torch.distributed`` the estimates are then averaged over
ranks, so every replica keeps identical buffers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune.training import distributed as dist

from .distill import LabelRefinement, distillation_loss, mixup, soft_cross_entropy

__all__ = ["recalibrate_bn", "fit", "unwrap"]

_BN = (nn.modules.batchnorm._BatchNorm,)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return getattr(model, "module", model)


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[Any], batches: int | None = None) -> nn.Module:
    """Re-estimate every batch norm's running mean and variance on ``loader`` (first
    element of each batch is the input); weights are not touched.  Returns ``model``."""
    inner = unwrap(model)
    norms = [m for m in inner.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    modes = {m: m.training for m in inner.modules()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    inner.train()
    try:
        for i, batch in enumerate(loader):
            if batches is not None and i >= batches:
                break
            inner(_inputs(batch))
    finally:
        for m, mom in saved:
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    for m in norms:
        dist.mean_(m.running_mean)
        dist.mean_(m.running_var)
    return model


Hook = Callable[[int, nn.Module], Any]


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    teacher: nn.Module | None = None,
    T: float = 4.0,
    alpha: float = 0.9,
    refinement: LabelRefinement | None = None,
    mixup_alpha: float = 0.0,
    n_classes: int | None = None,
    hooks: Sequence[Hook] = (),
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Train ``model`` (possibly DDP-wrapped) for ``epochs`` over ``loader``.

    ``loader`` yields ``(x, y)`` or ``(x, y, index)`` (``index``: the samples' rows in
    the label table; needed with ``refinement``).  The loss is
    :func:`~graphprune.training.distill.distillation_loss` against ``teacher`` (eval mode,
    no grad) when given, else the cross-entropy; the targets are the refined soft labels
    when ``refinement`` is given, else ``y``.  ``mixup_alpha > 0`` mixes inputs and
    targets (not with refinement).  SGD with momentum 0.9 and a cosine learning rate
    unless an ``optimizer`` is given.  After each epoch every hook is called as
    ``hook(epoch, model)`` (epochs count from 1); a hook returning ``"stop"`` ends
    training.
    """
    if refinement is not None and mixup_alpha > 0:
        raise ValueError("mixup and label refinement do not combine (mixed samples have no table row)")
    if teacher is not None:
        teacher.eval()
    opt = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    try:
        n_steps = epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        n_steps = 0
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps)))
             if optimizer is None and n_steps else None)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in loader:
            x, y = batch[0], batch[1]
            index = batch[2] if len(batch) > 2 else None
            targets: torch.Tensor = y
            if refinement is not None:
                if index is None:
                    raise ValueError("label refinement needs batches (x, y, index)")
                targets = refinement.targets(index)
            t_logits = None
            if mixup_alpha > 0:
                x, targets, perm, lam = mixup(x, targets, mixup_alpha, n_classes, generator)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            s_logits = model(x)
            loss = (distillation_loss(s_logits, t_logits, targets, T, alpha) if teacher is not None
                    else soft_cross_entropy(s_logits, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if refinement is not None:
                refinement.step(index, s_logits.detach())  # type: ignore[arg-type]
        stop = False
        for hook in hooks:
            stop = (hook(epoch, model) == "stop") or stop
        if stop:
            break
    model.eval()
    return model
