"""Attention heads, channel shuffles and channel slices: MACs after ``ratio=0.3`` on the
models that need them, graphprune beside Torch-Pruning.

graphprune runs ``prune-channels{ratio=0.3}`` on a ``torch.export`` capture (heads prune
as whole heads at the same ratio, ``floor(0.3 * heads)`` per attention) and checks the
result against its projected reference.  Torch-Pruning runs ``MetaPruner`` with L1
magnitude at ``pruning_ratio=0.3``, given ``num_heads`` (every attention's qkv layer or
``nn.MultiheadAttention``) with ``prune_num_heads=True, prune_head_dims=False,
head_pruning_ratio=0.3`` as its documentation does for ViTs, the classifier ignored; the
head-count attributes are set from ``pruner.num_heads`` after ``step()``.  Torch-Pruning
has no reference to check against, so its column is not verified.  MACs of both results
are counted by graphprune's cost model on a fresh capture (one yardstick).

    python benchmarks/heads_slices.py [--models vit_b_16,deit_tiny_patch16_224,...] [--ratio 0.3]
"""
from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn

import graphprune as gp
from graphprune.cli import format_table

MODELS = ("tv:vit_b_16,timm:deit_tiny_patch16_224,tv:swin_t,tv:shufflenet_v2_x1_0,timm:ghostnet_100,"
          "timm:rexnet_100,timm:mobilevit_s")

# Why a model keeps more than 0.6 of its MACs at ratio=0.3 (what is frozen, and why).
FROZEN = {
    "vit_b_16": "residual stream: every block's LayerNorm normalises over the embedding",
    "deit_tiny_patch16_224": "residual stream (LayerNorm); 3 heads: floor(0.3*3) = 0 removed",
    "swin_t": "residual stream (LayerNorm); stage 1 has 3 heads (none removed)",
    "shufflenet_v2_x1_0": "stage streams: the shuffle ties a channel to its partner in the other half, "
                          "and chunk(2) keeps the halves equal, so the classes merge across a stage",
    "mobilevit_s": "transformer streams: LayerNorm normalises over the embedding",
}


def build(spec: str) -> tuple[nn.Module, torch.Tensor]:
    zoo, name = spec.split(":")
    torch.manual_seed(0)
    if zoo == "tv":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    size = 256 if "mobilevit" in name else 224
    return model.eval(), torch.randn(1, 3, size, size)


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    return gp.graph_cost(gp.trace(model, x), with_params=False).macs


def run_graphprune(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[float, int, float, str]:
    start = time.perf_counter()
    graph = gp.trace(model, x)
    result = gp.get_pass("prune-channels")(ratio=ratio)(graph)
    elapsed = time.perf_counter() - start
    err = gp.compare(result.graph, result.reference(), n=1)
    heads = [(r["classes"], r["kept_classes"]) for r in result.records if r.get("heads")]
    before = sum(c for c, _ in heads) + sum(  # attentions with no head removed are not in the records
        g.n_classes for g in gp.analyse(graph).groups if g.heads and g.id not in {r["group"] for r in result.records})
    after = before - sum(c - k for c, k in heads)
    macs = gp.graph_cost(result.graph, with_params=False).macs
    return elapsed, macs, err, f"{before} -> {after}" if before else "-"


def _is_head(group: gp.PruningGroup) -> bool:
    
    return group.heads


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads``: the qkv linear of timm/torchvision-Swin attention, or
    the ``nn.MultiheadAttention`` module itself."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear) and hasattr(m, "num_heads"):
            heads[m.qkv] = m.num_heads
    return heads


def _fix_heads(model: nn.Module, pruner: object) -> None:
    """After ``step()``: head counts and head dims from the pruned layers."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.num_heads = pruner.num_heads.get(m, m.num_heads)  # type: ignore[attr-defined]
            m.embed_dim = m.out_proj.in_features
            m.head_dim = m.embed_dim // m.num_heads
            m.kdim = m.vdim = m.embed_dim
        elif hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear) and hasattr(m, "num_heads"):
            m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)  # type: ignore[attr-defined]
            if hasattr(m, "head_dim"):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):  # timm >= 1.0 reshapes the merged heads to attn_dim
                m.attn_dim = m.qkv.out_features // 3


def run_torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[float, nn.Module]:
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    num_heads = _attention_heads(model)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=head,
        num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
        head_pruning_ratio=ratio if num_heads else 0.0,
    )
    pruner.step()
    _fix_heads(model, pruner)
    return time.perf_counter() - start, model


class TimedOut(Exception):
    """Torch-Pruning ran past --tp-timeout."""


def _timeout(signum: int, frame: object) -> None:
    raise TimedOut("over the time limit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--tp-timeout", type=float, default=600.0, help="seconds for Torch-Pruning per model")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _timeout)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = []
    for spec in args.models.split(","):
        name = spec.split(":")[1]
        model, x = build(spec)
        base = macs_of(model, x)
        try:
            t, macs, err, heads = run_graphprune(model, x, args.ratio)
            gp_cols = [f"{macs / base:.3f}", "yes" if err <= 1e-5 else f"NO ({err:.1e})", heads, f"{t:.1f}"]
        except Exception as exc:  # the table says what failed
            traceback.print_exc()
            gp_cols = [f"failed: {type(exc).__name__}", "-", "-", "-"]
        try:
            signal.alarm(int(args.tp_timeout))
            _, pruned = run_torch_pruning(copy.deepcopy(model), x, args.ratio)
            signal.alarm(0)
            with torch.no_grad():
                pruned(x)
            tp_col = f"{macs_of(pruned, x) / base:.3f}"
        except Exception as exc:
            signal.alarm(0)
            tp_col = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:50]}"
        frozen = FROZEN.get(name, "") if gp_cols[0][0].isdigit() and float(gp_cols[0]) > 0.6 else ""
        rows.append((name, f"{base / 1e9:.2f}", *gp_cols, tp_col, frozen))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"prune-channels ratio={args.ratio} (heads at the same ratio), L1, random weights, export capture, 1 thread")
    print(format_table(rows, ("model", "GMACs", "gp MACs after", "gp exact", "gp heads", "gp s",
                              "TP MACs after", "why gp keeps > 0.6")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
