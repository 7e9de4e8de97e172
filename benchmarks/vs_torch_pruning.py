"""graphprune vs Torch-Pruning on torchvision models: time from model to pruned module,
MACs after, and whether the output was verified exact.

Both tools prune the same randomly initialised model at the same channel ratio with an
L1 criterion.  Times: graphprune = capture + analyse + decide + rewrite + emit
``nn.Module``, with its exactness check (``gp.run``'s default: two probes) and without it
(``verify=False``); Torch-Pruning = ``MetaPruner`` build + ``step()`` (in place, no copy,
no check).  Models: torchvision classifiers and three segmentation models (their
``out`` tensor).  MACs of both results are counted by graphprune's cost model on a fresh trace,
so the two columns use one yardstick.  "exact" is graphprune's check of the pruned graph
against its projected reference (Torch-Pruning has no reference to check against).

    python benchmarks/vs_torch_pruning.py [--models resnet50,densenet121] [--ratio 0.3] [--repeat 3]
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
    "resnet18,resnet50,densenet121,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,convnext_tiny,resnext50_32x4d,"
    "regnet_y_400mf,googlenet,shufflenet_v2_x1_0,inception_v3,mnasnet1_0,squeezenet1_1,vit_b_16,"
    "lraspp_mobilenet_v3_large,deeplabv3_mobilenet_v3_large,fcn_resnet50"
)
SEGMENTATION = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")


def build(name: str) -> torch.nn.Module:
    kwargs: dict = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    if name in SEGMENTATION:
        kwargs = {"weights_backbone": None, "aux_loss": False} if name != "lraspp_mobilenet_v3_large" else {"weights_backbone": None}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return _PlainOutput(model) if name in SEGMENTATION else model


class _PlainOutput(torch.nn.Module):
    """A segmentation model returning its ``out`` tensor (both tools take tensor outputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def example(name: str) -> torch.Tensor:
    size = 299 if name == "inception_v3" else 224
    return torch.randn(1, 3, size, size)


def run_graphprune(model: torch.nn.Module, x: torch.Tensor, ratio: float, capture: str = "auto",
                   verify: bool = True) -> tuple[float, torch.nn.Module, float, str]:
    """Seconds from model to pruned module (capture, analyse, decide, rewrite, the
    pipeline's own check when ``verify``, emit); the pruned module; its error against
    the projected reference (checked outside the timing); the frontend used."""
    start = time.perf_counter()
    graph = gp.trace(model, x, capture=capture)
    result = gp.run(graph, f"prune-channels{{ratio={ratio}}}", verify=verify)
    module = result.graph.to_module()
    elapsed = time.perf_counter() - start
    first = result.results[0]
    err = gp.compare(first.graph, first.reference(), n=1)
    return elapsed, module, err, graph.frontend_name


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
    return gp.graph_cost(gp.trace(module, x, capture="export"), with_params=False).macs


def _warm_up(ratio: float) -> None:
    """One untimed run of each tool (first-call costs: imports, torch.export's set-up)."""
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    run_graphprune(model, x, ratio)
    try:
        run_torch_pruning(copy.deepcopy(model), x, ratio)
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
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
    _warm_up(args.ratio)
    rows = []
    ratios: dict[str, list[float]] = {"verified": [], "unverified": []}
    for name in args.models.split(","):
        model, x = build(name), example(name)
        base = macs_of(model, x)
        times: dict[str, list[float]] = {"verified": [], "unverified": [], "tp": []}
        module = pruned = None
        err, frontend, tp_note = float("nan"), "", ""
        for _ in range(args.repeat):  # the tools alternate, so load changes hit both
            t, module, err, frontend = run_graphprune(model, x, args.ratio, args.capture, verify=True)
            times["verified"].append(t)
            times["unverified"].append(run_graphprune(model, x, args.ratio, args.capture, verify=False)[0])
            try:
                t, pruned = run_torch_pruning(copy.deepcopy(model), x, args.ratio)
                with torch.no_grad():
                    pruned(x)
                times["tp"].append(t)
            except Exception as exc:  # record and go on: the table says what failed
                tp_note, pruned = f"failed: {type(exc).__name__}: {str(exc)[:50]}", None
        gp_macs = macs_of(module, x)
        tp_macs = macs_of(pruned, x) if pruned is not None else None
        med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
        has_tp = bool(times["tp"])
        if has_tp:
            for k in ratios:
                ratios[k].append(med["tp"] / med[k])
        rows.append((
            name, frontend, f"{med['verified']:.2f}", f"{med['unverified']:.2f}", f"{med['tp']:.2f}" if has_tp else "-",
            f"{med['tp'] / med['verified']:.2f}x" if has_tp else "-",
            f"{med['tp'] / med['unverified']:.2f}x" if has_tp else "-",
            f"{gp_macs / base:.3f}", f"{tp_macs / base:.3f}" if has_tp and tp_macs else tp_note or "-",
            "yes" if err <= 1e-5 else f"NO ({err:.1e})",
        ))
        print(f"done {name}", file=sys.stderr, flush=True)
    if ratios["verified"]:
        rows.append((f"geometric mean ({len(ratios['verified'])} models)", "", "", "", "",
                     f"{statistics.geometric_mean(ratios['verified']):.2f}x",
                     f"{statistics.geometric_mean(ratios['unverified']):.2f}x", "", "", ""))
    print(f"prune-channels ratio={args.ratio}, L1, random weights, 1 thread, median of {args.repeat} "
          f"(tools alternating, after one warm-up run of each), capture={args.capture}")
    print(format_table(rows, ("model", "captured by", "gp s (verified)", "gp s (no check)", "TP s",
                              "TP/gp verified", "TP/gp no check", "gp MACs after", "TP MACs after", "gp exact")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
