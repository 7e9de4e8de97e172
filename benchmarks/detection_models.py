"""The ``--detection`` table of ``vs_torch_pruning.py``: detection, segmentation, optical
flow and Hugging Face models, graphprune and Torch-Pruning side by side.

Per model (random weights, small inputs, one subprocess each with a timeout):

* capture: ``gp.trace`` on the model as it is (``capture="auto"``: export, then fx).
  Detection models whose eval forward ends in post-processing with data-dependent
  shapes are tried whole first; if neither frontend takes them, their dense forward
  (backbone + FPN + dense head, no anchors, no NMS, no input transform) is captured,
  and the "what" column says so;
* graphprune: ``prune-channels{ratio=0.3}``, MACs after (relative), exactness against the
  projected reference, time (capture + prune), then ``gp.apply`` on the captured module
  in place (ok, or the first line of its refusal);
* Torch-Pruning: ``MetaPruner`` + ``step()``, L1, ``pruning_ratio=0.3``, output layers
  ignored (the layers named in ``HEADS``), on a copy made before ``gp.apply``; MACs after
  counted by graphprune on a fresh trace, or how it failed.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

MODELS = ("yolov8n", "yolo11n", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
          "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "raft_small", "hf_bert_tiny", "hf_vit_tiny")


class DenseDetector(nn.Module):
    """Backbone + FPN + dense head of a torchvision detector: the part of its forward with
    static shapes (anchors, box decoding, NMS and the resize/normalise transform left out).
    For Faster R-CNN the dense head is the RPN head (the RoI heads run on proposals)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head if hasattr(model, "head") else model.rpn.head

    def forward(self, x: torch.Tensor) -> Any:
        features = list(self.backbone(x).values())
        return self.head(features)


def _yolo(cfg: str) -> nn.Module:
    from ultralytics import YOLO

    return YOLO(cfg).model


def _torchvision(name: str, **kwargs: Any) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)


def _raft() -> nn.Module:
    import torchvision

    return torchvision.models.optical_flow.raft_small(weights=None)  # takes no weights_backbone


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
    return ViTModel(cfg)


def _image(size: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(1, 3, size, size),)


BUILD: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = {
    "yolov8n": (lambda: _yolo("yolov8n.yaml"), _image(64)),
    "yolo11n": (lambda: _yolo("yolo11n.yaml"), _image(64)),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: _torchvision("fasterrcnn_mobilenet_v3_large_fpn", min_size=128, max_size=128), _image(128)),
    "retinanet_resnet50_fpn": (lambda: _torchvision("retinanet_resnet50_fpn", min_size=128, max_size=128), _image(128)),
    "deeplabv3_mobilenet_v3_large": (lambda: _torchvision("deeplabv3_mobilenet_v3_large"), _image(64)),
    "lraspp_mobilenet_v3_large": (lambda: _torchvision("lraspp_mobilenet_v3_large"), _image(64)),
    "raft_small": (lambda: _raft(), lambda: (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))),
    "hf_bert_tiny": (_bert, lambda: (torch.randint(0, 128, (1, 16)),)),
    "hf_vit_tiny": (_vit, _image(32)),
}
DENSE_FALLBACK = ("fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn")


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads`` for Hugging Face attention (as in its HF examples)."""
    out: dict[nn.Module, int] = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads")):
            for proj in (m.query, m.key, m.value):
                out[proj] = m.num_attention_heads
    return out


def heads(name: str, model: nn.Module) -> list[nn.Module]:
    """Layers Torch-Pruning must leave alone: those producing the model's outputs."""
    if name.startswith("yolo"):
        return [model.model[-1]]  # Detect, as Torch-Pruning's own YOLOv8 example does
    if isinstance(model, DenseDetector):
        h = model.head
        if hasattr(h, "classification_head"):
            return [h.classification_head.cls_logits, h.regression_head.bbox_reg]
        return [h.cls_logits, h.bbox_pred]
    if name.startswith("deeplabv3"):
        return [model.classifier[-1]]
    if name.startswith("lraspp"):
        return [model.classifier.low_classifier, model.classifier.high_classifier]
    if name == "raft_small":
        return [model.update_block.flow_head]
    if name.startswith("hf_"):
        return [m for m in (getattr(model, "pooler", None),) if m is not None]
    return []


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:110] if text else ''}"


def worker(name: str, ratio: float) -> dict[str, Any]:
    import graphprune as gp
    from graphprune.samples.models import randomize_

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    make, inputs = BUILD[name]
    torch.manual_seed(0)
    model = randomize_(make()).eval()
    x = inputs()
    row: dict[str, Any] = {"model": name, "what": "whole model"}
    start = time.perf_counter()
    try:
        graph = gp.trace(model, x)
    except Exception as exc:
        if name not in DENSE_FALLBACK:
            row["capture"] = f"failed: {_line(exc)}"
            return row
        row["whole_error"] = " | ".join(l.strip()[:150] for l in str(exc).strip().splitlines()[1:3])
        model = DenseDetector(model).eval()
        row["what"] = "backbone+FPN+head (whole model: capture failed)"
        start = time.perf_counter()
        try:
            graph = gp.trace(model, x)
        except Exception as exc2:
            row["capture"] = f"failed: {_line(exc2)}"
            return row
    row["capture"] = graph.frontend.name
    row["capture_seconds"] = time.perf_counter() - start
    _partial(row)
    tp_model = copy.deepcopy(model)
    base = gp.graph_cost(graph, with_params=False).macs
    try:
        result = gp.run(graph, f"prune-channels{{ratio={ratio}}}", verify=False)
        row["gp_seconds"] = time.perf_counter() - start
        r = result.results[0]
        row["err"] = gp.compare(result.graph, r.reference(), n=1) if r.modified else 0.0
        row["gp_after"] = gp.graph_cost(result.graph, with_params=False).macs / base
    except Exception as exc:
        row["gp_error"] = _line(exc)
        result = None
    _partial(row)
    if result is not None:
        try:
            gp.apply(result, model)
            row["apply"] = "ok"
        except Exception as exc:
            row["apply"] = f"refused: {str(exc).strip().splitlines()[0][:150]}"
    _partial(row)
    try:
        import torch_pruning as tp

        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(tp_model, x[0] if len(x) == 1 else x,
                                      importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                      ignored_layers=heads(name, tp_model), num_heads=attention_heads(tp_model))
        pruner.step()
        for m in tp_model.modules():  # Torch-Pruning's HF examples: the attention's sizes follow the pruned heads
            if m in getattr(pruner, "num_heads", {}) or not hasattr(m, "attention_head_size"):
                continue
            m.num_attention_heads = pruner.num_heads.get(m.query, m.num_attention_heads)
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        row["tp_seconds"] = time.perf_counter() - start
        with torch.no_grad():
            tp_model(*x)
    except Exception as exc:
        row["tp"] = f"failed: {_line(exc)}"
        return row
    try:
        row["tp_after"] = gp.graph_cost(gp.trace(tp_model, x), with_params=False).macs / base
    except Exception as exc:
        row["tp"] = f"pruned model not traceable for MACs: {_line(exc)}"
    return row


def _partial(row: dict[str, Any]) -> None:
    """The row so far (the parent keeps the last one if the model times out later)."""
    print(json.dumps(row), flush=True)


def run_one(name: str, ratio: float, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, sys.argv[0], "--worker", name, "--ratio", str(ratio)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        row = rows[-1] if rows else {"model": name, "capture": "-"}
        row["timeout"] = f"timeout after {timeout:.0f}s"
        return row
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [l for l in proc.stderr.splitlines() if l.strip()][-1:] or [""]
    return {"model": name, "capture": f"worker exit {proc.returncode}: {tail[0][:120]}"}


def table(rows: list[dict[str, Any]]) -> str:
    from graphprune.cli import format_table

    out = []
    for r in rows:
        err = r.get("err")
        out.append((
            r["model"], r.get("what", "-"), r.get("capture", "-"),
            f"{r['gp_after']:.3f}" if "gp_after" in r else r.get("gp_error", "-"),
            "-" if err is None else ("yes" if err <= 1e-5 else f"NO ({err:.1e})"),
            f"{r['gp_seconds']:.1f}" if "gp_seconds" in r else "-", r.get("apply", "-"),
            f"{r['tp_after']:.3f}" if "tp_after" in r else r.get("tp", "-"),
            f"{r['tp_seconds']:.1f}" if "tp_seconds" in r else "-",
        ))
    text = format_table(out, ("model", "captured", "captured by", "gp MACs after", "gp exact", "gp s", "gp.apply",
                              "TP MACs after", "TP s"))
    notes = [f"  {r['model']}: whole model: {r['whole_error']}" for r in rows if "whole_error" in r]
    notes += [f"  {r['model']}: {r['timeout']} (the row shows the stages that finished)" for r in rows if "timeout" in r]
    return text + ("\n\nnotes:\n" + "\n".join(notes) if notes else "")


def main_detection(args: Any) -> int:
    if args.worker:
        print(json.dumps(worker(args.worker, args.ratio)), flush=True)
        return 0
    torch.set_num_threads(1)
    names = args.models.split(",") if args.models and not args.models.startswith("resnet50,") else list(MODELS)
    done: dict[str, dict[str, Any]] = {}
    if args.jsonl:  # rows already there are reused; delete a line to run that model again
        with open(args.jsonl, "a+") as f:
            f.seek(0)
            done = {d["model"]: d for d in map(json.loads, f.read().splitlines())}
    rows = []
    for name in names:
        if name not in done:
            start = time.perf_counter()
            done[name] = run_one(name, args.ratio, args.timeout)
            print(f"done {name} {time.perf_counter() - start:.0f}s: {json.dumps(done[name])}", file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(done[name]) + "\n")
        rows.append(done[name])
    print(f"prune-channels ratio={args.ratio} vs Torch-Pruning MetaPruner (L1, output layers ignored), random weights, "
          "1 thread; MACs after relative to the captured graph, both counted by graphprune")
    print(table(rows))
    return 0
