"""graphprune's ONNX optimizer against onnxsim's structured pruning, side by side.

For each torchvision model (random weights, ``randomize_``), exported to ONNX (opset 17,
TorchScript exporter, BatchNorm folded into the convs as the default eval export does):

* graphprune: ``load_onnx`` -> ``prune-channels{ratio=S}`` -> save, timed with the
  pipeline's exactness check (``gp.run``'s default: two probes in onnxruntime against the
  projected reference) and without it (``verify=False``);
* onnxsim: ``onnxsim.pruning.apply_structured_pruning(path, sparsity=S)`` -> save (no check).

Times are medians of ``--repeat`` runs after one untimed warm-up run of each tool, the tools alternating.  Columns: wall time, the
ratio onnxsim time / graphprune time (with graphprune's check), MACs and parameters after (fraction of the original, both priced by
graphprune's cost model on the written files), whether onnxruntime runs the written file,
and whether its outputs match the *projected reference* (the original model with the
removed weight slices zeroed) to 1e-5 relative to output scale.  graphprune's reference is
the pass's own projection; onnxsim reports none, so its removed slices are recovered by
locating the kept weight values in the original tensors (random weights make every value
unique) and zeroing the rest.

Run: ``.venv/bin/python benchmarks/vs_onnxsim.py [--models resnet18,...] [--size 224] [--sparsity 0.3] [--repeat 3]``
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
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
from graphprune.arrays import as_numpy
from graphprune.cli import format_table
from graphprune.frontends.onnx import load_onnx
from graphprune.samples.models import randomize_

DEFAULT_MODELS = (
    "resnet18,resnet50,mobilenet_v2,densenet121,efficientnet_b0,efficientnet_b1,mobilenet_v3_large,mobilenet_v3_small,"
    "regnet_y_400mf,regnet_x_400mf,googlenet,shufflenet_v2_x1_0,mnasnet1_0,squeezenet1_1,resnext50_32x4d,convnext_tiny,"
    "lraspp_mobilenet_v3_large"
)
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
    kwargs = {"weights_backbone": None} if name.startswith("lraspp") else {}
    model = randomize_(torchvision.models.get_model(name, weights=None, **kwargs)).eval()
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
        got = sess.run(None, {i.name: as_numpy(x) for i, x in zip(sess.get_inputs(), xs)})
        for g, w in zip(got, reference.run(*xs)):
            w = as_numpy(w).astype(np.float64)
            worst = max(worst, float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)))
    return worst


def cost_ratio(path: str, base: gp.Cost) -> tuple[float, float]:
    cost = gp.graph_cost(load_onnx(path))
    return cost.macs / base.macs, cost.params / base.params


def time_graphprune(src: str, dst: str, sparsity: float, verify: bool) -> tuple[float, gp.PassResult]:
    """Seconds from file to written file, with or without the pipeline's check."""
    start = time.perf_counter()
    graph = load_onnx(src)
    result = gp.run(graph, f"prune-channels{{ratio={sparsity}}}", verify=verify).results[0]
    result.graph.to_onnx(dst)
    return time.perf_counter() - start, result


def run_graphprune(src: str, dst: str, sparsity: float, base: gp.Cost) -> Outcome:
    seconds, result = time_graphprune(src, dst, sparsity, verify=True)
    macs, params = cost_ratio(dst, base)
    try:
        err = relative_error(dst, result.reference())
        return Outcome(seconds, macs, params, True, f"{'yes' if err <= RTOL else 'NO'} ({err:.1e})")
    except Exception as exc:  # onnxruntime refused the file
        return Outcome(seconds, macs, params, False, f"n/a: {str(exc).splitlines()[0][:60]}")


def time_onnxsim(src: str, dst: str, sparsity: float) -> float:
    from onnxsim.pruning import apply_structured_pruning

    start = time.perf_counter()
    model = apply_structured_pruning(src, sparsity=sparsity)
    onnx.save(model, dst)
    return time.perf_counter() - start


def run_onnxsim(src: str, dst: str, sparsity: float, base: gp.Cost) -> Outcome:
    start = time.perf_counter()
    try:
        seconds = time_onnxsim(src, dst, sparsity)
    except Exception as exc:
        return Outcome(time.perf_counter() - start, float("nan"), float("nan"), False, f"n/a: failed: {exc}"[:70])
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
    flat_old = old.reshape(-1)
    order = np.argsort(flat_old, kind="stable")
    ordered = flat_old[order]

    def where(value: float) -> np.ndarray:  # flat positions of ``value`` in ``old``
        return order[np.searchsorted(ordered, value, "left"):np.searchsorted(ordered, value, "right")]

    kept = []
    for axis in range(old.ndim):
        idx = []
        for i in range(new.shape[axis]):
            probes = np.take(new, i, axis=axis).reshape(-1)[:16].tolist()
            candidates: set[int] | None = None
            for value in probes:
                found = {int(i) for i in np.unravel_index(where(value), old.shape)[axis]}
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
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    rows, ratios, ratios_unchecked = [], [], []
    with tempfile.TemporaryDirectory(prefix="graphprune-bench-") as folder:
        for name in args.models.split(","):
            src = os.path.join(folder, f"{name}.onnx")
            export(name, args.size, src)
            base = gp.graph_cost(load_onnx(src))
            gp_dst, sim_dst = os.path.join(folder, f"{name}-gp.onnx"), os.path.join(folder, f"{name}-sim.onnx")
            gp_out = run_graphprune(src, gp_dst, args.sparsity, base)  # the warm-up (not timed)
            sim_out = run_onnxsim(src, sim_dst, args.sparsity, base)
            checked, unchecked, sim = [], [], []
            for _ in range(args.repeat):  # alternating
                checked.append(time_graphprune(src, gp_dst, args.sparsity, verify=True)[0])
                unchecked.append(time_graphprune(src, gp_dst, args.sparsity, verify=False)[0])
                sim.append(time_onnxsim(src, sim_dst, args.sparsity) if sim_out.runs else sim_out.seconds)
            t_gp, t_free, t_sim = statistics.median(checked), statistics.median(unchecked), statistics.median(sim)
            ok = sim_out.macs == sim_out.macs  # onnxsim produced a file
            if ok:
                ratios.append(t_sim / t_gp)
                ratios_unchecked.append(t_sim / t_free)
            rows.append((name, f"{t_gp:.2f}", f"{t_free:.2f}", f"{t_sim:.2f}" if ok else "-",
                         f"{t_sim / t_gp:.2f}x" if ok else "-", f"{t_sim / t_free:.2f}x" if ok else "-",
                         f"{gp_out.macs:.3f}", f"{sim_out.macs:.3f}" if ok else "-",
                         gp_out.matches, sim_out.matches))
            print(f"{name}: done: " + " | ".join(rows[-1]), flush=True)  # partial results survive a timeout
    if ratios:
        rows.append((f"geometric mean ({len(ratios)})", "", "", "", f"{statistics.geometric_mean(ratios):.2f}x",
                     f"{statistics.geometric_mean(ratios_unchecked):.2f}x", "", "", "", ""))
    print(f"\nsparsity {args.sparsity} (graphprune ratio / onnxsim sparsity), input 1x3x{args.size}x{args.size}, "
          f"1 thread, median of {args.repeat} after a warm-up, MACs as a fraction of the original\n")
    print(format_table(rows, ("model", "gp s (checked)", "gp s (no check)", "onnxsim s", "sim/gp checked",
                              "sim/gp no check", "gp MACs after", "sim MACs after", "gp matches reference",
                              "onnxsim matches reference")))


if __name__ == "__main__":
    main()
