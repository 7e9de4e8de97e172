"""Where compile time goes: a per-stage table per model, from model to verified slim module.

Each model is captured, pruned with verification (``gp.run``) and emitted as an
``nn.Module`` inside :func:`graphprune.profile.record`; the library's stage timers
(capture, shapes, view, coupling, scoring, search, rewrite, copies, verify, emit) give
exclusive seconds per stage; ``other`` is wall time outside every stage (pipeline
parsing, records, Python glue).  Median over ``--repeat`` runs after one warm-up run
(the first ``torch.export`` in a process pays a one-off cost of about a second).

    python benchmarks/profile_compile.py [--models resnet50,mobilenet_v2] [--capture auto|export|fx]
                                         [--pipeline "prune-channels{ratio=0.3}"] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torchvision

import graphprune as gp
from graphprune.cli import format_table
from graphprune.profile import STAGES, record

DEFAULT_MODELS = "resnet50,densenet121,mobilenet_v2,efficientnet_b0,regnet_y_400mf,googlenet,mobilenet_v3_large"


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, size, size)


def profile_once(model: torch.nn.Module, x: torch.Tensor, pipeline: str, capture: str, probes: int) -> dict[str, float]:
    """Stage seconds of one trace + verified run + emit, plus ``other`` and ``total``."""
    start = time.perf_counter()
    with record() as times:
        graph = gp.trace(model, x, capture=capture)
        result = gp.run(graph, pipeline, probes=probes)
        result.graph.to_module()
    total = time.perf_counter() - start
    row = {s: times.get(s, 0.0) for s in STAGES}
    row["other"] = max(total - times.total(), 0.0)
    row["total"] = total
    row["frontend"] = graph.frontend_name  # type: ignore[assignment]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--capture", default="auto", choices=("auto", "export", "fx"))
    parser.add_argument("--pipeline", default="prune-channels{ratio=0.3}")
    parser.add_argument("--probes", type=int, default=2, help="random check inputs")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    columns = (*STAGES, "other", "total")
    rows = []
    for name in args.models.split(","):
        model, x = build(name)
        profile_once(model, x, args.pipeline, args.capture, args.probes)  # warm-up
        runs = [profile_once(model, x, args.pipeline, args.capture, args.probes) for _ in range(args.repeat)]
        med = {c: statistics.median(r[c] for r in runs) for c in columns}  # type: ignore[misc]
        rows.append((name, runs[0]["frontend"], *(f"{med[c]:.3f}" for c in columns)))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"{args.pipeline}, capture={args.capture}, {args.probes} probes, 1 thread, "
          f"median of {args.repeat} after a warm-up; seconds per stage (exclusive)")
    print(format_table(rows, ("model", "frontend", *columns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
