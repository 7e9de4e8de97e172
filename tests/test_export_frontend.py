"""The torch.export frontend: capture of models fx cannot trace, aten-level rules,
agreement with fx, in-place apply, save/load, and the errors users get."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.frontends.fx import _flatten_tensors
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import RTOL, check_pass


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class LoopHeads(nn.Module):
    """fx cannot trace it: a Python loop whose length comes from the input's shape, and a
    YOLO-like head list concatenated after flattening each level."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 16)
        self.stages = nn.ModuleList([ConvBN(16, 24, 2), ConvBN(24, 32, 2), ConvBN(32, 40, 2)])
        self.heads = nn.ModuleList([nn.Conv2d(c, 6, 1) for c in (24, 32, 40)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        feats = []
        for stage in self.stages[: x.shape[-1] // 8]:  # a Proxy slice under fx
            x = stage(x)
            feats.append(x)
        outs = [head(f).flatten(2) for head, f in zip(self.heads, feats)]
        return torch.cat(outs, 2)


def loop_heads() -> nn.Module:
    return randomize_(LoopHeads()).eval()


def test_auto_capture_falls_to_export_where_fx_fails() -> None:
    model, x = loop_heads(), torch.randn(2, 3, 24, 24)
    with pytest.raises(gp.CaptureError, match="capture=\"export\""):
        gp.trace(model, x, capture="fx")
    g = gp.trace(model, x)
    assert g.frontend_name == "export"
    r = check_pass(g, "prune-channels{ratio=0.3}")
    assert gp.graph_cost(r.graph).macs < 0.8 * gp.graph_cost(g).macs
    # the stem and every stage lost channels; the heads' outputs are model outputs
    kept = {n.label: r.graph.shape(n.outputs[0])[1] for n in r.graph.nodes if n.kind == "conv"}
    assert kept["stem.conv"] < 16 and kept["stages.2.conv"] < 40
    assert all(kept[f"heads.{i}"] == 6 for i in range(3))


def test_export_and_fx_keep_the_same_channels() -> None:
    model, x = sample_net(), sample_input()
    results = {c: gp.run(gp.trace(model, x, capture=c), "prune-channels{ratio=0.4}").results[0] for c in ("export", "fx")}
    masks = {c: r.projection.masks for c, r in results.items()}
    assert set(masks["export"]) == set(masks["fx"]) and masks["fx"]
    for key in masks["fx"]:
        assert np.array_equal(masks["export"][key], masks["fx"][key]), key
    ge, gf = (results[c].graph for c in ("export", "fx"))
    assert gp.graph_cost(ge).macs == gp.graph_cost(gf).macs
    assert gp.compare(ge, gf) <= RTOL


def test_functional_and_module_spellings_prune_alike() -> None:
    """F.batch_norm with module-held tensors (as timm's BatchNormAct2d does) arrives as the
    same aten op as nn.BatchNorm2d, so its channels prune; under fx they freeze."""

    class FunctionalBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(self.c1(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
            return self.c2(F.relu(y))

    model, x = randomize_(FunctionalBN()).eval(), torch.randn(2, 3, 8, 8)
    export_graph = gp.trace(model, x, capture="export")
    r = check_pass(export_graph, "prune-channels{ratio=0.5}")
    assert r.graph.shape(r.graph.find("c1").outputs[0])[1] == 8
    fx_groups = gp.analyse(gp.trace(model, x, capture="fx")).groups
    c1 = [g for g in fx_groups if any(n.label == "c1" for n in g.nodes())]
    assert c1 and all(g.frozen.all() for g in c1)
    assert any("batch_norm" in reason for g in c1 for reason in g.reasons.values())


def test_chunk_keeps_equal_parts() -> None:
    """``x.chunk(2, 1)``: the parts must keep equal counts so the code's chunk still
    splits where the pruned graph does."""

    class Chunky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 3, padding=1)
            self.out = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.c1(x).chunk(2, 1)
            return self.out(torch.cat([a, self.c2(b)], 1))

    model, x = randomize_(Chunky()).eval(), torch.randn(1, 3, 8, 8)
    for capture in ("export", "fx"):
        r = check_pass(gp.trace(model, x, capture=capture), "prune-channels{ratio=0.75}")
        kept = r.projection.masks["c1.weight"].reshape(16, -1).max(1)
        assert 0 < kept[:8].sum() == kept[8:].sum() < 8, capture
        assert np.array_equal(kept[:8], kept[8:]), capture
    gp.apply(r, model)  # the code's chunk(2) splits the narrower tensor where the graph does
    assert model.c1.out_channels == int(kept.sum())


def test_timm_fused_batchnorm_act_prunes() -> None:
    timm = pytest.importorskip("timm")
    model = randomize_(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)).eval()
    g = gp.trace(model, torch.randn(1, 3, 64, 64))
    r = gp.run(g, "prune-channels{ratio=0.3}")
    assert gp.graph_cost(r.graph).macs < 0.7 * gp.graph_cost(g).macs


def test_neither_frontend_names_both_failures() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y[y > 0].reshape(-1, 2)[: int(y.sum().item() > 0) + 1]

    with pytest.raises(gp.CaptureError) as info:
        gp.trace(DataDependent(), torch.randn(1, 3, 4, 4))
    text = str(info.value)
    assert "torch.export" in text and "torch.fx" in text and "DataDependent" in text


# ---------------------------------------------------------------- in place
@pytest.mark.parametrize("pipeline", [
    "prune-channels{ratio=0.3}", "group-convs{groups=2}", "factorize{macs=0.6}",
    "shrink-kernels{macs=0.8,per_axis=true}", "prune-channels{ratio=0.3},factorize{energy=0.9}",
])
def test_apply_edits_the_users_model(pipeline: str) -> None:
    model, x = sample_net(), sample_input()
    g = gp.trace(model, x)
    r = gp.run(g, pipeline)
    assert r.modified
    before = {k: v for k, v in model.state_dict().items()}
    out = gp.apply(r, model)
    assert out is model and type(model).__name__ == "SampleNet"
    assert gp.verify.relative_error([model(x)], r.graph.run(x)) <= RTOL
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for k, v in before.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).square().mean()
    loss.backward()  # still trains with its own forward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_apply_refuses_hard_coded_sizes_and_leaves_the_model_alone() -> None:
    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, padding=1)
            self.fc = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).view(x.shape[0], 32, -1)  # a literal channel count
            return self.fc(y.mean(2))

    model, x = randomize_(HardCoded()).eval(), torch.randn(2, 3, 8, 8)
    r = gp.run(gp.trace(model, x), "prune-channels{ratio=0.5}")
    weight = model.conv.weight
    with pytest.raises(gp.ApplyError, match=r"module ``?|view|reshape") as info:
        gp.apply(r, model)
    assert "32" in str(info.value) and "16" in str(info.value) and "to_module" in str(info.value)
    assert model.conv.weight is weight and model.conv.out_channels == 32 and model.fc.in_features == 32


def test_apply_yolov8n_detection_model() -> None:
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize_(YOLO("yolov8n.yaml").model).eval()
    x = torch.randn(1, 3, 128, 128)
    g = gp.trace(model, x)
    r = gp.run(g, "prune-channels{ratio=0.3}")
    gp.apply(r, model)
    assert isinstance(model, DetectionModel)
    after = gp.graph_cost(r.graph).macs / gp.graph_cost(g).macs
    assert after < 0.75
    got = torch.cat([t.flatten() for t in _flatten_tensors(model(x))])
    want = torch.cat([t.flatten() for t in r.graph.run(x)])
    assert float((got - want).abs().max() / want.abs().max()) <= RTOL
    model.train()
    assert model(torch.randn(2, 3, 128, 128)) is not None  # its own training forward


# --------------------------------------------------------------- save/load
def test_save_and_load_as_code_and_weights(tmp_path) -> None:
    model, x = sample_net(), sample_input()
    r = gp.run(gp.trace(model, x), "prune-channels{ratio=0.3},factorize{macs=0.7}")
    folder = gp.save(r, tmp_path / "slim")
    assert sorted(os.listdir(folder)) == ["graphprune.json", "model.py", "weights.safetensors"]
    loaded = gp.load(folder)
    assert gp.verify.relative_error([loaded(x)], r.graph.run(x)) <= RTOL
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "weights.safetensors"))
    assert set(weights) == set(loaded.state_dict())
    # a module edited in place saves the same way
    gp.apply(r, model)
    again = gp.load(gp.save(model, tmp_path / "applied", x))
    assert gp.verify.relative_error([again(x)], [model(x)]) <= RTOL


def test_load_names_a_missing_file(tmp_path) -> None:
    (tmp_path / "model.py").write_text("")
    with pytest.raises(gp.GraphError, match="weights.safetensors"):
        gp.load(tmp_path)


def test_apply_ignores_tensors_the_forward_creates() -> None:
    """torch.export lifts ``torch.tensor(...)`` made inside forward into a constant with no
    home in the model (``lifted_tensor_0``); apply must not refuse it (raft_small does this)."""

    class MakesATensor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = torch.tensor([2.0, 0.5, 1.0])
            return self.c2(F.relu(self.c1(x * scale.view(1, 3, 1, 1))))

    model, x = randomize_(MakesATensor()).eval(), torch.randn(2, 3, 8, 8)
    g = gp.trace(model, x)
    assert any(k.startswith(("lifted_tensor", "_tensor_constant", "c_lifted")) for k in g.param_keys())
    r = gp.run(g, "prune-channels{ratio=0.5}")
    gp.apply(r, model)
    assert model.c1.out_channels == 4
    assert gp.verify.relative_error([model(x)], r.graph.run(x)) <= RTOL
