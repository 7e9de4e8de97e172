"""graphprune's ONNX optimizer against onnxsim's structured pruning, side by side.

For each torchvision model (random weights, ``randomize_``), exported to ONNX (opset 17,
TorchScript exporter, BatchNorm folded into the convs as the default eval export does):

* graphprune: ``load_onnx`` -> ``prune-channels{ratio=S}`` -> save (what ``graphprune
  optimize`` does, without its checks, which are timed separately as "check");
* onnxsim: ``onnxsim.pruning.apply_structured_pruning(path, sparsity=S)`` -> save.

Columns: wall time, MACs and parameters after (fraction of the original, both priced by
graphprune's cost model on the written files), whether onnxruntime runs the written file,
and whether its outputs match the *projected reference* (the original model with the
removed weight slices zeroed) to 1e-5 relative to output scale.  graphprune's reference is
the pass's own projection; onnxsim reports none, so its removed slices are recovered by
locating the kept weight values in the original tensors (random weights make every value
unique) and zeroing the rest.

Run: ``.venv/bin/python benchmarks/vs_onnxsim.py [--models resnet18,...] [--size 224] [--sparsity 0.3]``
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import graphprune as gp
from graphprune.cli import format_table
from graphprune.frontends.onnx import load_onnx
from graphprune.samples.models import randomize_

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2,densenet121,efficientnet_b0"
RTOL = 1e-5


@dataclass
class Outcome:
    seconds: float
    macs: float  # fraction of the original
    params: float
    runs: bool
    matches: str  # "yes (err)", "NO (err)", "n/a: why"


def export(name: str, size: int, path: str) -> None:
    torch.manual_seed(0)
    model = randomize_(torchvision.models.get_model(name, weights=None)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["output"])


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def relative_error(path: str, reference: gp.Graph, n: int = 2) -> float:
    """Worst scale-relative output difference of the file against a reference graph."""
    sess = session(path)
    worst = 0.0
    for seed in range(n):
        xs = reference.random_inputs(seed)
        got = sess.run(None, {i.name: np.asarray(x) for i, x in zip(sess.get_inputs(), xs)})
        for g, w in zip(got, reference.run(*xs)):
            w = np.asarray(w, dtype=np.float64)
            worst = max(worst, float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)))
    return worst


def cost_ratio(path: str, base: gp.Cost) -> tuple[float, float]:
    cost = gp.graph_cost(load_onnx(path))
    return cost.macs / base.macs, cost.params / base.params


def run_graphprune(src: str, dst: str, sparsity: float, base: gp.Cost) -> Outcome:
    start = time.perf_counter()
    graph = load_onnx(src)
    result = gp.run(graph, f"prune-channels{{ratio={sparsity}}}", verify=False).results[0]
    result.graph.to_onnx(dst)
    seconds = time.perf_counter() - start
    macs, params = cost_ratio(dst, base)
    try:
        err = relative_error(dst, result.reference())
        return Outcome(seconds, macs, params, True, f"{'yes' if err <= RTOL else 'NO'} ({err:.1e})")
    except Exception as exc:  # onnxruntime refused the file
        return Outcome(seconds, macs, params, False, f"n/a: {str(exc).splitlines()[0][:60]}")


def run_onnxsim(src: str, dst: str, sparsity: float, base: gp.Cost) -> Outcome:
    from onnxsim.pruning import apply_structured_pruning

    start = time.perf_counter()
    try:
        model = apply_structured_pruning(src, sparsity=sparsity)
        onnx.save(model, dst)
    except Exception as exc:
        return Outcome(time.perf_counter() - start, float("nan"), float("nan"), False, f"n/a: failed: {exc}"[:70])
    seconds = time.perf_counter() - start
    macs, params = cost_ratio(dst, base)
    try:
        session(dst)
    except Exception as exc:
        return Outcome(seconds, macs, params, False, f"n/a: {str(exc).splitlines()[0][:60]}")
    reference = recovered_reference(src, dst)
    if reference is None:
        return Outcome(seconds, macs, params, True, "n/a: slices not recoverable")
    err = relative_error(dst, reference)
    return Outcome(seconds, macs, params, True, f"{'yes' if err <= RTOL else 'NO'} ({err:.1e})")


def recovered_reference(src: str, dst: str) -> gp.Graph | None:
    """The original model with every weight slice that ``dst`` dropped set to zero.

    A pruned tensor is an index selection of the original along its shrunk axes; each
    kept index is found by looking up where a pruned value sits in the original tensor.
    """
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(dst).graph.initializer}
    graph = load_onnx(src)
    for name, new in pruned.items():
        old = original.get(name)
        if old is None or old.shape == new.shape or old.ndim != new.ndim:
            continue
        kept = kept_indices(old, new)
        if kept is None:
            return None
        mask = np.zeros(old.shape, bool)
        mask[np.ix_(*kept)] = True
        graph.set_param(name, np.where(mask, old, 0).astype(old.dtype))
    return graph


def kept_indices(old: np.ndarray, new: np.ndarray) -> list[np.ndarray] | None:
    """Per axis, the indices of ``old`` that ``new`` keeps (``new == old[np.ix_(*idx)]``).

    Index i of ``new`` along an axis is the original index shared by every occurrence
    (in ``old``) of the first few values of ``new``'s slice i: random weights repeat a
    value only by accident, so the intersection leaves one candidate.
    """
    where: dict[float, list[int]] = {}
    for flat, value in enumerate(old.reshape(-1).tolist()):
        where.setdefault(value, []).append(flat)
    kept = []
    for axis in range(old.ndim):
        idx = []
        for i in range(new.shape[axis]):
            probes = np.take(new, i, axis=axis).reshape(-1)[:16].tolist()
            candidates: set[int] | None = None
            for value in probes:
                found = {int(np.unravel_index(f, old.shape)[axis]) for f in where.get(value, [])}
                candidates = found if candidates is None else candidates & found
            if not candidates or len(candidates) != 1:
                return None
            idx.append(candidates.pop())
        kept.append(np.asarray(idx))
    if not np.array_equal(old[np.ix_(*kept)], new):
        return None
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sparsity", type=float, default=0.3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as folder:
        for name in args.models.split(","):
            src = os.path.join(folder, f"{name}.onnx")
            export(name, args.size, src)
            base = gp.graph_cost(load_onnx(src))
            gp_out = run_graphprune(src, os.path.join(folder, f"{name}-gp.onnx"), args.sparsity, base)
            sim_out = run_onnxsim(src, os.path.join(folder, f"{name}-sim.onnx"), args.sparsity, base)
            for tool, o in (("graphprune", gp_out), ("onnxsim", sim_out)):
                rows.append((name, tool, f"{o.seconds:.2f}s", f"{o.macs:.3f}", f"{o.params:.3f}", "yes" if o.runs else "NO", o.matches))
            print(f"{name}: done", flush=True)
    print(f"\nsparsity {args.sparsity} (graphprune ratio / onnxsim sparsity), input 1x3x{args.size}x{args.size}, "
          f"MACs and params as a fraction of the original\n")
    print(format_table(rows, ("model", "tool", "time", "MACs after", "params after", "ort runs", "matches reference")))


if __name__ == "__main__":
    main()
