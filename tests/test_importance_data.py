"""Data-driven criteria: kl (CURL) and taylor, calibration data through the pipeline and
the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.channels import group_projection
from graphprune.samples.models import SampleNet
from graphprune.training import criteria
from graphprune.training.criteria import kl_importance, taylor_importance


class ResNetTiny(nn.Module):
    """stem -> one residual block -> GAP -> fc: a residual stream and an inner group."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bna(self.a(s)))
        s = F.relu(self.bnb(self.b(y)) + s)
        return self.fc(s.mean((2, 3)))


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model.eval()


def _group_of(graph: gp.Graph, label: str) -> gp.PruningGroup:
    node = graph.find(label)
    group = gp.analyse(graph).group_of(gp.Port(node.outputs[0], 1))
    assert group is not None
    return group


def _class_of_filter(graph: gp.Graph, group: gp.PruningGroup, label: str, i: int) -> int:
    port = gp.Port(graph.find(label).outputs[0], 1)
    return int(group.class_of[port][i])


def test_kl_of_a_class_whose_projection_changes_nothing_is_zero() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny())
    model.a.weight.data[3] = 0.0  # inner channel 3: zero filter, zero norm scale and shift
    model.bna.weight.data[3] = 0.0
    model.bna.bias.data[3] = 0.0
    x = torch.randn(6, 3, 8, 8)
    graph = gp.trace(model, x[:1])
    group = _group_of(graph, "a")
    scores = kl_importance(x)(graph, group)
    c = _class_of_filter(graph, group, "a", 3)
    assert scores[c] == 0.0
    others = np.delete(scores[group.prunable], c)
    assert (others > 1e-9).all(), scores  # the other classes do change the output


def test_class_carrying_the_whole_signal_scores_highest() -> None:
    torch.manual_seed(1)
    model = _randomise_bn(ResNetTiny())
    model.fc.weight.data[:, [i for i in range(8) if i != 5]] = 0.0  # fc reads stream channel 5 only
    x = torch.randn(6, 3, 8, 8)
    graph = gp.trace(model, x[:1])
    group = _group_of(graph, "stem")  # the residual stream: stem, bn0, bnb, the add, fc columns
    scores = kl_importance(x)(graph, group)
    c = _class_of_filter(graph, group, "stem", 5)
    assert int(np.argmax(scores)) == c
    assert scores[c] > 10 * np.sort(scores)[-2]


def test_batched_kl_equals_one_projected_reference_per_class() -> None:
    """The per-sample masks give what the projection prune-channels uses gives, on a model
    with residual adds, SE gates, depthwise and grouped convs, a concat and a flatten."""
    torch.manual_seed(0)
    model = _randomise_bn(SampleNet(width=8))
    x = torch.randn(3, 3, 16, 16)
    graph = gp.trace(model, x[:1])
    groups = [g for g in gp.analyse(graph).groups if g.prunable.any()]
    fast = [kl_importance(x, rows=10)(graph, g) for g in groups]  # 3 classes per pass: a partial last chunk
    # reference: KL of the projected reference, computed here directly
    base = F.log_softmax(graph.run(x)[0].double(), -1)
    for g, f in zip(groups, fast):
        for c in np.nonzero(g.prunable)[0][:2]:
            keep = np.ones(g.n_classes, bool)
            keep[c] = False
            out = F.log_softmax(group_projection(graph, g, keep).apply(graph).run(x)[0].double(), -1)
            want = float((out.exp() * (out - base)).sum(-1).mean())
            assert f[c] == pytest.approx(want, rel=1e-4, abs=1e-12), (g.describe(), c)  # fp32 logits


def test_kl_without_masked_runs_projects_each_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for frontends that cannot mask values (ONNX) gives the same scores."""
    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny())
    x = torch.randn(4, 3, 8, 8)
    graph = gp.trace(model, x[:1])
    group = _group_of(graph, "stem")
    fast = kl_importance(x)(graph, group)
    monkeypatch.setattr(gp.Graph, "can_run_masked", property(lambda self: False))
    np.testing.assert_allclose(kl_importance(x)(graph, group), fast, rtol=1e-4, atol=1e-12)


def test_taylor_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    graph = gp.trace(model, x[:1])
    group = _group_of(graph, "0")
    W1, b1 = model[0].weight.detach().double(), model[0].bias.detach().double()
    W2 = model[1].weight.detach().double()
    xd = x.double()
    h = xd @ W1.T + b1
    y = h @ W2.T + model[1].bias.detach().double()
    n = len(x)
    # no labels: L = (1/N) sum ||y||^2
    dy = 2 * y / n
    gW2 = dy.T @ h
    dh = dy @ W2
    gW1, gb1 = dh.T @ xd, dh.sum(0)
    want = ((gW1 * W1).sum(1) + gb1 * b1 + (gW2 * W2).sum(0)).abs().numpy()
    got = taylor_importance(x)(graph, group)
    order = [_class_of_filter(graph, group, "0", i) for i in range(4)]
    np.testing.assert_allclose(got[order], want, rtol=1e-5)
    # with labels: L = mean cross-entropy
    labels = torch.tensor([0, 1, 1, 0, 1])
    p = torch.softmax(y, -1)
    dy = (p - F.one_hot(labels, 2).double()) / n
    gW2, dh = dy.T @ h, dy @ W2
    gW1, gb1 = dh.T @ xd, dh.sum(0)
    want = ((gW1 * W1).sum(1) + gb1 * b1 + (gW2 * W2).sum(0)).abs().numpy()
    got = taylor_importance((x, labels))(graph, group)
    np.testing.assert_allclose(got[order], want, rtol=1e-5)


def test_data_criterion_without_data_is_an_option_error() -> None:
    model = ResNetTiny().eval()
    graph = gp.trace(model, torch.randn(1, 3, 8, 8))
    for crit in ("kl", "taylor"):
        with pytest.raises(gp.PassOptionError, match="needs calibration data"):
            gp.run(graph, f"prune-channels{{ratio=0.5,criterion={crit}}}")


@pytest.mark.parametrize("crit", ["kl", "taylor"])
def test_pipeline_with_data_is_exact_and_follows_the_scores(crit: str) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny())
    model.a.weight.data[[1, 6]] *= 0.01  # weak filters, but not zero
    x = torch.randn(8, 3, 8, 8)
    graph = gp.trace(model, x[:1])
    result = gp.run(graph, f"prune-channels{{ratio=0.5,criterion={crit}}}", data=(x, torch.arange(8) % 4))
    assert result.modified
    group = _group_of(graph, "a")
    scores = (kl_importance(x) if crit == "kl" else taylor_importance((x, torch.arange(8) % 4)))(graph, group)
    rec = next(r for r in result.results[0].records if r["group"] == group.id)
    kept = rec["kept"][f"{graph.find('a').outputs[0]}:1"]
    assert sorted(kept) == sorted(np.argsort(scores)[4:].tolist())
    assert gp.compare(result.graph, result.results[0].reference()) <= 1e-5


def test_calibration_formats_agree() -> None:
    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny())
    x = torch.randn(8, 3, 8, 8)
    graph = gp.trace(model, x[:1])
    group = _group_of(graph, "stem")
    name = graph.inputs[0]
    one = kl_importance(x)(graph, group)
    loader = [x[:3], x[3:]]  # batches: the mean is over all samples
    np.testing.assert_allclose(kl_importance(loader)(graph, group), one, rtol=1e-9)
    np.testing.assert_allclose(kl_importance({name: x.numpy()})(graph, group), one, rtol=1e-6)
    batches = criteria.calibration_batches((x, torch.zeros(8, dtype=torch.long)), graph)
    assert len(batches) == 1 and batches[0].labels is not None
    with pytest.raises(gp.GraphError, match="do not name the model inputs"):
        criteria.calibration_batches({"a": x.numpy(), "b": x.numpy()}, graph)


def test_cli_calibration_file(tmp_path) -> None:
    from graphprune.cli import main

    torch.manual_seed(0)
    model = _randomise_bn(ResNetTiny())
    src = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), src, input_names=["image"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    cal = str(tmp_path / "cal.npz")
    np.savez(cal, image=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    out = str(tmp_path / "o.onnx")
    pipeline = "prune-channels{ratio=0.5,criterion=kl}"
    assert main(["optimize", src, "-o", out, "-p", pipeline, "--no-progress"]) == 2  # no data
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=np.zeros((1, 3, 8, 8), np.float32))
    assert main(["optimize", src, "-o", out, "-p", pipeline, "--calibration", bad, "--no-progress"]) == 2
    assert main(["optimize", src, "-o", out, "-p", pipeline, "--calibration", cal, "--no-progress"]) == 0
    slim = gp.load_onnx(out)
    assert gp.graph_cost(slim).macs < gp.graph_cost(gp.load_onnx(src)).macs
