"""Pass run time of this tree against another source tree of graphprune, side by side.

Written for the change that made the graph view's weights numpy arrays (torch optional):
the same pipelines on the same models, timed with the installed (editable) graphprune of
this venv and with ``--baseline-src`` (a
checkout of an older commit, with ``passes/`` and ``samples/`` linked into its
``graphprune/`` folder as the editable install maps them), each in its own process on
the same venv.  Every pipeline runs with verification on (``gp.run``'s default), so the
time includes the exactness checks.  Columns: median of ``--repeat`` runs per tree, the
ratio (this tree / baseline), and MACs after, which must be equal (same decisions).

Models: torchvision resnet18 (random weights, seeded) captured with fx, and the same
model exported to ONNX (TorchScript exporter, opset 17) and loaded with ``load_onnx``.

Run: ``python benchmarks/pass_speed_vs_tree.py --baseline-src /tmp/gp-base-src [--repeat 3]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = ("prune-channels{ratio=0.3}", "factorize{energy=0.9}", "shrink-kernels{energy=0.05}", "group-convs{groups=4}")

WORKER = r"""
import json, statistics, sys, time, warnings
import torch, torchvision
import graphprune as gp
from graphprune.frontends.onnx import load_onnx
from graphprune.samples.models import randomize_

pipelines, repeat, onnx_path = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = randomize_(torchvision.models.resnet18()).eval()
x = torch.randn(1, 3, 64, 64)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (x,), onnx_path, opset_version=17, dynamo=False)
graphs = {"fx": gp.trace(model, x, capture="fx"), "onnx": load_onnx(onnx_path)}
out = {}
for frontend, graph in graphs.items():
    for p in pipelines:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            result = gp.run(graph, p)
            times.append(time.perf_counter() - t)
        out[f"{frontend} {p}"] = (statistics.median(times), gp.graph_cost(result.graph).macs / gp.graph_cost(graph).macs)
print("RESULT " + json.dumps(out))
"""


def run_tree(src: str | None, repeat: int) -> dict[str, tuple[float, float]]:
    """Run the worker on the installed graphprune (``src`` None) or on the tree ``src``."""
    env = dict(os.environ, PYTHONPATH=src) if src else dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(PIPELINES), str(repeat), os.path.join(tmp, "m.onnx")],
                              capture_output=True, text=True, cwd=src or tmp, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{src} failed:\n{proc.stderr[-3000:]}")
    return {k: tuple(v) for k, v in json.loads(line[0][len("RESULT "):]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from graphprune.cli_base import format_table

    new, old = run_tree(None, args.repeat), run_tree(args.baseline_src, args.repeat)
    rows = []
    for key in new:
        (tn, mn), (to, mo) = new[key], old[key]
        rows.append((key, f"{to:.2f}", f"{tn:.2f}", f"{tn / to:.2f}x", f"{mo:.3f}", f"{mn:.3f}"))
    print(f"median of {args.repeat} runs, resnet18 at 64x64, gp.run with verification\n")
    print(format_table(rows, ("model / pipeline", "baseline s", "this tree s", "ratio", "MACs base", "MACs now")))


if __name__ == "__main__":
    main()
