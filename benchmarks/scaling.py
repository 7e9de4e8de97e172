"""Compile time against model size: synthetic chains and residual stacks of 10..2000 blocks.

A *chain* block is conv3x3 -> batch norm -> ReLU (every block its own pruning group); a
*residual* block is ``x + bn(conv(relu(bn(conv(x)))))`` (all blocks tie one residual
stream into one group, plus one inner group per block).  Width 8, 8x8 inputs, batch 1.
Each model goes from ``nn.Module`` to a verified pruned ``nn.Module``
(``gp.trace`` + ``gp.run(..., "prune-channels{ratio=0.5}")`` with its check +
``to_module``), median of ``--repeat`` runs after a warm-up; the table gives the time
per node of the graph view and the stage that dominates, and ``--plot`` saves the
time-per-node curve.  Flat time per node means total time linear in model size.

    python benchmarks/scaling.py [--blocks 10,50,200,500,1000,2000] [--repeat 3]
                                 [--plot benchmarks/results/scaling.png]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

import graphprune as gp
from graphprune.cli import format_table
from graphprune.profile import STAGES, record

WIDTH = 8


class ChainBlock(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH), nn.ReLU())


class ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH)
        self.c2, self.b2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def build(kind: str, blocks: int) -> nn.Module:
    """A stem conv, ``blocks`` blocks of ``kind``, and a pooled linear head."""
    torch.manual_seed(0)
    block = ChainBlock if kind == "chain" else ResidualBlock
    body = [block() for _ in range(blocks)]
    for m in nn.Sequential(*body).modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as in a trained net
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(WIDTH, 10)).eval()


def compile_once(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float], int]:
    start = time.perf_counter()
    with record() as times:
        graph = gp.trace(model, x)
        result = gp.run(graph, "prune-channels{ratio=0.5}")
        result.graph.to_module()
    return time.perf_counter() - start, dict(times), len(graph.nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="10,50,200,500,1000,2000")
    parser.add_argument("--kinds", default="chain,residual")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plot", default="", help="save a time-per-node plot (PNG) here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    x = torch.randn(1, 3, 8, 8)
    rows, curves = [], {}
    for kind in args.kinds.split(","):
        for blocks in (int(b) for b in args.blocks.split(",")):
            model = build(kind, blocks)
            compile_once(model, x)  # warm-up
            runs = [compile_once(model, x) for _ in range(args.repeat)]
            total = statistics.median(r[0] for r in runs)
            nodes = runs[0][2]
            stages = {s: statistics.median(r[1].get(s, 0.0) for r in runs) for s in STAGES}
            top = sorted(stages, key=stages.get, reverse=True)[:3]  # type: ignore[arg-type]
            per_node = total / nodes * 1e3
            curves.setdefault(kind, []).append((nodes, per_node))
            rows.append((kind, blocks, nodes, f"{total:.3f}", f"{per_node:.3f}",
                         ", ".join(f"{s} {stages[s] / total:.0%}" for s in top)))
            print(f"done {kind} {blocks}", file=sys.stderr, flush=True)
    print(f"trace + prune-channels{{ratio=0.5}} (verified) + to_module, 1 thread, median of {args.repeat}")
    print(format_table(rows, ("model", "blocks", "nodes", "total s", "ms per node", "largest stages")))
    for kind, points in curves.items():
        per = [p for _, p in points]
        print(f"{kind}: ms per node, largest / smallest model: {per[-1] / per[0]:.2f}x "
              f"(max / min over sizes {max(per) / min(per):.2f}x)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for kind, points in curves.items():
            ax.plot([n for n, _ in points], [p for _, p in points], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("nodes in the graph view")
        ax.set_ylabel("ms per node")
        ax.set_title("graphprune compile time per node (trace, prune, verify, emit)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
