"""The training toolkit: distillation, label refinement, mixup, BN recalibration, fit, and
the prune -> distil -> bake -> lossless round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.training import LabelRefinement, distillation_loss, fit, mixup, recalibrate_bn

from test_importance_data import ResNetTiny, _randomise_bn


def test_distillation_loss_is_the_formula() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    T, alpha = 3.0, 0.7
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    assert distillation_loss(s, t, y, T, alpha).item() == pytest.approx((alpha * T * T * kl + (1 - alpha) * ce).item(), rel=1e-6)
    assert distillation_loss(s, None, y).item() == pytest.approx(ce.item(), rel=1e-6)
    soft = F.one_hot(y, 4).float()  # soft targets equal to one-hot give the same cross-entropy
    assert distillation_loss(s, t, soft, T, alpha).item() == pytest.approx(distillation_loss(s, t, y, T, alpha).item(), rel=1e-6)


def test_label_refinement_moves_the_table_along_the_negative_gradient() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(6, 3) * 2
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    refine = LabelRefinement(teacher, lr=0.3, beta=0.2, labels=labels)
    before = refine.table.clone()
    idx = torch.tensor([1, 4])
    student = torch.randn(2, 3)
    # the documented gradient: (q - p) + beta (q - onehot(y))
    q = torch.softmax(before[idx], 1)
    p = torch.softmax(student, 1)
    grad = (q - p) + 0.2 * (q - F.one_hot(labels[idx], 3).float())
    torch.testing.assert_close(refine.gradient(idx, student), grad, rtol=1e-5, atol=1e-6)
    kl_before = (p * (p.log() - torch.log_softmax(before[idx], 1))).sum()
    refine.step(idx, student)
    torch.testing.assert_close(refine.table[idx], before[idx] - 0.3 * grad, rtol=1e-5, atol=1e-6)
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(refine.table[untouched], before[untouched])
    refine.beta = 0.0
    kl_after = (p * (p.log() - torch.log_softmax(refine.table[idx], 1))).sum()
    assert kl_after < kl_before  # the soft labels moved toward the student's predictions


def test_mixup_mixes_inputs_and_targets_with_one_lambda() -> None:
    x = torch.arange(12.0).view(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    a = mixup(x, y, 0.4, n_classes=3, generator=torch.Generator().manual_seed(3))
    b = mixup(x, y, 0.4, n_classes=3, generator=torch.Generator().manual_seed(3))
    xm, ym, perm, lam = a
    assert 0.0 <= lam <= 1.0 and torch.equal(xm, b[0]) and lam == b[3]
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(ym, lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y, 3).float()[perm])
    torch.testing.assert_close(ym.sum(1), torch.ones(4))
    lams = [mixup(x, y, 0.4, 3, torch.Generator().manual_seed(s))[3] for s in range(60)]
    assert abs(np.mean(lams) - 0.5) < 0.12  # Beta(a, a) has mean 1/2


def test_recalibrate_bn_reestimates_statistics_without_touching_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    x = torch.randn(16, 3, 6, 6)
    recalibrate_bn(model, [x[:8], x[8:]])
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    per_batch = torch.stack([h[:8].var((0, 2, 3), unbiased=True), h[8:].var((0, 2, 3), unbiased=True)]).mean(0)
    torch.testing.assert_close(model[1].running_var, per_batch, rtol=1e-5, atol=1e-5)
    assert not model.training and all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert model[1].momentum == 0.1


def test_fit_trains_and_calls_hooks() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = ResNetTiny(n=2)
    seen = []
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    before = F.cross_entropy(model.eval()(x), y).item()
    fit(model, loader, epochs=6, lr=0.05, hooks=[lambda e, m: seen.append(e)])
    assert seen == [1, 2, 3, 4, 5, 6]
    assert F.cross_entropy(model(x), y).item() < before


def test_prune_with_kl_distil_bake_lossless_round_trip() -> None:
    """prune (kl) -> distil the projected model -> bake -> lossless prune: the slim model
    computes what the fine-tuned projected model computes, at the budgeted MACs."""
    torch.manual_seed(0)
    teacher = _randomise_bn(ResNetTiny(c=8, n=4))
    x = torch.randn(16, 3, 8, 8)
    graph = gp.trace(teacher, x[:1])
    result = gp.run(graph, "prune-channels{macs=0.5,criterion=kl}", data=x[:8])
    r = result.results[0]
    budget_macs = gp.graph_cost(result.graph).macs
    assert budget_macs <= 0.5 * gp.graph_cost(graph).macs
    student = r.projected_model(teacher)
    with torch.no_grad():
        t_logits = teacher.eval()(x)
    refine = LabelRefinement(t_logits, lr=0.5)
    loader = [(x[i : i + 4], t_logits[i : i + 4].argmax(1), torch.arange(i, i + 4)) for i in range(0, 16, 4)]
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fit(student, loader, epochs=2, lr=0.05, teacher=teacher, T=2.0, alpha=0.5, refinement=refine)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # it did train
    assert refine.steps == 8
    tuned = gp.bake(student).eval()
    slim_result = gp.run(gp.trace(tuned, x[:1]), "prune-channels{lossless=true}")
    slim = slim_result.graph.to_module().eval()
    with torch.no_grad():
        want, got = tuned(x), slim(x)
    assert (got - want).abs().max() / want.abs().max() <= 1e-5
    assert gp.graph_cost(slim_result.graph).macs == budget_macs
