"""graphprune vs Torch-Pruning over a timm sample (one architecture per family).

The sample is ``MODELS`` in ``tests/test_timm_zoo.py`` (names, input size, create
kwargs).  Each model runs in its own subprocess with a timeout, so one hang or crash
costs one row.  Per model: which frontend captured it, graphprune's MACs after
``prune-channels{ratio=0.3}`` (relative to the unpruned graph), whether the rewrite is
exact against its projected reference, and Torch-Pruning's MACs after (``MetaPruner`` +
``step()``, L1, ``pruning_ratio=0.3``, the classifier head ignored) or how it failed.
Both MACs columns are counted by graphprune's cost model on a fresh trace.

The summary counts the architectures graphprune prunes at least as far as Torch-Pruning
(MACs after within 0.02) and those it prunes less, and for the latter the most common
frozen-group reasons (names of layers replaced by ``*``): the aten ops that still need
rules.

    python benchmarks/timm_zoo.py [--models a,b] [--timeout 300] [--jsonl out.jsonl]
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import os
import re
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def reason_key(reason: str) -> str:
    """A frozen reason with the layer names taken out, so reasons count across models."""
    reason = re.sub(r"`[^`]*`", "`*`", reason)
    return re.sub(r"(shares parameter `\*` with) .*", r"\1 other nodes", reason)


def head_layers(model: Any) -> list[Any]:
    """The classifier to leave alone: timm's ``get_classifier()``, else the last linear."""
    import torch.nn as nn

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return [head]
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


def worker(names: str) -> None:
    """Run each model in turn; print one JSON line per finished stage (so a timeout keeps
    what finished), a ``start`` and a ``done`` line per model."""
    warnings.simplefilter("ignore")
    for name in names.split(","):
        print(json.dumps({"model": name, "stage": "start"}), flush=True)
        try:
            worker_one(name)
        except Exception as exc:  # build or forward failed: one row says so
            print(json.dumps({"model": name, "stage": "gp", "error": f"build: {_line(exc)}"}), flush=True)
        print(json.dumps({"model": name, "stage": "done"}), flush=True)
        gc.collect()


def worker_one(name: str) -> None:
    import torch

    import graphprune as gp
    from test_timm_zoo import SPECS, build, example

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    size, kwargs = SPECS[name]
    model, x = build(name, kwargs), example(size)

    def emit(stage: str, **row: Any) -> None:
        print(json.dumps({"model": name, "stage": stage, **row}), flush=True)

    start = time.perf_counter()
    try:
        graph = gp.trace(model, x)
    except Exception as exc:
        emit(stage="gp", error=f"capture: {_line(exc)}")
        return
    base = gp.graph_cost(graph, with_params=False).macs
    try:
        result = gp.run(graph, "prune-channels{ratio=0.3}", verify=False)
        r = result.results[0]
        err = gp.compare(result.graph, r.reference(), n=1) if r.modified else 0.0
        after = gp.graph_cost(result.graph, with_params=False).macs
        gp_error = None
    except Exception as exc:
        err, after, gp_error = float("nan"), None, f"prune: {_line(exc)}"
    reasons: collections.Counter[str] = collections.Counter()
    groups = prunable = 0
    try:
        for g in gp.analyse(graph).groups:
            groups += 1
            prunable += bool(g.prunable.any())
            if g.frozen.any():
                for key in {reason_key(v) for v in g.reasons.values()}:
                    reasons[key] += 1
    except Exception as exc:
        reasons[f"analyse failed: {_line(exc)}"] += 1
    emit(stage="gp", frontend=graph.frontend.name, base=base, after=after, err=err, error=gp_error,
         seconds=time.perf_counter() - start, groups=groups, prunable_groups=prunable, reasons=dict(reasons))
    del graph
    try:
        import torch_pruning as tp

        tp_model = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(tp_model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.3, ignored_layers=head_layers(tp_model))
        pruner.step()
        with torch.no_grad():
            tp_model(x)
    except Exception as exc:
        emit(stage="tp", error=f"{_line(exc)}")
        return
    try:
        tp_after = gp.graph_cost(gp.trace(tp_model, x), with_params=False).macs
    except Exception as exc:
        emit(stage="tp", error=f"pruned model cannot be traced to count MACs: {_line(exc)}")
        return
    emit(stage="tp", after=tp_after, base=base)


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100] if text else ''}"


class Worker:
    """One worker process that runs many models (imports cost up to a minute on a loaded
    machine), read line by line; a model that overruns its timeout kills the worker, and
    the next model starts a fresh one."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def start(self, names: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", ",".join(names)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: "queue.Queue[str | None]") -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    def stop(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        err = _last(self.proc.stderr.read()) if self.proc.stderr else ""  # type: ignore[union-attr]
        self.proc = None
        return err


def run_models(names: list[str], timeout: float, record: Any) -> None:
    """Run ``names`` in workers, calling ``record(row)`` for each model as it finishes."""
    todo = list(names)
    worker_ = Worker()
    while todo:
        if worker_.proc is None:
            worker_.start(todo)
        name = todo[0]
        row: dict[str, Any] = {"model": name}
        deadline = time.monotonic() + timeout
        note = ""
        while True:
            try:
                line = worker_.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                note = f"timeout after {timeout:.0f}s"
                worker_.stop()
                break
            if line is None:
                note = f"worker died: {worker_.stop()}"
                break
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            if d.get("stage") == "done":
                break
            if d.get("stage") == "start":
                deadline = time.monotonic() + timeout  # the timeout runs from the model's start
                continue
            row[d.pop("stage")] = d
        for stage in ("gp", "tp"):
            row.setdefault(stage, {"error": note or "no result"})
        todo.pop(0)
        record(row)
    worker_.stop()


def _last(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:100] if lines else ""


def _only_io(row: dict[str, Any]) -> bool:
    return {reason_key(k) for k in row["gp"].get("reasons", {})} <= {"model input or output"}


def summarise(rows: list[dict[str, Any]]) -> str:
    from graphprune.cli import format_table

    table, ge, less, less_reasons, all_reasons = [], [], [], collections.Counter(), collections.Counter()
    gp_fail = tp_fail = inexact = 0
    for row in rows:
        g, t = row["gp"], row["tp"]
        gp_ratio = g["after"] / g["base"] if g.get("after") is not None and g.get("base") else None
        tp_ratio = t["after"] / t["base"] if t.get("after") is not None and t.get("base") else None
        exact = "-" if gp_ratio is None else ("yes" if g["err"] <= 1e-5 else f"NO ({g['err']:.1e})")
        inexact += exact.startswith("NO")
        gp_fail += gp_ratio is None
        tp_fail += tp_ratio is None
        reasons = {reason_key(k) for k in g.get("reasons", {})}
        for k in reasons:
            all_reasons[k] += 1
        if gp_ratio is not None and tp_ratio is not None:
            if gp_ratio <= tp_ratio + 0.02:
                ge.append(row["model"])
            else:
                less.append(row["model"])
                for k in reasons:
                    less_reasons[k] += 1
        table.append((
            row["model"], g.get("frontend", "-"),
            f"{gp_ratio:.3f}" if gp_ratio is not None else f"failed ({g.get('error')})"[:90],
            exact, f"{tp_ratio:.3f}" if tp_ratio is not None else f"failed ({t.get('error')})"[:90],
        ))
    lines = [format_table(table, ("model", "captured by", "gp MACs after", "gp exact", "TP MACs after"))]
    frontends = collections.Counter(r["gp"].get("frontend", "failed") for r in rows)
    lines += [
        "",
        f"{len(rows)} architectures; captured by: " + ", ".join(f"{k} {v}" for k, v in frontends.most_common()),
        f"graphprune failed on {gp_fail}, inexact on {inexact}; Torch-Pruning failed on {tp_fail}",
        f"both ran on {len(ge) + len(less)}: graphprune prunes at least as far as TP (within 0.02) on {len(ge)}, "
        f"less on {len(less)}",
        "graphprune prunes less on: " + ", ".join(less),
        f"  of those, {sum(1 for r in rows if r['model'] in less and _only_io(r))} freeze nothing but the model's "
        "inputs and outputs: the gap there is how far each tool prunes what it can (grouped and depthwise convs "
        "lose whole groups in graphprune), not a missing rule",
        "",
        "top frozen-group reasons where graphprune prunes less (models with the reason):",
    ]
    lines += [f"  {n:4d}  {k}" for k, n in less_reasons.most_common(15)]
    lines += ["", "top frozen-group reasons over all models (models with the reason):"]
    lines += [f"  {n:4d}  {k}" for k, n in all_reasons.most_common(15)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated subset of the sample")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model (both tools)")
    parser.add_argument("--jsonl", default="", help="append raw rows here; rows already there are reused")
    parser.add_argument("--summary-only", action="store_true", help="print the table from --jsonl without running")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from test_timm_zoo import MODELS

    names = args.models.split(",") if args.models else [m[0] for m in MODELS]
    done: dict[str, dict[str, Any]] = {}
    if args.jsonl and os.path.exists(args.jsonl):
        for line in open(args.jsonl):
            d = json.loads(line)
            done[d["model"]] = d
    todo = [n for n in names if n not in done] if not args.summary_only else []
    start = time.perf_counter()

    def record(row: dict[str, Any]) -> None:
        done[row["model"]] = row
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"[{len(done)}/{len(names)}] {row['model']} at {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    run_models(todo, args.timeout, record)
    rows = [done[n] for n in names if n in done]
    missing = [n for n in names if n not in done]
    print("prune-channels{ratio=0.3} vs Torch-Pruning MetaPruner (L1, pruning_ratio=0.3, head ignored); "
          "random weights; MACs after relative to the unpruned model, both counted by graphprune")
    print(summarise(rows))
    if missing:
        print(f"\nnot run ({len(missing)}): " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
