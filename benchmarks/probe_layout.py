"""Probe layout: one forward of each torchvision model at its check-probe size, plain
(NCHW) against channels-last input, with the share of grouped convs and the layout the
check picks (``graphprune.probe_size.prefers_channels_last``).

Probes are the check's: two stacked random images cropped by the largest candidate
factor (``probe_size.candidate_factors``; the first the check tries); 1 thread, eval mode, no grad; the layouts alternate and
each time is the median of ``--repeat`` runs.

    python benchmarks/probe_layout.py [--models mobilenet_v2,resnet50] [--repeat 7]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import torch
import torchvision

import graphprune as gp
from graphprune import probe_size
from graphprune.cli import format_table

DEFAULT_MODELS = ("mobilenet_v2,mobilenet_v3_large,efficientnet_b0,mnasnet1_0,shufflenet_v2_x1_0,regnet_y_400mf,"
                  "resnext50_32x4d,convnext_tiny,resnet18,resnet50,densenet121,googlenet,squeezenet1_1")


def _build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model = _build(name)
        graph = gp.trace(model, torch.randn(1, 3, 224, 224))
        factors = probe_size.candidate_factors(graph)
        side = math.ceil(224 / factors[0]) if factors else 224  # the first factor tried; the check may settle lower
        x = torch.randn(2, 3, side, side)
        last = x.contiguous(memory_format=torch.channels_last)
        convs = [n for n in graph.nodes if n.kind == "conv"]
        grouped = sum(int(n.attrs.get("groups", 1)) > 1 for n in convs)
        with torch.no_grad():
            model(x), model(last)  # warm-up
            plain, cl = [], []
            for _ in range(2):  # alternate, so load changes hit both
                plain.append(_median_ms(lambda: model(x), args.repeat))
                cl.append(_median_ms(lambda: model(last), args.repeat))
        p, c = min(plain), min(cl)
        rows.append((name, f"{side}px", f"{grouped}/{len(convs)}", "channels-last" if probe_size.prefers_channels_last(graph)
                     else "plain", f"{p:.1f}", f"{c:.1f}", f"{p / c:.2f}x"))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"one forward of 2 stacked probes at the check's crop, 1 thread, best of 2 medians of {args.repeat}")
    print(format_table(rows, ("model", "probe", "grouped convs", "check picks", "plain ms", "channels-last ms",
                              "plain/channels-last")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
