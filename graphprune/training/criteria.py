"""Data-driven channel importance: KL divergence (CURL) and first-order Taylor.

Both follow the :class:`~graphprune.importance.Importance` interface (``score(graph,
group) -> one score per channel class``) and are registered in
:data:`graphprune.importance.CRITERIA` as ``kl`` and ``taylor``; they need calibration
data, given as ``gp.run(graph, pipeline, data=...)`` (or ``graphprune optimize
--calibration FILE.npz``).  Accepted data (:func:`calibration_batches`): a tensor (one
input), ``(x, labels)`` with integer labels, a tuple of tensors (one per model input),
a mapping ``{input name: array, "labels": array}`` (an ``.npz``), or an iterable of
those (a ``DataLoader``).

KL (CURL).  For a channel class ``c`` let ``P_c`` be the projection that prunes ``c``
alone — it zeroes exactly the parameter slices ``prune-channels`` removes for ``c``
(:func:`graphprune.channels.group_projection`), so classes inside residual connections
(a stream's channel across all its blocks) and outside are treated alike.  With
``p(x) = softmax(f(x))`` of the first model output (softmax over its last axis)::

    score_c = (1/N) sum_x KL(p_{P_c}(x) || p(x)) = (1/N) sum_x sum_k p_{P_c,k} (log p_{P_c,k} - log p_k)

A class whose projection changes nothing scores 0; high scores mark classes the output
distribution depends on.  Scores are comparable across groups (no per-group
normalisation in a global ranking).

Batched evaluation.  Pruning class ``c`` makes every tensor value of the class zero in
channel ``c`` (producers' filters, norms' scales and shifts are zeroed; consumers'
columns are zeroed, so what they read there no longer matters; every op on the way is
per channel).  So on a frontend that can mask values while running (fx:
:meth:`Graph.masked_runner`) ``K`` classes are scored in one forward pass: the proxy
batch is replicated ``K`` times and replica ``k`` has class ``k``'s channels multiplied
by 0 at every port of the class.  The part of the graph before the group's first port
is not affected by the masks, so it runs once per proxy batch and only the suffix runs
on the replicas.  On other frontends (ONNX) each class is one run of the projected
reference (a test checks both give the same scores).

Cost: one unmasked pass, then for every class ``B`` sample evaluations of the graph
suffix that starts at its group's first port (``B`` proxy samples), in passes of
``rows`` (default 512) replicated samples; memory: every intermediate value of the
proxy batch plus one pass of ``rows`` samples.  ResNet-50 at 224x224 has about 26k
classes; with ``B = 8`` that is about 210k sample evaluations of suffixes averaging
roughly half the network's 4.1 GMAC, ~0.4 PMAC: minutes on a GPU, hours on a 2-core
CPU (there, score at a lower proxy resolution or with a smaller ``B``).  The small
residual nets of ``benchmarks/seeds`` (~150 classes, ``B = 64``) score in seconds to a
minute on one core.  Measured (one thread): torchvision ResNet-18 at 32x32, ``B = 4``,
2880 classes in 3.0 s of CPU time; 11.6 s when every replica runs the whole graph.

Taylor.  First-order estimate of the loss change when class ``c``'s slices are zeroed::

    score_c = | sum_{(key, axis) of c} sum_{i in slice} g_i * w_i |,   g = dL/dw

summed over every parameter slice the projection of ``c`` zeroes (filters, biases, norm
scales and shifts, consumer columns; running statistics are buffers and carry no
gradient), with ``L`` the mean over the calibration samples of the cross-entropy of the
first output against the labels when the data has labels, else of the output's squared
norm ``||f(x)||^2``.  The graph is evaluated in eval mode (norms use their running
statistics).  Needs a frontend that can differentiate (fx).

Distributed.  Under ``torch.distributed`` each rank scores its own calibration shard and
the scores (Taylor: the signed sums before the absolute value) are averaged over ranks,
so every rank takes the same pruning decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.channels import group_projection
from graphprune.coupling import PruningGroup
from graphprune.graph import Graph, GraphError

from . import distributed as dist

__all__ = ["CalibrationBatch", "calibration_batches", "kl_importance", "taylor_importance"]

NO_GRAD_ROLES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


@dataclass
class CalibrationBatch:
    inputs: list[torch.Tensor]
    labels: torch.Tensor | None = None


def _tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _is_array(a: Any) -> bool:
    return isinstance(a, (torch.Tensor, np.ndarray))


def _is_labels(y: Any, x: Any) -> bool:
    y = _tensor(y)
    return not y.is_floating_point() and y.dim() == 1 and len(y) == len(_tensor(x))


def calibration_batches(data: Any, graph: Graph) -> list[CalibrationBatch]:
    """Normalise calibration ``data`` (see the module docstring) to batches whose inputs
    follow ``graph``'s input order and dtypes."""
    n_inputs = len(graph.inputs)
    examples = [_tensor(x) for x in graph.example_inputs()]
    out: list[CalibrationBatch] = []

    def cast(ts: list[Any]) -> list[torch.Tensor]:
        res = []
        for t, ex in zip(ts, examples):
            t = _tensor(t)
            res.append(t.to(ex.dtype) if ex.is_floating_point() or t.dtype != ex.dtype else t)
        return res

    def one(item: Any) -> bool:
        if isinstance(item, CalibrationBatch):
            out.append(item)
            return True
        if _is_array(item):
            if n_inputs != 1:
                raise GraphError(f"calibration data: the model takes {n_inputs} inputs ({', '.join(graph.inputs)}), got one array")
            out.append(CalibrationBatch(cast([item])))
            return True
        if isinstance(item, Mapping):
            labels = item.get("labels")
            arrays = {k: v for k, v in item.items() if k != "labels"}
            if set(arrays) >= set(graph.inputs):
                xs = [arrays[n] for n in graph.inputs]
            elif len(arrays) == n_inputs == 1:
                xs = list(arrays.values())
            else:
                raise GraphError(
                    f"calibration data: arrays {sorted(arrays)} do not name the model inputs ({', '.join(graph.inputs)})"
                )
            out.append(CalibrationBatch(cast(xs), None if labels is None else _tensor(labels).long()))
            return True
        if isinstance(item, (tuple, list)) and item and all(_is_array(t) for t in item):
            if len(item) == n_inputs + 1 and _is_labels(item[-1], item[0]):
                out.append(CalibrationBatch(cast(list(item[:-1])), _tensor(item[-1]).long()))
                return True
            if len(item) == n_inputs:
                out.append(CalibrationBatch(cast(list(item))))
                return True
        return False

    if not one(data):
        if not isinstance(data, Iterable):
            raise GraphError(f"calibration data of type {type(data).__name__} is not understood")
        for item in data:
            if not one(item):
                raise GraphError(f"calibration batch of type {type(item).__name__} is not understood")
    if not out:
        raise GraphError("calibration data is empty")
    return out


def run_batch(graph: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``graph.run`` on a calibration batch, as tensors (an ONNX graph returns arrays); a
    graph whose frontend takes only its example batch size (an ONNX file exported with a
    fixed batch) is fed in chunks of that size."""
    try:
        return [_tensor(o) for o in graph.run(*inputs)]
    except Exception:
        b = int(graph.example_inputs()[0].shape[0])
        if b < 1 or int(inputs[0].shape[0]) <= b:
            raise
        parts = [[_tensor(o) for o in graph.run(*[x[i : i + b] for x in inputs])] for i in range(0, int(inputs[0].shape[0]), b)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]


# ------------------------------------------------------------------- KL
def _batched_values(graph: Graph) -> set[str]:
    """Values computed from the model inputs (they carry the batch on axis 0)."""
    batched = set(graph.inputs)
    for node in graph.nodes:
        if any(v in batched for v in node.inputs if v):
            batched.update(node.outputs)
    return batched


def _kl_rows(masked: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over samples of KL(softmax(masked) || softmax(base)) for each of ``k`` replicas."""
    b = base.shape[0]
    lm = F.log_softmax(masked.double().reshape((k,) + tuple(base.shape)), -1)
    lb = F.log_softmax(base.double(), -1).unsqueeze(0)
    kl = (lm.exp() * (lm - lb)).sum(-1)
    per_sample = kl.reshape(k, b, -1).mean(-1)
    return per_sample.sum(1)


def _maskable(graph: Graph, group: PruningGroup, batched: set[str]) -> bool:
    if not graph.can_run_masked:
        return False
    return all(p.axis > 0 for p in group.ports if p.value in batched)


def kl_importance(data: Any, rows: int = 512) -> Any:
    """The ``kl`` criterion on calibration ``data`` (see the module docstring)."""

    cache: dict[str, Any] = {}

    def prepared(graph: Graph) -> tuple[list[CalibrationBatch], list[torch.Tensor], list[Any], set[str]]:
        if cache.get("graph") is not graph:
            batches = calibration_batches(data, graph)
            runners = [graph.masked_runner(b.inputs) for b in batches] if graph.can_run_masked else []
            base = [r.outputs()[0] for r in runners] if runners else [run_batch(graph, b.inputs)[0] for b in batches]
            cache.update(graph=graph, batches=batches, base=base, runners=runners, batched=_batched_values(graph))
        return cache["batches"], cache["base"], cache["runners"], cache["batched"]

    def score(graph: Graph, group: PruningGroup) -> np.ndarray:
        batches, base, runners, batched = prepared(graph)
        classes = np.nonzero(group.prunable)[0]
        total = np.zeros(group.n_classes)
        n = sum(int(b.inputs[0].shape[0]) for b in batches)
        if runners and _maskable(graph, group, batched):
            for batch, logits, runner in zip(batches, base, runners):
                total += _kl_masked(graph, group, classes, batch, logits, runner, batched, rows)
        else:
            for c in classes:
                keep = np.ones(group.n_classes, bool)
                keep[c] = False
                ref = group_projection(graph, group, keep).apply(graph)
                total[c] = sum(float(_kl_rows(run_batch(ref, b.inputs)[0], lg, 1)[0]) for b, lg in zip(batches, base))
        return dist.mean_array(total / max(n, 1))

    score.__name__ = "kl"
    score.comparable = True  # type: ignore[attr-defined]
    return score


def _kl_masked(graph: Graph, group: PruningGroup, classes: np.ndarray, batch: CalibrationBatch,
               logits: torch.Tensor, runner: Any, batched: set[str], rows: int) -> np.ndarray:
    """KL sums of ``classes`` on one batch, ``rows // B`` classes per forward pass."""
    b = int(batch.inputs[0].shape[0])
    k_max = max(1, rows // b)
    out = np.zeros(group.n_classes)
    ports = [p for p in group.ports if p.value in batched]
    for start in range(0, len(classes), k_max):
        chunk = torch.as_tensor(classes[start : start + k_max])
        k = len(chunk)
        masks: dict[str, torch.Tensor] = {}
        for port in ports:
            cls = torch.as_tensor(group.class_of[port])
            m = (cls.unsqueeze(0) != chunk.unsqueeze(1)).float().repeat_interleave(b, 0)  # (k*B, C)
            rank = len(graph.shape(port.value) or ()) or 2
            m = m.reshape(k * b, *([1] * (port.axis - 1)), m.shape[1], *([1] * (rank - port.axis - 1)))
            masks[port.value] = masks[port.value] * m if port.value in masks else m
        masked = runner(masks, k)[0]
        out[chunk.numpy()] = _kl_rows(masked, logits, k).numpy()
    return out


# ------------------------------------------------------------------- Taylor
def _loss(outputs: list[torch.Tensor], labels: torch.Tensor | None, n_total: int) -> torch.Tensor:
    out = outputs[0]
    if labels is not None:
        return F.cross_entropy(out.reshape(len(labels), -1), labels, reduction="sum") / n_total
    return out.pow(2).reshape(out.shape[0], -1).sum() / n_total


def taylor_importance(data: Any) -> Any:
    """The ``taylor`` criterion on calibration ``data`` (see the module docstring)."""
    cache: dict[str, Any] = {}

    def products(graph: Graph) -> dict[str, torch.Tensor]:
        if cache.get("graph") is not graph:
            keys = sorted({k for node in graph.nodes for role, k in node.params.items()
                           if role not in NO_GRAD_ROLES and np.issubdtype(graph.param(k).dtype, np.floating)})
            batches = calibration_batches(data, graph)
            n_total = sum(int(b.inputs[0].shape[0]) for b in batches)
            grads: dict[str, torch.Tensor] = {}
            for b in batches:
                g = graph.gradients(b.inputs, lambda outs, lab=b.labels: _loss(outs, lab, n_total), keys)
                for k, v in g.items():
                    grads[k] = grads[k] + v if k in grads else v
            cache.update(graph=graph, prods={k: (grads[k].cpu() * torch.from_numpy(graph.param(k))).double() for k in keys})
        return cache["prods"]

    def score(graph: Graph, group: PruningGroup) -> np.ndarray:
        prods = products(graph)
        signed = np.zeros(group.n_classes)
        done: set[tuple[str, int]] = set()
        for port, members in group.members.items():
            cls = group.class_of[port]
            for m in members:
                for role, axis in m.coupling.slices:
                    key = m.node.params[role]
                    if key not in prods or (key, axis) in done:
                        continue
                    done.add((key, axis))
                    t = prods[key]
                    np.add.at(signed, cls, t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1).numpy())
        return np.abs(dist.mean_array(signed))

    score.__name__ = "taylor"
    score.comparable = True  # type: ignore[attr-defined]
    return score
