"""The ONNX frontend: view, shapes, edits, exactness of prune-channels on exported models,
the same decisions as the fx frontend, and what a saved file keeps.

The zoo sweep (every torchvision classification model exported to ONNX) runs under the
``zoo`` marker: ``pytest -m zoo tests/test_onnx_frontend.py``.
"""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.graph import NewNode
from graphprune.frontends.onnx import OnnxLoadError, load_onnx
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import check_pass

RTOL = 1e-5


# ------------------------------------------------------------------ helpers
def export(model: nn.Module, x: torch.Tensor, path: str, dynamic_batch: bool = False, preserve_bn: bool = False,
           opset: int = 17) -> str:
    """TorchScript export (opset 17 unless told); ``preserve_bn`` keeps BatchNormalization
    nodes (the exporter otherwise folds them into the convs in eval mode)."""
    kwargs = {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}} if dynamic_batch else {}
    if preserve_bn:
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, opset_version=opset, dynamo=False, input_names=["input"],
                          output_names=["output"], **kwargs)
    return path


def ort_run(path: str, *xs: torch.Tensor) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: np.asarray(x) for n, x in zip(names, xs)})


def rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_saved(graph: gp.Graph, path: str) -> None:
    """The saved file passes the full checker, runs in onnxruntime and matches the graph."""
    graph.to_onnx(path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    xs = graph.random_inputs(7)
    got = ort_run(path, *xs)
    want = graph.run(*xs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel(g, w) <= RTOL


class Ops(nn.Module):
    """Ops the ONNX view must describe: split, spatial pad, PReLU, per-channel constants,
    permute + rank-4 linear (MatMul + bias Add), spatial slice, squeeze/unsqueeze, reshape.
    ``fx_friendly=True`` leaves out the slice and the unsqueeze, which the fx frontend
    freezes, so both frontends see the same prunable channels."""

    def __init__(self, fx_friendly: bool = False) -> None:
        super().__init__()
        self.slice_spatial = not fx_friendly
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.prelu = nn.PReLU(8)
        self.scale = nn.Parameter(torch.randn(8, 1, 1))
        self.lin = nn.Linear(16, 12)
        self.c4 = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8 * 3 * 3 if self.slice_spatial else 8 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.c1(x), 0.1)
        a, b = torch.split(y, [8, 8], dim=1)
        a = self.c2(F.pad(a, (1, 1, 1, 1)))
        b = self.prelu(self.c3(b)) * self.scale + 0.5
        y = torch.cat([a, b], 1)
        z = self.lin(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = self.c4(torch.sigmoid(z))
        if self.slice_spatial:
            z = z[:, :, 1:, 1:]
        z = F.max_pool2d(z, 2)
        if self.slice_spatial:
            gate = torch.sigmoid(z.mean((2, 3))).unsqueeze(-1).unsqueeze(-1)
        else:
            gate = torch.sigmoid(z.mean((2, 3), keepdim=True))
        z = z * gate
        return self.fc(z.reshape(2, -1 if not self.slice_spatial else 8 * 3 * 3))


class Extra(nn.Module):
    """Instance norm, nearest upsampling (Resize), transposed conv, group norm (exported as
    reshapes around an instance norm), 'same' padding, squeeze, layer norm, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.gn = nn.GroupNorm(2, 6)
        self.c2 = nn.Conv2d(6, 10, 1, padding="same")
        self.fc = nn.Linear(10, 12)
        self.ln = nn.LayerNorm(12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.inorm(self.c1(x)))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = F.elu(self.gn(self.up(y)))
        y = F.hardsigmoid(self.c2(y))
        y = F.adaptive_avg_pool2d(y, 1).squeeze(-1).squeeze(-1)
        y = self.ln(F.dropout(torch.tanh(self.fc(y)), 0.2, training=False))
        return F.softmax(self.out(y), -1)


def ops_model(fx_friendly: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(Ops(fx_friendly)).eval()


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Exported models shared by the tests of this module (exported once)."""
    d = tmp_path_factory.mktemp("onnx")
    out = {
        "sample": export(sample_net(), sample_input(), str(d / "sample.onnx")),
        "sample_bn": export(sample_net(), sample_input(), str(d / "sample_bn.onnx"), preserve_bn=True),
        "sample_dyn": export(sample_net(), sample_input(), str(d / "sample_dyn.onnx"), dynamic_batch=True),
        "ops": export(ops_model(), torch.randn(2, 3, 8, 8), str(d / "ops.onnx")),
        "ops11": export(ops_model(), torch.randn(2, 3, 8, 8), str(d / "ops11.onnx"), opset=11),
        "extra11": export(randomize_(Extra()).eval(), torch.randn(2, 3, 8, 8), str(d / "extra11.onnx"), opset=11),
        "extra17": export(randomize_(Extra()).eval(), torch.randn(2, 3, 8, 8), str(d / "extra17.onnx")),
    }
    return out


# --------------------------------------------------------------------- view
def test_view_kinds_of_sample_net(files: dict[str, str]) -> None:
    g = load_onnx(files["sample_bn"])
    by = {n.label: n for n in g.nodes}
    stem = by["/stem/stem.0/Conv"]
    assert stem.kind == "conv" and stem.attrs["pads"] == (1, 1, 1, 1) and stem.attrs["kernel"] == (3, 3)
    assert stem.params == {"weight": "stem.0.weight"}
    assert by["/stage2/stage2.1/conv2/Conv"].attrs["groups"] == 4
    bn = by["/stem/stem.1/BatchNormalization"]
    assert bn.kind == "batchnorm" and bn.params["running_var"] == "stem.1.running_var"
    fc1 = by["/fc1/Gemm"]
    assert fc1.kind == "linear" and fc1.attrs["weight_axes"] == (0, 1) and set(fc1.params) == {"weight", "bias"}
    acts = {n.attrs["fn"]: n.attrs["zero_preserving"] for n in g.nodes if n.kind == "act"}
    assert acts["clip"] is True and acts["hardswish"] is True and acts["sigmoid"] is False and acts["erf"] is True
    assert by["/Flatten"].kind == "flatten" and by["/pool/AveragePool"].kind == "pool"
    assert {n.kind for n in g.nodes if n.target == "Constant"} == {"constant"}
    assert g.shape("/stem/stem.0/Conv_output_0") == (2, 16, 32, 32)
    assert not [n for n in g.nodes if n.kind == "unknown"]


def test_view_of_ops_model(files: dict[str, str]) -> None:
    g = load_onnx(files["ops"])
    kinds = {n.label: n.kind for n in g.nodes}
    assert kinds["/Split"] == "split" and kinds["/Pad"] == "pad"  # pads computed from constants are folded
    assert kinds["/Slice_1"] == "slice" and kinds["/Unsqueeze"] == "unsqueeze" and kinds["/Reshape_2"] == "reshape"
    lin = g.find("/lin/MatMul")
    assert lin.kind == "linear" and lin.attrs["weight_axes"] == (1, 0) and lin.params["bias"] == "lin.bias"
    assert "/lin/Add" not in kinds  # the bias Add is part of the linear view node
    mul = g.find("/Mul")
    consts = [g.producer(v) for v in mul.inputs if g.producer(v) is not None and g.producer(v).kind == "constant"]
    assert consts and consts[0].params == {"value": "scale"}
    assert g.find("/prelu/PRelu").params["weight"]
    x = torch.randn(2, 3, 8, 8)
    assert rel(g.run(x)[0], ops_model()(x).detach()) <= RTOL


def test_view_of_extra_model(files: dict[str, str]) -> None:
    for key in ("extra11", "extra17"):
        g = load_onnx(files[key])
        kinds = {n.target: n.kind for n in g.nodes}
        assert kinds["InstanceNormalization"] == "batchnorm" and kinds["ConvTranspose"] == "conv_transpose"
        assert kinds["Resize"] == "pool" and kinds["Squeeze"] == "squeeze" and kinds["Softmax"] == "softmax"
        assert kinds["HardSigmoid"] == "act" and g.find("/c2/Conv").attrs["pads"] == (0, 0, 0, 0)
        # the exported group norm reshapes back to a shape computed at run time: frozen, with the reason
        assert any(t.startswith("Reshape: its target shape input is computed") for t in kinds)
        prunable = {n.label for grp in gp.analyse(g).groups if grp.prunable.any() for n in grp.nodes()}
        assert {"/c1/Conv", "/up/ConvTranspose", "/c2/Conv", "/fc/Gemm"} <= prunable


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("key", ["sample", "sample_bn", "ops", "ops11", "extra11", "extra17"])
def test_prune_channels_exact(files: dict[str, str], key: str, tmp_path) -> None:
    g = load_onnx(files[key])
    result = check_pass(g, "prune-channels{ratio=0.3}")
    check_saved(result.graph, str(tmp_path / "out.onnx"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_prune_channels_exact_torchvision(name: str, tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = randomize_(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    path = export(model, torch.randn(1, 3, 64, 64), str(tmp_path / f"{name}.onnx"), dynamic_batch=True)
    g = load_onnx(path, {"input": (2, 3, 64, 64)})
    result = gp.get_pass("prune-channels")(ratio=0.3)(g)
    assert result.modified
    assert gp.compare(result.graph, result.reference(), n=2) <= RTOL
    assert gp.graph_cost(result.graph).macs < 0.8 * gp.graph_cost(g).macs
    check_saved(result.graph, str(tmp_path / "out.onnx"))


def test_lossless_on_planted_zero_channels(tmp_path) -> None:
    """Zeroed BN scale and shift make a channel identically zero; the folded export has
    zero filters and biases there, and the lossless pass removes exactly those."""
    model = sample_net()
    planted = ((model.stage1[0].bn1, [1, 5, 9]), (model.stage1[1].bn1, [2]), (model.stage2[0].bn1, [0, 3, 30]))
    with torch.no_grad():
        for bn, idx in planted:
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
    path = export(model, sample_input(), str(tmp_path / "planted.onnx"))
    g = load_onnx(path)
    result = check_pass(g, "prune-channels{lossless=true}")
    assert gp.compare(result.graph, g, n=3) <= RTOL
    before, after = gp.graph_cost(g), gp.graph_cost(result.graph)
    assert after.macs < before.macs
    removed = sum(r["classes"] - r["kept_classes"] for r in result.records)
    assert removed == sum(len(idx) for _, idx in planted)


# ------------------------------------------------------- one decision, two frontends
def _same_decision(model: nn.Module, x: torch.Tensor, path: str, preserve_bn: bool) -> None:
    fx_graph = gp.trace(model, x)
    onnx_graph = load_onnx(export(model, x, path, preserve_bn=preserve_bn))
    fx_res = gp.get_pass("prune-channels")(ratio=0.3)(fx_graph)
    onnx_res = gp.get_pass("prune-channels")(ratio=0.3)(onnx_graph)
    common = set(fx_res.projection.masks) & set(onnx_res.projection.masks)
    assert len(common) >= 0.8 * len(fx_res.projection.masks)  # exporter-renamed tensors aside
    for key in common:
        assert np.array_equal(fx_res.projection.masks[key], onnx_res.projection.masks[key]), key
        assert np.array_equal(fx_res.graph.param(key), onnx_res.graph.param(key)), key
    assert rel(onnx_res.graph.run(x)[0], fx_res.graph.run(x)[0]) <= RTOL
    # per weighted layer, the same number of output channels survives
    fx_kept = sorted(tuple(fx_res.graph.param(n.params["weight"]).shape) for n in fx_res.graph.nodes if n.kind == "conv")
    onnx_kept = sorted(tuple(onnx_res.graph.param(n.params["weight"]).shape) for n in onnx_res.graph.nodes if n.kind == "conv")
    assert fx_kept == onnx_kept


def test_one_decision_two_frontends_with_batchnorm(tmp_path) -> None:
    """With BatchNormalization kept in the export (TrainingMode.PRESERVE), the ONNX view
    shows the same weights as the module, so both frontends choose the same channels.
    (The default eval export folds BN into the convs: the L1 criterion then scores
    gamma/sigma-scaled filters and legitimately picks other channels.)"""
    _same_decision(sample_net(), sample_input(), str(tmp_path / "s.onnx"), preserve_bn=True)


def test_one_decision_two_frontends_without_batchnorm(tmp_path) -> None:
    _same_decision(ops_model(fx_friendly=True), torch.randn(2, 3, 8, 8), str(tmp_path / "o.onnx"), preserve_bn=False)


# ---------------------------------------------------------- shapes and inputs
def test_dynamic_input_needs_a_shape(files: dict[str, str]) -> None:
    with pytest.raises(OnnxLoadError) as info:
        load_onnx(files["sample_dyn"])
    msg = str(info.value)
    assert "`input`" in msg and "--input-shape input:N,3,32,32" in msg
    g = load_onnx(files["sample_dyn"], {"input": (3, 3, 32, 32)})
    assert g.shape("input") == (3, 3, 32, 32) and g.example_inputs()[0].shape == (3, 3, 32, 32)
    with pytest.raises(OnnxLoadError, match="fixed size 3 on axis 1"):
        load_onnx(files["sample_dyn"], {"input": (3, 4, 32, 32)})
    with pytest.raises(OnnxLoadError, match="no such input"):
        load_onnx(files["sample_dyn"], {"image": (3, 3, 32, 32)})


def test_saved_file_keeps_names_opset_metadata_and_dynamic_dims(files: dict[str, str], tmp_path) -> None:
    src = str(tmp_path / "in.onnx")
    model = onnx.load(files["sample_dyn"])
    model.doc_string = "my model"
    model.graph.doc_string = "the graph"
    onnx.helper.set_model_props(model, {"author": "me", "license": "MIT"})
    onnx.save(model, src)
    digest = sha(src)
    g = load_onnx(src, {"input": (2, 3, 32, 32)})
    result = gp.get_pass("prune-channels")(ratio=0.5)(g)
    out = str(tmp_path / "out.onnx")
    result.graph.to_onnx(out)
    assert sha(src) == digest
    saved = onnx.load(out)
    assert [(o.domain, o.version) for o in saved.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert saved.ir_version == model.ir_version and saved.producer_name == model.producer_name
    assert saved.graph.name == model.graph.name and saved.graph.doc_string == "the graph" and saved.doc_string == "my model"
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "me", "license": "MIT"}
    assert [i.name for i in saved.graph.input] == ["input"] and [o.name for o in saved.graph.output] == ["output"]
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert saved.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(saved.graph.value_info) == 0
    # the dynamic batch really works in the output
    assert ort_run(out, torch.randn(5, 3, 32, 32))[0].shape == (5, 10)
    with pytest.raises(OnnxLoadError, match="overwrite the input"):
        result.graph.to_onnx(src)


def test_external_data_round_trip(files: dict[str, str], tmp_path) -> None:
    g = load_onnx(files["sample"])
    out = str(tmp_path / "ext.onnx")
    g.to_onnx(out, external_data=True)
    assert os.path.exists(out + ".data") and os.path.getsize(out) < 20_000
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(out + ".data", moved / "ext.onnx.data")
    with pytest.raises(OnnxLoadError):
        load_onnx(out)
    again = load_onnx(out, external_data_dir=str(moved))
    x = sample_input()
    assert rel(again.run(x)[0], g.run(x)[0]) == 0.0


def test_unsaved_model_round_trips_to_same_initializers(tmp_path) -> None:
    """Exporter-shared tensors (Identity of an initializer) are split for analysis and
    merged again on save when nothing changed them."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    path = export(model, torch.randn(1, 3, 12, 12), str(tmp_path / "shared.onnx"), preserve_bn=True)
    original = onnx.load(path)
    assert any(n.op_type == "Identity" for n in original.graph.node)
    g = load_onnx(path)
    bns = [n for n in g.nodes if n.kind == "batchnorm"]
    assert len({k for n in bns for k in n.params.values()}) == 8  # every BN owns its tensors now
    assert gp.analyse(g).groups[0].prunable.any()
    out = str(tmp_path / "same.onnx")
    g.to_onnx(out)
    saved = onnx.load(out)
    assert len(saved.graph.initializer) == len({i.name for i in original.graph.initializer})
    result = gp.get_pass("prune-channels")(ratio=0.5)(g)
    check_saved(result.graph, str(tmp_path / "pruned.onnx"))


# ---------------------------------------------------------- frozen and unknown
def _conv_node(name: str, x: str, y: str, w: str, b: str | None = None, **attrs: object) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def _init(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def custom_op_model(domain: str, op: str) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> <domain::op> -> conv3."""
    nodes = [
        _conv_node("conv1", "x", "a", "w1", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        _conv_node("conv2", "r", "c", "w2", "b2"),
        helper.make_node(op, ["c"], ["d"], name="custom", domain=domain),
        _conv_node("conv3", "d", "y", "w3"),
    ]
    inits = [_init("w1", (8, 3, 3, 3), 0), _init("b1", (8,), 1), _init("w2", (8, 8, 1, 1), 2), _init("b2", (8,), 3),
             _init("w3", (4, 8, 1, 1), 4)]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_contrib_op_is_frozen_but_the_rest_prunes(tmp_path) -> None:
    """com.microsoft::Gelu: onnxruntime runs it, ONNX shape inference does not know it
    (its shape is measured), it has no channel rule (frozen), conv1 still prunes."""
    g = load_onnx(custom_op_model("com.microsoft", "Gelu"))
    node = g.find("custom")
    assert node.kind == "unknown" and "custom-domain op `com.microsoft::Gelu`" in node.target
    assert g.shape("d") == (1, 8, 8, 8)
    reasons = gp.analyse(g).frozen_reasons()
    assert any("com.microsoft::Gelu" in r for r in reasons.values())
    result = check_pass(g, "prune-channels{ratio=0.5}")
    assert result.graph.param("w1").shape[0] == 4 and result.graph.param("w2").shape[0] == 8
    check_saved(result.graph, str(tmp_path / "contrib.onnx"))


def test_unrunnable_custom_op_still_loads_frozen() -> None:
    g = load_onnx(custom_op_model("my.company", "Mystery"))
    assert g.find("custom").kind == "unknown"
    assert g.find("conv3").kind == "unknown" and "unknown" in g.find("conv3").target  # shape after it unknown
    with pytest.raises(OnnxLoadError, match="onnxruntime cannot run"):
        g.run(*g.example_inputs())


def test_weight_from_graph_input_is_unknown_with_reason() -> None:
    nodes = [_conv_node("conv", "x", "y", "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    g = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    node = g.find("conv")
    assert node.kind == "unknown" and "weight `w` is a graph input" in node.target


def gemm_model(trans_b: int, alpha: float = 1.0) -> onnx.ModelProto:
    """x (2, 6) -> Gemm(transB) -> Relu -> MatMul(const (5, 4)) + b -> Sigmoid -> Gemm -> y."""
    w1 = (5, 6) if trans_b else (6, 5)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm", transB=trans_b, alpha=alpha),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b2"], ["a"], name="bias"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
        helper.make_node("Gemm", ["s", "w3"], ["y"], name="head", transB=1),
    ]
    inits = [_init("w1", w1, 0), _init("b1", (5,), 1), _init("w2", (5, 4), 2), _init("b2", (4,), 3), _init("w3", (3, 4), 4)]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb_and_matmul_weight_axes(trans_b: int, tmp_path) -> None:
    g = load_onnx(gemm_model(trans_b))
    gemm, mm = g.find("gemm"), g.find("matmul")
    assert gemm.kind == "linear" and gemm.attrs["weight_axes"] == ((0, 1) if trans_b else (1, 0))
    assert mm.kind == "linear" and mm.attrs["weight_axes"] == (1, 0) and mm.params == {"weight": "w2", "bias": "b2"}
    result = check_pass(g, "prune-channels{ratio=0.4}")
    assert result.graph.param("w1").shape == ((3, 6) if trans_b else (6, 3))
    assert result.graph.param("w2").shape == (3, 3) and result.graph.param("b2").shape == (3,)
    check_saved(result.graph, str(tmp_path / "gemm.onnx"))


def test_gemm_with_alpha_is_unknown() -> None:
    node = load_onnx(gemm_model(1, alpha=2.0)).find("gemm")
    assert node.kind == "unknown" and "alpha" in node.target


def test_not_an_onnx_file(tmp_path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(OnnxLoadError, match="not a valid ONNX file"):
        load_onnx(str(text))
    with pytest.raises(FileNotFoundError):
        load_onnx(str(tmp_path / "missing.onnx"))


# --------------------------------------------------------------------- edits
def test_replace_node_and_insert_gather(files: dict[str, str]) -> None:
    g = load_onnx(files["sample"])
    x = sample_input()
    want = g.run(x)[0]
    conv = g.find("/branch_a/Conv")
    w, b = torch.from_numpy(g.node_param(conv, "weight")), torch.from_numpy(g.node_param(conv, "bias"))
    # conv = 1x1 conv to 2x the filters followed by a 1x1 conv that sums pairs: exact
    eye = torch.cat([torch.eye(w.shape[1]), torch.eye(w.shape[1])])[..., None, None]
    first = NewNode("conv", [conv.inputs[0]], {"stride": (1, 1), "pads": (0, 0, 0, 0)}, {"weight": eye})
    half = 0.5 * w.reshape(w.shape[0], -1)
    second = NewNode("conv", ["%0"], {"stride": (1, 1), "pads": (0, 0, 0, 0)},
                     {"weight": torch.cat([half, half], 1)[..., None, None], "bias": b})
    g.replace_node(conv, [first, second])
    g.commit()
    assert rel(g.run(x)[0], want) <= RTOL
    assert conv.outputs[0] in {v for n in g.nodes for v in n.outputs}
    # a gather that permutes channels and a consumer that permutes its weight back
    fc = g.find("/fc2/Gemm")
    perm = torch.randperm(g.shape(fc.inputs[0])[1], generator=torch.Generator().manual_seed(0))
    g.insert_gather(fc.inputs[0], 1, perm.tolist(), [fc])
    g.set_param(fc.params["weight"], g.node_param(fc, "weight")[:, perm.numpy()])
    g.commit()
    assert any(n.kind == "gather" for n in g.nodes)
    assert rel(g.run(x)[0], want) <= RTOL


class Gathered(nn.Module):
    """Conv output channels reordered by a constant index (a folded permutation)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
        self.register_buffer("order", torch.tensor([5, 0, 3, 1, 4, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.index_select(self.a(x), 1, self.order))


def test_constant_index_gather_prunes_and_renumbers(tmp_path) -> None:
    torch.manual_seed(0)
    g = load_onnx(export(randomize_(Gathered()).eval(), torch.randn(2, 3, 4, 4), str(tmp_path / "gather.onnx")))
    gather = next(n for n in g.nodes if n.target == "Gather")
    assert gather.kind == "gather" and gather.attrs["axis"] == 1
    result = check_pass(g, "prune-channels{ratio=0.5}")
    assert result.graph.param("a.weight").shape[0] == 3
    index = result.graph.node_param(g.producer(gather.inputs[1]), "value")
    assert sorted(index.tolist()) == [0, 1, 2]
    check_saved(result.graph, str(tmp_path / "gather_out.onnx"))


def test_replace_linear_rank3_emits_matmul_add(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    x = torch.randn(2, 3, 6)
    g = load_onnx(export(model, x, str(tmp_path / "mlp.onnx")))
    want = g.run(x)[0]
    lin = next(n for n in g.nodes if n.kind == "linear")
    w, b = torch.from_numpy(g.node_param(lin, "weight")), torch.from_numpy(g.node_param(lin, "bias"))
    if lin.attrs.get("weight_axes") == (1, 0):
        w = w.t()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    g.replace_node(lin, [NewNode("linear", [lin.inputs[0]], {}, {"weight": vh}),
                         NewNode("linear", ["%0"], {}, {"weight": u * s, "bias": b})])
    g.commit()
    assert [n.target for n in g.nodes if n.kind == "linear"][:2] == ["MatMul", "MatMul"]
    assert rel(g.run(x)[0], want) <= RTOL
    check_saved(g, str(tmp_path / "mlp_out.onnx"))


# ---------------------------------------------------------------------- zoo
def zoo_check(name: str, tmp_path, dynamo: bool = False) -> None:
    """Export a torchvision model (random weights), prune 30% of channels on the ONNX view,
    check exactness, the saved file and the MAC drop."""
    import torchvision

    from test_zoo import build, input_size

    # the TorchScript exporter only exports adaptive pooling whose output size divides its input
    size = 224 if name.startswith(("alexnet", "vgg")) else input_size(name)
    model = build(name)
    x = torch.randn(1, 3, size, size)
    path = str(tmp_path / f"{name}.onnx")
    if dynamo:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18, verbose=False)
        except Exception as exc:  # the exporter's limits, not graphprune's
            pytest.skip(f"the dynamo exporter cannot export {name}: {str(exc).splitlines()[0][:200]}")
    else:
        export(model, x, path)
    g = load_onnx(path)
    result = gp.get_pass("prune-channels")(ratio=0.3)(g)
    assert result.modified, f"{name}: nothing pruned"
    err = gp.compare(result.graph, result.reference(), n=1)
    assert err <= RTOL, f"{name}: error {err:.3g} against the projected reference"
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(g).macs
    check_saved(result.graph, str(tmp_path / f"{name}_out.onnx"))


def _zoo_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@pytest.mark.zoo
@pytest.mark.parametrize("name", _zoo_names())
def test_onnx_zoo_torchscript(name: str, tmp_path) -> None:
    zoo_check(name, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("name", _zoo_names())
def test_onnx_zoo_dynamo(name: str, tmp_path) -> None:
    zoo_check(name, tmp_path, dynamo=True)


# ------------------------------------------------------------------ auto_pad
def _low_rank(rng: np.random.Generator, shape: tuple[int, int, int, int], rank: int, scheme: str) -> np.ndarray:
    """An exactly rank-``rank`` weight in the factorize layout ``scheme``: channel
    (F, C*kh*kw), spatial (C*kh, kw*F)."""
    f, c, kh, kw = shape
    rows, cols = (f, c * kh * kw) if scheme == "channel" else (c * kh, kw * f)
    m = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    w = m.reshape(shape) if scheme == "channel" else m.reshape(c, kh, kw, f).transpose(3, 0, 1, 2)
    return np.ascontiguousarray(w, dtype=np.float32)


def same_pad_model(auto_pad: str, scheme: str) -> onnx.ModelProto:
    """Two convs with ``auto_pad`` and odd total padding on a 10x10 input:
    ``c1`` k=4 stride 1 (total 3 per axis), ``c2`` k=(3,5) stride 2 (totals 1 and 3).
    Both weights are exactly rank 2, so factorize{lossless} replaces both."""
    rng = np.random.default_rng(3)
    w1 = _low_rank(rng, (8, 4, 4, 4), 2, scheme)
    w2 = _low_rank(rng, (8, 8, 3, 5), 2, scheme)
    b1 = rng.standard_normal(8).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1", kernel_shape=[4, 4], auto_pad=auto_pad),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[3, 5], strides=[2, 2], auto_pad=auto_pad),
    ]
    graph = helper.make_graph(
        nodes, "same",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("auto_pad, pads1, pads2", [
    # ONNX: SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning
    ("SAME_UPPER", (1, 1, 2, 2), (0, 1, 1, 2)),
    ("SAME_LOWER", (2, 2, 1, 1), (1, 2, 0, 1)),
])
def test_auto_pad_same_resolved_to_explicit_pads(auto_pad: str, pads1: tuple, pads2: tuple) -> None:
    g = gp.load_onnx(same_pad_model(auto_pad, "channel"))
    assert tuple(g.find("c1").attrs["pads"]) == pads1
    assert tuple(g.find("c2").attrs["pads"]) == pads2


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_factorized_matches_onnxruntime_on_the_original(auto_pad: str, scheme: str, tmp_path) -> None:
    model = same_pad_model(auto_pad, scheme)
    src = str(tmp_path / "same.onnx")
    onnx.save(model, src)
    g = gp.load_onnx(src)
    result = gp.run(g, f"factorize{{lossless=true,scheme={scheme}}}")  # verified against the reference
    assert sorted(rec["layer"] for rec in result.results[0].records) == ["c1", "c2"]
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 4, 10, 10)).astype(np.float32))
    want = ort_run(src, x)[0]
    assert rel(result.graph.run(x)[0], want) <= RTOL
    out = str(tmp_path / "same-factorized.onnx")
    result.graph.to_onnx(out)
    assert rel(ort_run(out, x)[0], want) <= RTOL


# -------------------------------------------------------- shared initializers
def shared_weight_model() -> onnx.ModelProto:
    """Convs ``a`` and ``b`` read one initializer ``W`` (as exporters share equal tensors).
    ``a`` writes a residual stream with ``p``, whose large filters 0 and 1 pull the stream's
    ranking away from ``W``'s; ``b`` writes a group of its own, ranked by ``W`` alone.  So
    prune-channels keeps 4 of 8 filters of each copy of ``W``: same shape, other rows."""
    rng = np.random.default_rng(11)

    def filters(scales: list[float], c: int = 4) -> np.ndarray:
        signs = rng.choice([-1.0, 1.0], size=(len(scales), c, 3, 3))
        return (signs * np.array(scales).reshape(-1, 1, 1, 1)).astype(np.float32)

    w = filters([1, 2, 3, 4, 5, 6, 7, 8])
    p = filters([10, 9, 1, 1, 1, 1, 1, 1])
    v1, v2 = (rng.standard_normal((3, 8, 1, 1)).astype(np.float32) for _ in range(2))
    conv = lambda name, x, wname, y: helper.make_node("Conv", [x, wname], [y], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # noqa: E731
    nodes = [
        conv("a", "x", "W", "ya"), conv("p", "x", "P", "yp"),
        helper.make_node("Add", ["ya", "yp"], ["s0"], name="add"), helper.make_node("Relu", ["s0"], ["s"], name="relu_s"),
        helper.make_node("Conv", ["s", "V1"], ["out1"], name="head1", kernel_shape=[1, 1]),
        conv("b", "x", "W", "yb"), helper.make_node("Relu", ["yb"], ["t"], name="relu_t"),
        helper.make_node("Conv", ["t", "V2"], ["out2"], name="head2", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 3, 6, 6]) for o in ("out1", "out2")],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (p, "P"), (v1, "V1"), (v2, "V2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_shared_initializer_edited_differently_then_saved(tmp_path) -> None:
    src = str(tmp_path / "shared.onnx")
    onnx.save(shared_weight_model(), src)
    g = gp.load_onnx(src)
    result = gp.run(g, "prune-channels{ratio=0.5}")
    r = result.results[0]
    kept = {}
    for rec in r.records:
        for key, idx in rec["kept"].items():
            kept[key] = idx
    assert kept["ya:1"] != kept["yb:1"] and len(kept["ya:1"]) == len(kept["yb:1"]) == 4, kept
    out = str(tmp_path / "shared-pruned.onnx")
    result.graph.to_onnx(out)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    xs = g.random_inputs(3)
    got = ort_run(out, *xs)
    in_memory = result.graph.run(*xs)
    reference = r.reference().run(*xs)
    assert len(got) == 2
    for name, a, b, c in zip(("out1", "out2"), got, in_memory, reference):
        assert rel(b, c) <= RTOL, f"{name}: in-memory graph differs from the reference"
        assert rel(a, c) <= RTOL, f"{name}: the saved file differs from the reference"


def test_shared_initializer_stays_shared_when_edited_alike(tmp_path) -> None:
    """Unchanged copies are merged back on save: the file keeps one `W`."""
    src = str(tmp_path / "shared.onnx")
    onnx.save(shared_weight_model(), src)
    g = gp.load_onnx(src)
    out = str(tmp_path / "same.onnx")
    g.to_onnx(out)
    saved = onnx.load(out)
    assert sorted(i.name for i in saved.graph.initializer) == ["P", "V1", "V2", "W"]
    xs = g.random_inputs(1)
    for a, b in zip(ort_run(out, *xs), ort_run(src, *xs)):
        assert rel(a, b) <= RTOL
