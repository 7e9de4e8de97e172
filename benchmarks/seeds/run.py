"""Seed-repeated evidence runner.

``python benchmarks/seeds/run.py --method NAME --dataset SPEC --seeds N --json OUT.json [--tiny]``

imports ``benchmarks/seeds/methods/NAME.py``, which defines

* ``BASELINE_NAME: str`` — what the ``baseline`` arm is;
* ``DEFAULTS: dict`` — the settings of a real run; ``TINY: dict`` — smoke settings
  (seconds), used with ``--tiny`` (``--set key=value`` overrides either);
* ``run_seed(seed, data, settings) -> dict[str, float]`` — at least ``ours`` and
  ``baseline`` (test accuracy), plus any further arms.

and writes ``{"method", "metric", "ours": [...], "baseline": [...], "baseline_name",
"settings", <arm>: [...], "dataset", "seeds", "seconds"}`` (one value per seed in
every list), then prints mean ± std (sample std, n-1) per arm.

``run.py --merge A.json B.json ... --json OUT.json`` joins runs of the same method,
dataset and settings made on different seeds (e.g. in parallel processes with
``--first-seed``) and prints the table of the union.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.seeds.common import load_dataset  # noqa: E402


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_table(out: dict[str, Any], arms: list[str]) -> str:
    lines = [f"{'arm':32s} {'mean':>9s} {'std':>9s}  per seed"]
    for arm in arms:
        m, s = mean_std(out[arm])
        per = " ".join(f"{v:.4f}" for v in out[arm])
        lines.append(f"{arm:32s} {m:9.4f} {s:9.4f}  {per}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method")
    ap.add_argument("--dataset", help="fashion-mnist | digits | npz:PATH")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join the per-seed results of these files")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--tiny", action="store_true", help="smoke settings (the method's TINY)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if not args.method or not args.dataset:
        ap.error("--method and --dataset are required (unless --merge)")

    torch.set_num_threads(args.threads)
    mod = importlib.import_module(f"benchmarks.seeds.methods.{args.method}")
    settings = dict(mod.DEFAULTS)
    if args.tiny:
        settings.update(mod.TINY)
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            ap.error(f"--set `{item}` must be KEY=VALUE")
        settings[key] = _parse_value(value)

    data = load_dataset(args.dataset)
    print(f"{args.method} on {data.describe()}; settings {settings}", flush=True)
    out: dict[str, Any] = {
        "method": args.method, "metric": "test_accuracy", "dataset": args.dataset,
        "baseline_name": mod.BASELINE_NAME, "settings": settings, "seeds": [],
    }
    arms: list[str] = []
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        res = mod.run_seed(seed, data, settings)
        if "ours" not in res or "baseline" not in res:
            raise SystemExit(f"{args.method}.run_seed must return `ours` and `baseline`, got {sorted(res)}")
        for arm in res:
            if arm not in arms:
                arms.append(arm)
            out.setdefault(arm, []).append(float(res[arm]))
        out["seeds"].append(seed)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in res.items())
        print(f"seed {seed} ({time.perf_counter() - t0:.0f}s): {shown}", flush=True)
        _write(args.json, out)  # partial results survive an interrupted run
    out["seconds"] = time.perf_counter() - start
    order = ["ours", "baseline"] + [a for a in arms if a not in ("ours", "baseline")]
    _write(args.json, out)
    print(f"\n{args.method} on {args.dataset}, {len(out['seeds'])} seeds (baseline: {mod.BASELINE_NAME})")
    print(format_table(out, order))
    return 0


def merge(paths: list[str], dst: str) -> int:
    """Join per-seed results of runs with the same method, dataset and settings."""
    runs = [json.load(open(p)) for p in paths]
    head = runs[0]
    out: dict[str, Any] = {k: head[k] for k in ("method", "metric", "dataset", "baseline_name", "settings")}
    out["seeds"], out["merged_from"] = [], list(paths)
    arms: list[str] = []
    for path, r in zip(paths, runs):
        for key in ("method", "dataset", "settings"):
            if r[key] != head[key]:
                raise SystemExit(f"{path}: {key} differs from {paths[0]}")
        dup = set(r["seeds"]) & set(out["seeds"])
        if dup:
            raise SystemExit(f"{path}: seeds {sorted(dup)} already present")
        out["seeds"] += r["seeds"]
        for arm, values in r.items():
            if isinstance(values, list) and arm not in ("seeds", "merged_from") and len(values) == len(r["seeds"]):
                if arm not in arms:
                    arms.append(arm)
                out.setdefault(arm, []).extend(values)
    _write(dst, out)
    order = ["ours", "baseline"] + [a for a in arms if a not in ("ours", "baseline")]
    print(f"{out['method']} on {out['dataset']}, seeds {out['seeds']} (baseline: {out['baseline_name']})")
    print(format_table(out, order))
    return 0


def _write(path: str, out: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
