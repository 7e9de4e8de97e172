"""graphprune vs Torch-Pruning on torchvision models: time from model to pruned module,
MACs after, and whether the output was verified exact.

Both tools prune the same randomly initialised model at the same channel ratio with an
L1 criterion.  Times: graphprune = trace (incl. its deep copy) + analyse + decide +
rewrite + emit ``nn.Module``; Torch-Pruning = ``MetaPruner`` build + ``step()`` (in place,
no copy).  MACs of both results are counted by graphprune's cost model on a fresh trace,
so the two columns use one yardstick.  "exact" is graphprune's check of the pruned graph
against its projected reference (Torch-Pruning has no reference to check against).

    python benchmarks/vs_torch_pruning.py [--models resnet50,densenet121] [--ratio 0.3]
    python benchmarks/vs_torch_pruning.py --detection [--timeout 900]

``--detection`` prints a second table over detection, segmentation, optical-flow and
Hugging Face models (random weights, small inputs): which frontend captured each (or
why neither could), graphprune's MACs after, exactness, time, whether ``gp.apply``
edited the model in place (or the first line of its refusal), and Torch-Pruning's MACs
after or its failure.  Detection models in eval mode end in post-processing with
data-dependent shapes; where the whole model cannot be captured, its dense
backbone + neck + head forward is captured instead, and the table says so.  Each model
runs in its own subprocess with a timeout.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torchvision

import graphprune as gp
from graphprune.cli import format_table

DEFAULT_MODELS = (
    "resnet50,densenet121,mobilenet_v2,vit_b_16,efficientnet_b0,convnext_tiny,resnext50_32x4d,"
    "regnet_y_400mf,googlenet,shufflenet_v2_x1_0,mobilenet_v3_large,inception_v3"
)


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def example(name: str) -> torch.Tensor:
    size = 299 if name == "inception_v3" else 224
    return torch.randn(1, 3, size, size)


def run_graphprune(model: torch.nn.Module, x: torch.Tensor, ratio: float, capture: str = "auto") -> tuple[float, torch.nn.Module, float]:
    start = time.perf_counter()
    graph = gp.trace(model, x, capture=capture)
    result = gp.get_pass("prune-channels")(ratio=ratio)(graph)
    module = result.graph.to_module()
    elapsed = time.perf_counter() - start
    err = gp.compare(result.graph, result.reference(), n=1)
    return elapsed, module, err


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> tuple[float, torch.nn.Module]:
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=head,
    )
    pruner.step()
    return time.perf_counter() - start, model


def macs_of(module: torch.nn.Module, x: torch.Tensor) -> int:
    return gp.graph_cost(gp.trace(module, x), with_params=False).macs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per tool (median)")
    parser.add_argument("--capture", default="auto", choices=("auto", "export", "fx"), help="graphprune's capture")
    parser.add_argument("--detection", action="store_true", help="the detection/segmentation/HF table instead")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model (--detection)")
    parser.add_argument("--jsonl", default="", help="(--detection) keep rows here and reuse them")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.detection:
        from detection_models import main_detection

        return main_detection(args)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows, speedups = [], []
    for name in args.models.split(","):
        model, x = build(name), example(name)
        base = macs_of(model, x)
        gp_times, tp_times = [], []
        gp_macs = tp_macs = None
        err = float("nan")
        tp_note = ""
        for _ in range(args.repeat):
            t, module, err = run_graphprune(model, x, args.ratio, args.capture)
            gp_times.append(t)
            gp_macs = macs_of(module, x)
            try:
                t, pruned = run_torch_pruning(copy.deepcopy(model), x, args.ratio)
                tp_times.append(t)
                with torch.no_grad():
                    pruned(x)
                tp_macs = macs_of(pruned, x)
            except Exception as exc:  # record and go on: the table says what failed
                tp_note = f"failed: {type(exc).__name__}: {str(exc)[:60]}"
        gpt = statistics.median(gp_times)
        tpt = statistics.median(tp_times) if tp_times else float("nan")
        if tp_times:
            speedups.append(tpt / gpt)
        rows.append((
            name, f"{gpt:.2f}", f"{tpt:.2f}" if tp_times else "-", f"{tpt / gpt:.2f}x" if tp_times else "-",
            f"{gp_macs / base:.3f}", f"{tp_macs / base:.3f}" if tp_macs else tp_note or "-",
            "yes" if err <= 1e-5 else f"NO ({err:.1e})",
        ))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"prune-channels ratio={args.ratio}, L1, random weights, 1 thread, median of {args.repeat}, capture={args.capture}")
    print(format_table(rows, ("model", "graphprune s", "Torch-Pruning s", "TP/gp time", "gp MACs after", "TP MACs after", "gp exact")))
    if speedups:
        print(f"\ngeometric-mean speed ratio (Torch-Pruning time / graphprune time): "
              f"{statistics.geometric_mean(speedups):.2f}x over {len(speedups)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
