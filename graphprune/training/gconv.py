"""Group-convolution fine-tuning (Zhao & Luk): decide the groups with ``group-convs``,
fine-tune with the block mask held, bake, and let ``group-convs{lossless=true}`` turn the
block-sparse convs into grouped convs exactly.

The recipe (what :func:`group_conv_finetune` does)::

    graph = gp.trace(model, x)
    decided = gp.run(graph, "group-convs{groups=4}").results[0]   # permutations + G blocks
    tuned = decided.projected_model(model)     # W <- W * M held by a parametrization
    train(tuned)                               # the optimiser sees W; the forward uses W * M
    gp.bake(tuned)                             # off-block weights are now exact zeros
    slim = gp.run(gp.trace(tuned, x), "group-convs{lossless=true}").graph.to_module()

Why it is exact: the parametrization makes the effective weight ``W * M`` with ``M`` the
0/1 block mask in the *original* channel order, so after baking every off-block pair is
``w * 0 == 0``; the lossless pass finds these blocks again (the non-zero pattern's
connected components, packed into ``G`` bins; :func:`graphprune.blockperm.exact_blocks`)
and its rewrite equals its input.  The lossless pass is given the same ``max_groups`` and
``min_channels_per_group`` and, with ``groups=G``, the same ``G``, so it cannot pick a
different count.

Taylor scores (:func:`taylor_scores`): the pair score of filter ``f`` and channel ``c``,
accumulated over calibration batches ``b``,

    S_fc = sum_b | sum_{taps} W_fc * dL_b/dW_fc |,

the first-order estimate of the loss change when the kernel slice ``W_fc`` is removed
(Molchanov et al.), which Zhao & Luk allow in place of the weight norm.  Pass it as
``GroupConvs(criterion="taylor", scores=S)``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.passes.group_convs import GroupConvs
from graphprune.passes_base import PassResult, PipelineResult, parse_pipeline
from graphprune.projection import bake

__all__ = ["GroupConvFinetune", "group_conv_finetune", "taylor_scores", "lossless_spec"]

logger = logging.getLogger(__name__)


def _inputs_targets(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def taylor_scores(model: nn.Module, batches: Iterable[Any],
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{qualified weight name: S (F x C)}`` with ``S_fc = sum_b |<W_fc, dL_b/dW_fc>|``
    for every ungrouped conv of ``model`` (see module doc).  ``loss_fn(model, batch)``
    defaults to the batch-mean cross-entropy of ``(x, y)`` batches.  The model runs in eval
    mode (norms use their running statistics), as ``gp.run(graph, "group-convs{criterion=
    taylor,...}", data=batches)`` does; weights are not changed, gradients are cleared and
    the model's mode restored afterwards."""
    convs = {f"{name}.weight": m for name, m in model.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1}
    scores = {k: torch.zeros(m.weight.shape[:2], dtype=torch.float64) for k, m in convs.items()}
    was = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        if loss_fn is not None:
            loss = loss_fn(model, batch)
        else:
            x, y = _inputs_targets(batch)
            if y is None:
                raise ValueError("taylor_scores: batches need labels (x, y) unless a loss_fn is given")
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        for k, m in convs.items():
            g = m.weight.grad
            if g is not None:
                prod = (m.weight.detach().double() * g.double()).flatten(2).sum(-1)
                scores[k] += prod.abs()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return scores


def lossless_spec(decided: GroupConvs | str) -> str:
    """The ``group-convs{lossless=true,...}`` that finds ``decided``'s blocks again: same
    ``groups`` (if fixed), ``max_groups``, ``min_channels_per_group``, ``ns``, ``ignore``."""
    if isinstance(decided, str):
        (p,) = parse_pipeline(decided)
        assert isinstance(p, GroupConvs), f"not a group-convs pass: {decided}"
        decided = p
    kept = dataclasses.replace(
        GroupConvs(lossless=True), groups=decided.groups, max_groups=decided.max_groups,
        min_channels_per_group=decided.min_channels_per_group, ns=decided.ns, ignore=decided.ignore,
        fold=decided.fold,
    )
    return kept.spec()


@dataclass
class GroupConvFinetune:
    """What :func:`group_conv_finetune` did: the decision, the fine-tuned (baked) model,
    the lossless result and the slim module."""

    decided: PassResult
    tuned: nn.Module
    lossless: PipelineResult
    slim: nn.Module


def group_conv_finetune(
    model: nn.Module,
    example: torch.Tensor,
    decide: GroupConvs | str = "group-convs{groups=4}",
    train: Callable[[nn.Module], Any] | None = None,
) -> GroupConvFinetune:
    """Decide with ``decide``, fine-tune ``result.projected_model(model)`` with ``train``
    (the block mask held), bake, and run the matching lossless ``group-convs``.  ``model``
    is not modified.  With ``train=None`` the projected model is baked as is."""
    was = model.training
    model.eval()
    graph = gp.trace(model, example)
    model.train(was)
    pipeline = [decide] if isinstance(decide, GroupConvs) else parse_pipeline(decide)
    if len(pipeline) != 1 or not isinstance(pipeline[0], GroupConvs):
        raise ValueError(f"group_conv_finetune: decide must be one group-convs pass, got {decide}")
    decided = gp.run(graph, pipeline).results[0]
    tuned = decided.projected_model(model)
    if train is not None:
        train(tuned)
    bake(tuned)
    tuned.eval()
    lossless = gp.run(gp.trace(tuned, example), lossless_spec(pipeline[0]))
    return GroupConvFinetune(decided, tuned, lossless, lossless.graph.to_module())
