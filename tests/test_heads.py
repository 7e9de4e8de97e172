"""Attention heads prune as whole heads: q/k/v or a fused in-projection, reshape to heads,
``F.scaled_dot_product_attention`` or matmul-softmax-matmul, merge, out-projection;
``nn.MultiheadAttention``, timm's ``Attention`` and Hugging Face BERT/ViT as they appear in
the exported graph, and the ONNX exports of the same.  The head counts in the reshapes
follow; grouped-query attention keeps its grouping; ``heads=`` prunes heads separately."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.coupling import analyse
from helpers import check_pass
from test_onnx_frontend import export, ort_run, rel


class Attn(nn.Module):
    """Separate q/k/v projections, ``heads`` query heads over ``kv_heads`` key/value heads."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int | None = None, fused: bool = True) -> None:
        super().__init__()
        self.h, self.hkv, self.d, self.fused = heads, kv_heads or heads, dim // heads, fused
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.hkv * self.d)
        self.v = nn.Linear(dim, self.hkv * self.d)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.hkv != self.h)
        else:
            if self.hkv != self.h:
                k = k.repeat_interleave(self.h // self.hkv, dim=1)
                v = v.repeat_interleave(self.h // self.hkv, dim=1)
            y = torch.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5, dim=-1) @ v
        y = self.o(y.transpose(1, 2).reshape(b, n, -1))
        return self.mlp(torch.relu(y)) + x


class QKV(nn.Module):
    """timm's layout: one fused qkv projection, reshape (B, N, 3, H, d), permute, unbind."""

    def __init__(self, dim: int = 24, heads: int = 6) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class MHA(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.attn(y, y, y, need_weights=False)[0] + x


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()


def _head_groups(graph: gp.Graph) -> list[gp.PruningGroup]:
    return [g for g in analyse(graph).groups if g.heads]


def _heads_in_reshapes(graph: gp.Graph, head_dim: int) -> set[int]:
    """Head counts: the axis before ``head_dim`` in every 4-D reshape/view output."""
    out = set()
    for n in graph.nodes:
        shape = graph.shape(n.outputs[0]) if n.outputs and n.outputs[0] else None
        if n.kind == "reshape" and shape is not None and len(shape) == 4 and shape[-1] == head_dim:
            out.add(shape[2])
    return out


@pytest.mark.parametrize("heads", [2, 4, 6])
@pytest.mark.parametrize("fused", [True, False])
def test_heads_prune_whole_and_exactly(heads: int, fused: bool) -> None:
    dim = 24
    model = _seeded(Attn(dim, heads, fused=fused), seed=heads)
    graph = gp.trace(model, torch.randn(1, 5, dim))
    (group,) = _head_groups(graph)
    assert group.n_classes == heads and group.prunable.all()
    q_classes = group.class_of[gp.Port(graph.find("q").outputs[0], 2)]
    assert q_classes.tolist() == [c // (dim // heads) for c in range(dim)]
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    kept = heads - heads // 2
    d = dim // heads
    for name in ("q", "k", "v"):
        assert result.graph.param(f"{name}.weight").shape[0] == kept * d
    assert result.graph.param("o.weight").shape[1] == kept * d
    assert _heads_in_reshapes(result.graph, d) == {kept}


def test_the_weakest_heads_go() -> None:
    """Heads 1 and 3 of 4 have tiny q/k/v rows: they are the ones removed."""
    model = _seeded(Attn(24, 4))
    with torch.no_grad():
        for lin in (model.q, model.k, model.v):
            for h in (1, 3):
                lin.weight[h * 6:(h + 1) * 6] *= 1e-3
    graph = gp.trace(model, torch.randn(1, 5, 24))
    result = check_pass(graph, "prune-channels{heads=0.5}")
    (rec,) = [r for r in result.records if r["heads"]]
    assert rec["kept_classes"] == 2
    assert rec["kept"][f"{graph.find('q').outputs[0]}:2"] == list(range(0, 6)) + list(range(12, 18))
    # heads= alone leaves the MLP and the residual stream alone
    assert result.graph.param("mlp.weight").shape == (24, 24)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (6, 3), (8, 4)])
def test_gqa_keeps_its_grouping(heads: int, kv_heads: int) -> None:
    dim = 48
    model = _seeded(Attn(dim, heads, kv_heads), seed=heads + kv_heads)
    graph = gp.trace(model, torch.randn(1, 5, dim))
    (group,) = _head_groups(graph)
    assert group.n_classes == kv_heads, "a class is one key/value head with its query heads"
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    d, rep = dim // heads, heads // kv_heads
    kv_kept = kv_heads - kv_heads // 2
    assert result.graph.param("k.weight").shape[0] == kv_kept * d
    assert result.graph.param("q.weight").shape[0] == kv_kept * rep * d


@pytest.mark.parametrize("heads", [3, 6])
def test_fused_qkv_splits_into_heads(heads: int) -> None:
    model = _seeded(QKV(24, heads), seed=heads)
    graph = gp.trace(model, torch.randn(1, 7, 24))
    (group,) = _head_groups(graph)
    assert group.n_classes == heads
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    kept = heads - heads // 2
    assert result.graph.param("qkv.weight").shape[0] == 3 * kept * (24 // heads)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_module(batch_first: bool) -> None:
    model = _seeded(MHA(24, 4, batch_first))
    graph = gp.trace(model, torch.randn(1, 5, 24) if batch_first else torch.randn(5, 1, 24))
    (group,) = _head_groups(graph)
    assert group.n_classes == 4
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    assert result.graph.param("attn.in_proj_weight").shape[0] == 3 * 2 * 6
    assert result.graph.param("attn.out_proj.weight").shape[1] == 2 * 6


def test_timm_attention_both_paths() -> None:
    from timm.models.vision_transformer import Attention

    for fused in (True, False):
        model = _seeded(Attention(32, num_heads=4, qkv_bias=True))
        model.fused_attn = fused
        graph = gp.trace(model, torch.randn(1, 9, 32))
        (group,) = _head_groups(graph)
        assert group.n_classes == 4
        result = check_pass(graph, "prune-channels{ratio=0.5}")
        assert result.graph.param("qkv.weight").shape[0] == 3 * 2 * 8


def test_hf_bert_heads() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    graph = gp.trace(model, torch.randint(0, 64, (1, 8)))
    assert len(_head_groups(graph)) == 2
    result = check_pass(graph, "prune-channels{ratio=0.5}")
    attn = "encoder.layer.0.attention.self"
    assert result.graph.param(f"{attn}.query.weight").shape[0] == 16


def test_hf_vit_heads() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=48)
    model = transformers.ViTModel(cfg).eval()
    graph = gp.trace(model, torch.randn(1, 3, 16, 16))
    (group,) = _head_groups(graph)
    assert group.n_classes == 4
    result = check_pass(graph, "prune-channels{heads=0.5}")
    (key,) = [k for k in result.graph.param_keys() if k.endswith(("k_proj.weight", "key.weight"))]
    assert result.graph.param(key).shape == (16, 32)  # 2 of 4 heads of 8 dims, input width intact


def _timm_attention() -> nn.Module:
    from timm.models.vision_transformer import Attention

    model = Attention(24, num_heads=4, qkv_bias=True)
    model.fused_attn = False  # the TorchScript exporter rejects timm's tensor is_causal
    return model


@pytest.mark.parametrize("model_fn", [lambda: Attn(24, 4, fused=False), lambda: Attn(24, 6, fused=False), lambda: QKV(24, 6),
                                      _timm_attention])
def test_heads_prune_exactly_on_onnx(tmp_path, model_fn) -> None:
    """TorchScript ONNX exports (sdpa becomes MatMul-Softmax-MatMul, unbind a Split into
    single slices).  ``nn.MultiheadAttention``'s export computes its qkv reshape target from
    ``Shape`` at run time, so it stays frozen in ONNX (see the README)."""
    model = _seeded(model_fn())
    x = torch.randn(1, 5, 24)
    path = export(model, x, os.fspath(tmp_path / "m.onnx"))
    graph = gp.load_onnx(path)
    groups = _head_groups(graph)
    assert groups and all(g.prunable.any() for g in groups)
    before = gp.graph_cost(graph).macs
    result = check_pass(graph, "prune-channels{heads=0.5}")
    assert gp.graph_cost(result.graph).macs < before
    out = os.fspath(tmp_path / "out.onnx")
    result.graph.to_onnx(out)
    assert rel(ort_run(out, x)[0], result.reference().run(x)[0]) < 1e-5


def test_heads_option_is_validated() -> None:
    with pytest.raises(gp.PassOptionError):
        gp.parse_pipeline("prune-channels{heads=1.5}")[0].validate()
    with pytest.raises(gp.PassOptionError):
        gp.parse_pipeline("prune-channels{heads=0.3,lossless=true}")[0].validate()


def test_apply_sets_timm_head_counts() -> None:
    """``gp.apply`` edits a timm ``Attention`` in place: weights, ``num_heads``, ``attn_dim``."""
    from timm.models.vision_transformer import Attention

    model = _seeded(Attention(32, num_heads=4, qkv_bias=True))
    x = torch.randn(1, 9, 32)
    result = gp.get_pass("prune-channels")(heads=0.5)(gp.trace(model, x))
    gp.apply(result, model)
    assert model.num_heads == 2 and model.attn_dim == 16 and model.qkv.out_features == 48
    assert rel(model(x).detach(), result.reference().run(x)[0]) < 1e-5
