"""SMOF rings + channels vs channels only, at equal measured onnxruntime latency.

Per seed, a ``small_resnet`` trained from scratch on ``n_per_class`` images per class with
gates (:mod:`graphprune.training.smof`) and the latency-weighted L1 penalty
``lam * sum cost_g |g|`` (each gate's saving measured in onnxruntime, one thread):

* ``ours``: ring and channel gates; gates below ``tau`` thresholded to exact zeros and
  baked, BN recalibrated, then ``shrink-kernels{lossless=true},prune-channels{lossless=true}``
  (checked equal to the thresholded model);
* ``baseline``: channel gates only, trained the same way; the channels with the smallest
  gates are zeroed (smallest first, globally, at least one kept per layer) until the slim
  model's latency is the closest to ``ours``'s, then the same lossless passes.

Latency is measured on the slim graphs as the sum of every conv's onnxruntime latency,
each conv alone at its input shape (batch 1), median of 30 runs, cached per configuration
(``ours_ms``, ``baseline_ms``; ``dense_ms`` for the unpruned net).  ``*_model_ms`` are the
whole slim models exported to ONNX and timed in onnxruntime (median of ``runs``): a check
that the per-conv sum tracks the real thing.  ``*_ft`` arms fine-tune each slim model for
``ft_epochs``.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from benchmarks.seeds.common import Data, accuracy, small_resnet, subset_per_class, train
from graphprune.training.smof import ChannelGate, LatencyTable, RingGate, SMOFGates, baked_state_dict, smof_penalty, smof_threshold
from graphprune.training.trp import recalibrate_bn

BASELINE_NAME = "channel gates only, pruned to the same measured onnxruntime latency"
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
DEFAULTS: dict[str, Any] = {
    "width": 16, "n_per_class": 400, "n_test": 2000, "epochs": 4, "ft_epochs": 1, "lr": 0.05, "batch": 128,
    "lam": 0.6, "tau": 0.2, "per_axis": False, "channel_step": 4, "runs": 50,
    "latency_cache": os.path.join(RESULTS, "smof_latency_cache.json"),
}
TINY: dict[str, Any] = {"width": 8, "n_per_class": 30, "n_test": 200, "epochs": 1, "ft_epochs": 0, "runs": 5,
                        "latency_cache": None}

PIPELINE = "shrink-kernels{lossless=true,per_axis=%s},prune-channels{lossless=true}"


def _calib(x: torch.Tensor, batch: int = 128, n: int = 8) -> list[torch.Tensor]:
    return [x[i:i + batch] for i in range(0, min(len(x), n * batch), batch)]


def model_latency(graph: gp.Graph, runs: int) -> float:
    """Whole-model onnxruntime CPU latency (ms, one thread, median of ``runs``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        graph.to_onnx(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        x = {name: graph.example_inputs()[0].numpy()}
        for _ in range(3):
            sess.run(None, x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, x)
            times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def _slim(model: nn.Module, example: torch.Tensor, per_axis: bool) -> gp.PipelineResult:
    model.eval()
    result = gp.run(gp.trace(model, example), PIPELINE % str(per_axis).lower())
    with torch.no_grad():
        a, b = result.graph.to_module()(example), model(example)
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= 1e-4, f"slim model differs from the thresholded one by {err:.3g}"
    return result


def _train_gated(model: nn.Module, sub: Data, s: dict[str, Any], seed: int) -> None:
    lam = float(s["lam"])

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(xb), yb) + lam * smof_penalty(m)

    train(model, sub.x_train, sub.y_train, s["epochs"], s["lr"], s["batch"], seed, loss_fn=loss_fn)


def _zero_smallest_channels(gated: nn.Module, fresh: nn.Module, k: int) -> nn.Module:
    """``fresh`` (an ungated instance) loaded with ``gated``'s baked weights after its ``k``
    smallest channel gates (globally) are set to 0, keeping each layer's largest gate;
    ``gated`` is left as it was."""
    gates = [m for m in gated.modules() if isinstance(m, ChannelGate)]
    saved = [g.gates.detach().clone() for g in gates]
    entries = []
    for gi, g in enumerate(gates):
        keep = int(g.gates.detach().abs().argmax())
        entries += [(float(abs(v)), gi, c) for c, v in enumerate(g.gates.detach().tolist()) if c != keep]
    entries.sort()
    with torch.no_grad():
        for _, gi, c in entries[:k]:
            gates[gi].gates[c] = 0.0
        state = baked_state_dict(gated)
        for g, v in zip(gates, saved):
            g.gates.copy_(v)
    fresh.load_state_dict(state)
    return fresh


def run_seed(seed: int, data: Data, s: dict[str, Any]) -> dict[str, float]:
    sub = subset_per_class(data, s["n_per_class"], seed)
    xt, yt = data.x_test[: s["n_test"]], data.y_test[: s["n_test"]]
    example = sub.x_train[:1]
    calib = _calib(sub.x_train)
    cache = s.get("latency_cache")
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
    table = LatencyTable(cache, runs=30)
    per_axis = bool(s["per_axis"])

    torch.manual_seed(seed)
    dense = small_resnet(data.in_ch, data.n_classes, s["width"]).eval()
    dense_ms = table.graph_latency(gp.trace(dense, example))

    # ours: rings + channels
    torch.manual_seed(seed)
    ours = small_resnet(data.in_ch, data.n_classes, s["width"])
    SMOFGates(ours, example, rings=True, channels=True, per_axis=per_axis, weight="latency",
              latency_cache=cache, latency_channel_step=s["channel_step"])
    _train_gated(ours, sub, s, seed)
    ring_values = torch.cat([m.gates.detach().abs().flatten() for m in ours.modules() if isinstance(m, RingGate)])
    chan_values = torch.cat([m.gates.detach().abs().flatten() for m in ours.modules() if isinstance(m, ChannelGate)])
    counts = smof_threshold(ours, s["tau"])
    recalibrate_bn(ours, calib)
    res_ours = _slim(ours, example, per_axis)
    ours_ms = table.graph_latency(res_ours.graph)

    # baseline: channels only, matched to ours's latency
    torch.manual_seed(seed)
    gated = small_resnet(data.in_ch, data.n_classes, s["width"])
    SMOFGates(gated, example, rings=False, channels=True, weight="latency",
              latency_cache=cache, latency_channel_step=s["channel_step"])
    _train_gated(gated, sub, s, seed)
    n = sum(int(m.gates.numel()) - 1 for m in gated.modules() if isinstance(m, ChannelGate))
    tried: dict[int, tuple[float, nn.Module, gp.PipelineResult]] = {}

    def at(k: int) -> float:
        if k not in tried:
            model = _zero_smallest_channels(gated, small_resnet(data.in_ch, data.n_classes, s["width"]), k)
            recalibrate_bn(model, calib)
            res = _slim(model, example, per_axis)
            tried[k] = (table.graph_latency(res.graph), model, res)
        return tried[k][0]

    lo, hi = 0, n
    while hi - lo > 1:  # latency falls as k grows: find the k closest to ours_ms
        mid = (lo + hi) // 2
        if at(mid) > ours_ms:
            lo = mid
        else:
            hi = mid
    k = min((lo, hi), key=lambda j: abs(at(j) - ours_ms))
    base_ms, base_model, res_base = tried[k]

    slim_ours, slim_base = res_ours.graph.to_module(), res_base.graph.to_module()
    out = {
        "ours": accuracy(slim_ours, xt, yt),
        "baseline": accuracy(slim_base, xt, yt),
        "ours_ms": ours_ms,
        "baseline_ms": base_ms,
        "dense_ms": dense_ms,
        "ours_model_ms": model_latency(res_ours.graph, s["runs"]),
        "baseline_model_ms": model_latency(res_base.graph, s["runs"]),
        "dense_model_ms": model_latency(gp.trace(dense, example), s["runs"]),
        "ours_rings_zeroed": counts["rings"],
        "ours_ring_gate_median": float(ring_values.median()),
        "ours_channel_gate_median": float(chan_values.median()),
        "ours_channels_zeroed": counts["channels"],
        "baseline_channels_zeroed": k,
        "ours_macs_ratio": gp.graph_cost(res_ours.graph).macs / gp.graph_cost(gp.trace(dense, example)).macs,
        "baseline_macs_ratio": gp.graph_cost(res_base.graph).macs / gp.graph_cost(gp.trace(dense, example)).macs,
    }
    if s["ft_epochs"] > 0:
        for name, slim in (("ours_ft", slim_ours), ("baseline_ft", slim_base)):
            train(slim, sub.x_train, sub.y_train, s["ft_epochs"], s["lr"] / 5, s["batch"], seed + 1000)
            out[name] = accuracy(slim, xt, yt)
    return out
