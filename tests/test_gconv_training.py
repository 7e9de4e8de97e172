"""Group-conv fine-tuning: mask held while training, exact lossless round trip, Taylor
pair scores and the ``scores=`` option of group-convs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.passes.group_convs import GroupConvs
from graphprune.passes_base import PassOptionError
from graphprune.training.gconv import group_conv_finetune, lossless_spec, taylor_scores


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(y)) + y)
        y = torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 10, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in _batches(4, seed=1):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_finetune_end_to_end_exact() -> None:
    torch.manual_seed(0)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    out = group_conv_finetune(model, x, "group-convs{groups=4}", train=_train)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the input model changed"
    # training moved the weights, and the off-block weights stayed exactly zero
    w = out.tuned.conv1.weight.detach()
    assert not torch.equal(w, model.conv1.weight.detach())
    pairs = w.flatten(2).abs().sum(-1)
    assert int((pairs != 0).sum()) <= 16 * 16 // 4
    assert out.lossless.modified
    with torch.no_grad():
        a, b = out.slim(x), out.tuned(x)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
    graph = gp.trace(model.eval(), x)
    assert gp.graph_cost(out.lossless.graph).macs < gp.graph_cost(graph).macs
    groups = {rec["layer"]: rec["groups"] for rec in out.lossless.results[0].records}
    assert groups == {rec["layer"]: rec["groups"] for rec in out.decided.records}


def test_without_mask_training_breaks_the_blocks() -> None:
    """Control: fine-tuning without the mask held leaves nothing the lossless pass removes."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 10, 10)
    decided = gp.run(gp.trace(model.eval(), x), "group-convs{groups=4}").results[0]
    plain = decided.projection.apply(gp.trace(model.eval(), x)).to_module()
    _train(plain)
    plain.eval()
    result = gp.run(gp.trace(plain, x), lossless_spec("group-convs{groups=4}"))
    assert not result.modified


def test_lossless_spec_keeps_options() -> None:
    assert lossless_spec("group-convs{groups=4,min_channels_per_group=2}") == \
        "group-convs{groups=4,min_channels_per_group=2,lossless=true}"


def test_taylor_scores_hand() -> None:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -3.0]).view(1, 2, 1, 1))
    model = nn.Sequential(conv)
    x1 = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    x2 = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1)
    # loss = y = w . x, so dL/dw = x and the score per batch is |w_c x_c|
    s = taylor_scores(model, [x1, x2], lambda m, b: m(b).sum())["0.weight"]
    torch.testing.assert_close(s, torch.tensor([[2.0 + 2.0, 3.0 + 6.0]], dtype=torch.float64))
    assert conv.weight.grad is None


def test_group_convs_taylor_scores_option() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10, 10)
    graph = gp.trace(model, x)
    scores = taylor_scores(model, _batches(2))
    r = GroupConvs(groups=4, criterion="taylor", scores=scores)(graph)
    assert r.modified
    assert gp.compare(r.graph, r.reference()) <= 1e-5
    # the decision follows the scores: planted scores select their blocks exactly
    planted = {k: v.clone() for k, v in scores.items()}
    block = torch.zeros(16, 16, dtype=torch.float64)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for g in range(4):
        idx = perm[4 * g: 4 * g + 4]
        block[idx[:, None], idx] = 1.0
    planted["conv1.weight"] = block
    r2 = GroupConvs(groups=4, criterion="taylor", scores=planted)(graph)
    rec = next(rec for rec in r2.records if rec["layer"] == "conv1")
    assert abs(rec["kept"] - 1.0) < 1e-12
    with pytest.raises(PassOptionError, match="need criterion=taylor"):
        GroupConvs(groups=4, scores=scores)(graph)
    with pytest.raises(PassOptionError, match="no scores"):
        GroupConvs(groups=4, criterion="taylor", scores={"stem.weight": scores["stem.weight"]})(graph)
    assert GroupConvs(groups=2, criterion="taylor", scores=scores).spec() == "group-convs{groups=2,criterion=taylor}"


def test_group_convs_taylor_from_calibration_data() -> None:
    """``gp.run(..., data=)`` computes the same per-batch Taylor pair scores as
    :func:`taylor_scores` on the model, and takes the same decision."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10, 10)
    graph = gp.trace(model, x)
    batches = _batches(3)
    from graphprune.passes.group_convs import taylor_pair_scores

    convs = [n for n in graph.nodes if n.kind == "conv"]
    from_graph = taylor_pair_scores(graph, batches, convs)
    from_model = taylor_scores(model, batches)
    assert set(from_graph) == set(from_model)
    for k in from_graph:
        torch.testing.assert_close(from_graph[k], from_model[k], rtol=1e-4, atol=1e-9)
    r_data = gp.run(graph, "group-convs{groups=4,criterion=taylor}", data=batches).results[0]
    r_scores = GroupConvs(groups=4, criterion="taylor", scores=from_model)(graph)
    assert [rec["kept"] for rec in r_data.records] == pytest.approx([rec["kept"] for rec in r_scores.records], rel=1e-6)
    l2 = GroupConvs(groups=4)(graph)
    assert [rec["kept"] for rec in r_data.records] != [rec["kept"] for rec in l2.records]
    with pytest.raises(PassOptionError, match="needs gradients"):
        gp.run(graph, "group-convs{groups=4,criterion=taylor}")
    assert not gp.run(graph, "group-convs{criterion=taylor,lossless=true}").modified
