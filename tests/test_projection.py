"""Projected copies for fine-tuning, then lossless removal of the trained-away structure."""
from __future__ import annotations

import torch

import graphprune as gp
from graphprune.samples.models import sample_input, sample_net
from helpers import assert_rel_close


def test_projected_model_keeps_mask_while_training_then_lossless_removes_it() -> None:
    model = sample_net()
    x = sample_input(4)
    graph = gp.trace(model, x)
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)

    tuned = result.projected_model(model)
    assert_rel_close(tuned.eval()(x), result.reference().run(x)[0])
    tuned.train()
    opt = torch.optim.SGD(tuned.parameters(), lr=0.05, momentum=0.9)
    for step in range(5):
        opt.zero_grad()
        loss = (tuned(sample_input(4, seed=step)) - 1.0).square().mean()
        loss.backward()
        opt.step()
    tuned.eval()
    for key, mask in result.projection.masks.items():
        path, _, attr = key.rpartition(".")
        owner = tuned.get_submodule(path)
        value = getattr(owner, attr)
        assert torch.all(value[mask == 0] == 0), f"{key}: projected entries moved during training"

    baked = gp.trace(gp.bake(tuned), x)
    lossless = gp.get_pass("prune-channels")(lossless=True)(baked)
    assert lossless.modified
    assert gp.graph_cost(lossless.graph).macs <= gp.graph_cost(result.graph).macs
    assert_rel_close(lossless.graph.run(x)[0], tuned(x))


def test_reference_differs_from_input_when_lossy() -> None:
    graph = gp.trace(sample_net(), sample_input())
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    assert gp.compare(result.reference(), graph) > 1e-3
    assert gp.compare(result.graph, result.reference()) <= 1e-5
