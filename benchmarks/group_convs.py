"""Benchmark for `group-convs`: kept score mass of the permutation heuristic, and CPU
latency of grouped models with folded permutations vs explicit gathers.

Table 1 — mean kept fraction of the l2 pair-score mass over ResNet-50's convs (every
conv that G divides), for the identity grouping and the heuristic with N_S = 1 and
N_S = 10.  Random weights: pretrained weights cannot be downloaded here.  For reference,
Zhao & Luk report on *pretrained* ResNet-50 convs 52.5 / 28.3 / 15.7 % kept at
G = 2 / 4 / 8 with their heuristic vs 50.1 / 25.1 / 12.7 % with no permutation.

Table 2 — onnxruntime CPU latency (median of timed runs, batch 1) of the dense model,
the model grouped by ``group-convs{groups=G}`` with permutations folded into the
neighbouring layers, and the same grouping with every permutation left as an explicit
channel gather (``fold=false``); ratios are to the dense model.

Run: ``.venv/bin/python benchmarks/group_convs.py [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import graphprune as gp
from graphprune import blockperm
from graphprune.passes.group_convs import GroupConvs
from graphprune.samples.models import randomize_


# ------------------------------------------------------------------ kept mass
def resnet50_scores(seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    return [blockperm.normalise(blockperm.pair_scores(m.weight.detach().numpy())) for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups == 1]


def kept_table(groups: list[int]) -> str:
    scores = resnet50_scores()
    lines = [
        "Kept l2 score mass (%), mean over ResNet-50 convs that G divides "
        "(torchvision, RANDOM weights: pretrained weights cannot be downloaded here)",
        f"{'G':>3} {'convs':>5} {'identity':>9} {'N_S=1':>8} {'N_S=10':>8} {'gain':>7} {'time s':>7}",
    ]
    for G in groups:
        layers = [S for S in scores if S.shape[0] % G == 0 and S.shape[1] % G == 0]
        ident = np.mean([blockperm.identity_blocks(S, G).kept for S in layers])
        ns1 = np.mean([blockperm.heuristic_blocks(S, G, ns=1).kept for S in layers])
        start = time.perf_counter()
        ns10 = np.mean([blockperm.heuristic_blocks(S, G, ns=10).kept for S in layers])
        took = time.perf_counter() - start
        lines.append(f"{G:>3} {len(layers):>5} {100 * ident:>9.2f} {100 * ns1:>8.2f} {100 * ns10:>8.2f} "
                     f"{100 * (ns10 - ident):>+7.2f} {took:>7.2f}")
    lines.append("paper (pretrained ResNet-50): G=2/4/8 kept 52.5/28.3/15.7 (heuristic) vs 50.1/25.1/12.7 (identity)")
    return "\n".join(lines)


# -------------------------------------------------------------------- latency
def ort_latency(path: str, x: np.ndarray, runs: int, threads: int) -> float:
    """Median wall time (ms) of ``runs`` onnxruntime CPU runs after 3 warm-up runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def latency_table(arch: str, size: int, G: int, runs: int, threads: int) -> str:
    torch.manual_seed(0)
    model = randomize_(getattr(torchvision.models, arch)()).eval()
    x = torch.randn(1, 3, size, size)
    graph = gp.trace(model, x)
    folded = GroupConvs(groups=G)(graph)
    explicit = GroupConvs(groups=G, fold=False)(graph)
    for r in (folded, explicit):
        err = gp.compare(r.graph, r.reference())
        assert err <= 1e-5, f"rewrite differs from its projected reference by {err:.3g}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, g, gathers in [
            ("dense", graph, 0),
            ("grouped, folded permutations", folded.graph, sum(r["gathers"] for r in folded.records)),
            ("grouped, explicit gathers", explicit.graph, sum(r["gathers"] for r in explicit.records)),
        ]:
            path = os.path.join(tmp, f"{len(rows)}.onnx")
            g.to_onnx(path)
            ms = ort_latency(path, x.numpy(), runs, threads)
            macs = gp.graph_cost(g, with_params=False).macs
            rows.append((label, gathers, macs, ms))
    dense_ms, dense_macs = rows[0][3], rows[0][2]
    lines = [
        f"onnxruntime CPU latency, {arch} (random weights), input 1x3x{size}x{size}, groups={G}, "
        f"{threads} thread(s), median of {runs} runs",
        f"{'model':<30} {'gathers':>7} {'GMACs':>7} {'MACs ratio':>10} {'ms':>8} {'latency ratio':>13}",
    ]
    for label, gathers, macs, ms in rows:
        lines.append(f"{label:<30} {gathers:>7} {macs / 1e9:>7.3f} {macs / dense_macs:>10.3f} {ms:>8.2f} {ms / dense_ms:>13.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer group counts and timed runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    groups = [2, 4, 8] if args.quick else [2, 4, 8, 16]
    runs = 10 if args.quick else 30
    print(kept_table(groups))
    print()
    for arch in (["resnet18"] if args.quick else ["resnet18", "resnet50"]):
        print(latency_table(arch, 224, 4, runs, args.threads))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
