"""What pausing the cyclic garbage collector inside graphprune's entry points saves.

For each torchvision model, the compile from model to verified slim module (``gp.trace``
-> ``gp.run("prune-channels{ratio=0.3}")`` -> ``to_module``) runs ``--repeat`` times
with the pause on and off, alternating (``graphprune.gcpause.ENABLED``).  Columns: the
median wall time of each, and the seconds the collector spent per compile (measured with
``gc.callbacks``, collections that started inside the compile), with how many of them
were full (generation 2) collections.

    python benchmarks/gc_pause.py [--models resnet18,mobilenet_v2] [--repeat 8]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings

import torch
import torchvision

import graphprune as gp
from graphprune import gcpause
from graphprune.cli import format_table


class GcClock:
    """Seconds spent in collections, and the count of full ones, since :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds, self.full, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2


def compile_once(model: torch.nn.Module, x: torch.Tensor, clock: GcClock) -> tuple[float, float, int]:
    clock.reset()
    start = time.perf_counter()
    graph = gp.trace(model, x)
    gp.run(graph, "prune-channels{ratio=0.3}").graph.to_module()
    return time.perf_counter() - start, clock.seconds, clock.full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0,regnet_y_400mf")
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    clock = GcClock()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, x = torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)
        compile_once(model, x, clock)  # warm-up
        runs: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
        for _ in range(args.repeat):
            for paused in (True, False):
                gcpause.ENABLED = paused
                runs[paused].append(compile_once(model, x, clock))
        gcpause.ENABLED = True
        cells = []
        for paused in (True, False):
            r = runs[paused]
            cells += [f"{statistics.median(t for t, _, _ in r):.3f}", f"{statistics.mean(g for _, g, _ in r):.3f}",
                      f"{sum(n for _, _, n in r)}"]
        rows.append((name, *cells))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(f"trace + prune-channels{{ratio=0.3}} (checked) + to_module, 1 thread, {args.repeat} runs each, alternating")
    print(format_table(rows, ("model", "paused: median s", "gc s per run", "full gcs", "not paused: median s",
                              "gc s per run", "full gcs")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
