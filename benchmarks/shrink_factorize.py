"""shrink-kernels and factorize: MACs ratio against measured onnxruntime CPU latency ratio.

For each model (torchvision, random weights) and each pipeline, the pass runs on the fx
graph, the result is checked against its projected reference, and both the original
and the rewritten graph are exported with ``Graph.to_onnx`` and timed in onnxruntime on
CPU.  Timing interleaves the two sessions round by round (each round: ``--iters`` runs of
each), so drifting machine load hits both alike; the latency ratio is the median over
rounds of (rewritten time / original time).  A budget that the pass cannot meet is
reported as such, with the smallest MACs ratio the pass can reach.  "exact": the fx rewrite matches its projected reference within 1e-5
and the exported ONNX model run by onnxruntime within 1e-4 (onnxruntime fuses and
reorders float operations).

    python benchmarks/shrink_factorize.py [--models resnet18,mobilenet_v2,resnet50]
        [--pipelines "factorize{macs=0.5};shrink-kernels{macs=0.8}"] [--size 224]
        [--rounds 7] [--iters 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import graphprune as gp
from graphprune.cli import format_table
from graphprune.samples.models import randomize_

DEFAULT_MODELS = "resnet18,mobilenet_v2,resnet50"
DEFAULT_PIPELINES = ";".join([
    "shrink-kernels{macs=0.95}",
    "shrink-kernels{macs=0.75,per_axis=true}",
    "factorize{macs=0.75}",
    "factorize{macs=0.5}",
    "factorize{macs=0.5,scheme=spatial}",
    "shrink-kernels{macs=0.95},factorize{macs=0.6}",
])


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(torchvision.models.get_model(name, weights=None)).eval()


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def export(graph: gp.Graph, folder: str, tag: str, threads: int) -> ort.InferenceSession:
    path = os.path.join(folder, f"{tag}.onnx")
    graph.to_onnx(path)
    return session(path, threads)


def timed(sess: ort.InferenceSession, feed: dict[str, np.ndarray], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        sess.run(None, feed)
    return (time.perf_counter() - start) / iters


def latency_ratio(base: ort.InferenceSession, new: ort.InferenceSession, x: np.ndarray, rounds: int, iters: int) -> tuple[float, float]:
    """(median of per-round time ratios new/base, median base latency in ms)."""
    feed_b = {base.get_inputs()[0].name: x}
    feed_n = {new.get_inputs()[0].name: x}
    timed(base, feed_b, 2)  # warm-up
    timed(new, feed_n, 2)
    ratios, base_times = [], []
    for i in range(rounds):
        if i % 2:  # alternate the order inside a round too
            tn, tb = timed(new, feed_n, iters), timed(base, feed_b, iters)
        else:
            tb, tn = timed(base, feed_b, iters), timed(new, feed_n, iters)
        ratios.append(tn / tb)
        base_times.append(tb)
    return statistics.median(ratios), 1000 * statistics.median(base_times)


def ort_error(base: ort.InferenceSession, new: ort.InferenceSession, ref: gp.Graph, x: np.ndarray) -> float:
    """Scale-relative difference of the rewritten ONNX model from the projected reference."""
    want = ref.run(torch.from_numpy(x))[0].numpy()
    got = new.run(None, {new.get_inputs()[0].name: x})[0]
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--pipelines", default=DEFAULT_PIPELINES, help="pipelines separated by `;`")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    x = torch.randn(1, 3, args.size, args.size)
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            graph = gp.trace(build(name), x)
            base_macs = gp.graph_cost(graph, with_params=False).macs
            base = export(graph, folder, f"{name}-base", args.threads)
            for k, pipeline in enumerate(args.pipelines.split(";")):
                start = time.perf_counter()
                try:
                    result = gp.run(graph, pipeline, verify=False)
                except gp.BudgetError as exc:
                    floor = re.search(r"leaves ([0-9.]+) of the MACs", str(exc))
                    rows.append((name, pipeline, f">={floor.group(1)}" if floor else "-", "-", "-", "-", "-", "budget unreachable"))
                    print(f"{name} {pipeline}: {exc}", file=sys.stderr, flush=True)
                    continue
                seconds = time.perf_counter() - start
                last = result.results[-1]
                err = max(gp.compare(r.graph, r.reference(), n=1) for r in result.results if r.modified)
                macs = gp.graph_cost(result.graph, with_params=False).macs / base_macs
                new = export(result.graph, folder, f"{name}-{k}", args.threads)
                err_ort = ort_error(base, new, last.reference(), xn)
                ratio, base_ms = latency_ratio(base, new, xn, args.rounds, args.iters)
                layers = sum(len(r.records) for r in result.results)
                rows.append((
                    name, pipeline, f"{macs:.3f}", f"{ratio:.3f}", f"{base_ms:.1f}", str(layers), f"{seconds:.1f}",
                    "yes" if err <= 1e-5 and err_ort <= 1e-4 else f"NO ({err:.1e}, ort {err_ort:.1e})",
                ))
                print(f"{name} {pipeline}: MACs {macs:.3f} latency {ratio:.3f}", file=sys.stderr, flush=True)
    print(f"input 1x3x{args.size}x{args.size}, random weights, onnxruntime CPU, {args.threads} thread(s), "
          f"latency ratio = median over {args.rounds} interleaved rounds of {args.iters} runs")
    print(format_table(rows, ("model", "pipeline", "MACs ratio", "latency ratio", "base ms", "layers", "pass s", "exact")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
