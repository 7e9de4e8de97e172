"""Group convolutions: permutation vs identity grouping at equal groups, before and after
masked fine-tuning; budget search vs uniform G at equal parameters.

Per seed, one dense ``small_resnet`` is trained on ``n_per_class`` images per class
(``dense``), then every eligible conv becomes ``groups`` groups:

* ``ours``: ``group-convs{groups=G}`` (channel permutations gathering the heaviest weight
  mass in the diagonal blocks), fine-tuned ``ft_epochs`` with the block mask held
  (the recipe of :func:`graphprune.training.gconv.group_conv_finetune`, plus BN
  recalibration), baked, ``group-convs{lossless=true}``
  (checked equal to the fine-tuned model);
* ``baseline``: the identity grouping (contiguous channel blocks, no permutation), the
  same mask-held fine-tuning and lossless pass;
* ``ours_noft`` / ``baseline_noft``: the same two projections before fine-tuning (BN
  recalibrated on training data, as after fine-tuning), evaluated as slim grouped models;
* ``kept_perm`` / ``kept_identity``: kept share of the L2 pair-score mass (mean over convs);
* ``search`` / ``search_noft``: ``group-convs{budget=b,budget_unit=params}`` with ``b`` the
  conv-parameter share of the uniform result (equal parameters), with and without the
  same fine-tuning; ``search_params`` / ``uniform_params``: conv parameter shares reached.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

import graphprune as gp
from benchmarks.seeds.common import Data, accuracy, small_resnet, subset_per_class, train
from graphprune import blockperm
from graphprune.passes.group_convs import GroupConvs
from graphprune.projection import Projection
from graphprune.training.gconv import lossless_spec
from graphprune.training.trp import recalibrate_bn

BASELINE_NAME = "identity grouping (no permutation) at the same groups, same mask-held fine-tuning"
DEFAULTS: dict[str, Any] = {
    "width": 16, "n_per_class": 400, "n_test": 2000, "epochs": 4, "ft_epochs": 1, "lr": 0.05, "batch": 128,
    "groups": 4,
}
TINY: dict[str, Any] = {"width": 8, "n_per_class": 30, "n_test": 200, "epochs": 1, "ft_epochs": 1, "groups": 2}


def _calib(x: torch.Tensor, batch: int = 128, n: int = 8) -> list[torch.Tensor]:
    return [x[i:i + batch] for i in range(0, min(len(x), n * batch), batch)]


def _conv_params(graph: gp.Graph) -> int:
    return sum(int(graph.param(k).size) for n in graph.nodes if n.kind == "conv" for k in n.params.values())


def _identity_projection(graph: gp.Graph, decided: gp.PassResult, groups: int) -> Projection:
    """Block masks of the identity grouping on the convs ``decided`` grouped."""
    proj = Projection()
    for key in decided.projection.keys():
        w = graph.param(key)
        F_, C = int(w.shape[0]), int(w.shape[1])
        rows, cols = blockperm.identity_labels(F_, groups), blockperm.identity_labels(C, groups)
        mask = np.asarray(blockperm.block_mask(rows, cols), dtype=w.dtype)
        proj.mask(key, np.broadcast_to(mask.reshape(F_, C, *(1,) * (w.ndim - 2)), w.shape).copy())
    return proj


def _finish(model: nn.Module, projection: Projection, example: torch.Tensor, spec: str, sub: Data,
            s: dict[str, Any], seed: int, calib: list[torch.Tensor], ft: bool) -> tuple[nn.Module, float]:
    """Hold ``projection``, optionally fine-tune, bake, recalibrate BN, run the lossless
    pass; returns the slim module (checked equal) and its conv-parameter share."""
    tuned = projection.projected_model(model)
    if ft:
        train(tuned, sub.x_train, sub.y_train, s["ft_epochs"], s["lr"] / 5, s["batch"], seed + 1000)
    gp.bake(tuned)
    recalibrate_bn(tuned, calib)
    tuned.eval()
    graph = gp.trace(tuned, example)
    result = gp.run(graph, spec)
    slim = result.graph.to_module()
    with torch.no_grad():
        a, b = slim(example), tuned(example)
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= 1e-4, f"slim model differs from the fine-tuned one by {err:.3g}"
    assert result.modified, "the lossless pass found no blocks"
    return slim, _conv_params(result.graph) / _conv_params(graph)


def run_seed(seed: int, data: Data, s: dict[str, Any]) -> dict[str, float]:
    sub = subset_per_class(data, s["n_per_class"], seed)
    xt, yt = data.x_test[: s["n_test"]], data.y_test[: s["n_test"]]
    example = sub.x_train[:2]
    calib = _calib(sub.x_train)
    G = int(s["groups"])

    torch.manual_seed(seed)
    dense = small_resnet(data.in_ch, data.n_classes, s["width"])
    train(dense, sub.x_train, sub.y_train, s["epochs"], s["lr"], s["batch"], seed)
    graph = gp.trace(dense.eval(), example)
    decide = GroupConvs(groups=G)
    decided = gp.run(graph, [decide]).results[0]
    identity = _identity_projection(graph, decided, G)
    spec = lossless_spec(decide)

    out: dict[str, float] = {"dense": accuracy(dense, xt, yt)}
    recs = decided.records
    out["kept_perm"] = float(np.mean([r["kept"] for r in recs]))
    out["kept_identity"] = float(np.mean([r["kept_identity"] for r in recs]))
    for name, proj in (("ours", decided.projection), ("baseline", identity)):
        slim, share = _finish(dense, proj, example, spec, sub, s, seed, calib, ft=False)
        out[f"{name}_noft"] = accuracy(slim, xt, yt)
        slim, share = _finish(dense, proj, example, spec, sub, s, seed, calib, ft=True)
        out[name] = accuracy(slim, xt, yt)
    out["uniform_params"] = share

    # search at the uniform grouping's conv-parameter share
    budget = min(1.0, share + 1e-9)
    search = GroupConvs(budget=budget, budget_unit="params")
    found = gp.run(graph, [search]).results[0]
    sspec = lossless_spec(search)
    slim, sshare = _finish(dense, found.projection, example, sspec, sub, s, seed, calib, ft=False)
    out["search_noft"] = accuracy(slim, xt, yt)
    slim, sshare = _finish(dense, found.projection, example, sspec, sub, s, seed, calib, ft=True)
    out["search"] = accuracy(slim, xt, yt)
    out["search_params"] = sshare
    return out
