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


def test_reference_zeroes_exactly_the_recorded_slices_and_leaves_the_input_alone() -> None:
    graph = gp.trace(sample_net(), sample_input())
    before = {k: graph.param(k).copy() for k in graph.param_keys()}
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    ref = result.reference()
    zeroed = 0
    for key, mask in result.projection.masks.items():
        want = before[key] * mask
        assert (ref.param(key) == want).all(), key
        zeroed += int((mask == 0).sum())
    assert zeroed > 0
    for key, value in before.items():  # the input graph's weights are untouched
        assert (graph.param(key) == value).all(), key


def test_with_weights_shares_structure_until_a_structural_edit() -> None:
    for capture in ("fx", "export"):
        graph = gp.trace(sample_net(), sample_input(), capture=capture)
        conv = next(n for n in graph.nodes if n.kind == "conv")
        key = conv.params["weight"]
        other = graph.with_weights({key: graph.param(key) * 2})
        assert other.nodes is graph.nodes  # the view is shared, not re-read
        assert other.frontend.gm.graph is graph.frontend.gm.graph
        assert (other.param(key) == graph.param(key) * 2).all()
        assert gp.compare(other, graph) > 1e-3
        # a structural edit gives the copy a structure of its own and leaves the parent alone
        nodes_before = [n.name for n in graph.nodes]
        out = graph.run(sample_input())[0]
        result = gp.get_pass("prune-channels")(ratio=0.5)(other)
        assert result.modified
        other.set_attr(other.node(conv.name), "stride", conv.attrs.get("stride", (1, 1)))
        assert other.frontend.gm.graph is not graph.frontend.gm.graph
        assert [n.name for n in graph.nodes] == nodes_before
        assert_rel_close(graph.run(sample_input())[0], out)


def test_randomize_gives_constant_scales_varied_values_so_branches_count() -> None:
    """ConvNeXt's layer scale starts at 1e-6 everywhere: a wrong rewrite in its branches
    would change the output by ~1e-6 relative, under the check's tolerance."""
    from graphprune.samples.models import randomize_

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.layer_scale = torch.nn.Parameter(torch.full((3, 1, 1), 1e-6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.layer_scale * self.conv(x)

    model = randomize_(Scaled())
    scale = model.layer_scale.detach().flatten()
    assert float(scale.min()) >= 0.5 and len(set(scale.tolist())) == 3
