"""Install weight and start time: ``pip install graphprune`` (no torch) against ``[torch]``.

Measured side by side in one run:

* **start time** — wall time of a fresh process, median of ``--runs`` runs (after one
  warm-up run each, so the file cache is warm for all of them):
  ``graphprune --help`` and ``graphprune passes`` from the torch-free venv and from the
  torch venv (the same code: neither command imports torch), against
  ``python -c 'import torch'`` and ``python -c 'import onnxruntime'`` (what a command
  that imported them would pay before doing anything);
* **venv size** — ``du`` of the torch-free venv (``pip install graphprune``, not
  editable) and of the torch venv (the repository's ``.venv``: ``[torch,test,bench]``),
  and of the torch-only parts of the latter (``torch``, the ``nvidia`` CUDA libraries,
  ``triton``) — what ``[torch]`` adds.

The torch-free venv is made if it does not exist (``--make-venv``):
``python3 -m venv /tmp/gp-notorch && /tmp/gp-notorch/bin/pip install .``.

Run: ``python benchmarks/install_and_start.py [--notorch-venv /tmp/gp-notorch] [--torch-venv .venv] [--runs 7]
[--baseline OTHER/bin/graphprune]``
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PARTS = ("torch", "nvidia", "triton", "torchvision", "functorch", "torchgen")


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wall(cmd: list[str], runs: int) -> float:
    """Median wall time (s) of ``cmd`` over ``runs`` runs, after one warm-up run."""
    subprocess.run(cmd, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def du(path: str) -> int:
    """Disk usage in bytes (``du -sb``; hard links counted once per call)."""
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def site_packages(venv: str) -> str:
    (found,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    return found


def make_venv(venv: str) -> None:
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet", ROOT], check=True)


def has_torch(venv: str) -> bool:
    py = os.path.join(venv, "bin", "python")
    return subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notorch-venv", default="/tmp/gp-notorch")
    ap.add_argument("--torch-venv", default=os.path.join(ROOT, ".venv"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--make-venv", action="store_true", help="create the torch-free venv if it is missing")
    ap.add_argument("--baseline", default=None, metavar="BIN",
                    help="another graphprune executable to time alongside (e.g. an install of the version before torch became optional)")
    args = ap.parse_args()
    if not os.path.isdir(args.notorch_venv):
        if not args.make_venv:
            sys.exit(f"no venv at {args.notorch_venv}: pass --make-venv, or make it with "
                     f"python3 -m venv {args.notorch_venv} && {args.notorch_venv}/bin/pip install {ROOT}")
        make_venv(args.notorch_venv)
    if has_torch(args.notorch_venv):
        sys.exit(f"{args.notorch_venv} has torch installed; it must be the torch-free install")

    nt, tv = args.notorch_venv, args.torch_venv
    rows = []
    ref_torch = wall([os.path.join(tv, "bin", "python"), "-c", "import torch"], args.runs)
    ref_ort = wall([os.path.join(nt, "bin", "python"), "-c", "import onnxruntime"], args.runs)
    for label, venv in (("graphprune (no torch)", nt), ("graphprune[torch]", tv)):
        for argv in (["--help"], ["passes"]):
            t = wall([os.path.join(venv, "bin", "graphprune"), *argv], args.runs)
            rows.append((f"{label}: graphprune {' '.join(argv)}", f"{t:.3f} s", f"{t / ref_torch:.2f}"))
    if args.baseline:
        for argv in (["--help"], ["passes"]):
            t = wall([args.baseline, *argv], args.runs)
            rows.append((f"baseline ({args.baseline}): graphprune {' '.join(argv)}", f"{t:.3f} s", f"{t / ref_torch:.2f}"))
    rows.append(("python -c 'import onnxruntime'", f"{ref_ort:.3f} s", f"{ref_ort / ref_torch:.2f}"))
    rows.append(("python -c 'import torch'", f"{ref_torch:.3f} s", "1.00"))
    print(f"start time: median of {args.runs} runs (warm file cache)\n")
    print(format_table(rows, ("command", "wall time", "x import torch")))

    size_nt, size_tv = du(nt), du(tv)
    sp = site_packages(tv)
    parts = {p: du(os.path.join(sp, p)) for p in TORCH_PARTS if os.path.isdir(os.path.join(sp, p))}
    torch_only = sum(parts.values())
    print("\nvenv size (du)\n")
    print(format_table([
        (f"pip install graphprune ({nt})", gb(size_nt), f"{size_nt / size_tv:.3f}"),
        (f"with [torch] and the test/bench extras ({tv})", gb(size_tv), "1.000"),
        ("  of which " + ", ".join(parts), gb(torch_only), f"{torch_only / size_tv:.3f}"),
    ], ("install", "size", "x torch venv")))


if __name__ == "__main__":
    main()
