"""``graphprune optimize`` and ``graphprune inspect``: the post-export ONNX optimizer.

``optimize IN.onnx -o OUT.onnx -p PIPELINE`` loads the model (dynamic input dims fixed by
``--input-shape``), runs the pipeline through the :class:`~graphprune.passes_base.PassManager`
(each pass checked against its projected reference), writes the result atomically and,
before the file takes its final name, runs the check inputs through onnxruntime (graph
optimisations off) on the written file: against the last pass's projected reference, or
against the input file itself with ``--lossless``.

Check inputs: ``--check N`` default probes (:mod:`graphprune.probes`: random data,
zero recurrent state, suggested or small integers), or every sample of
``--check-inputs FILE.npz`` (arrays named by model input; a leading axis or ``NAME:K``
keys for several samples); ``--input-value NAME=VALUE`` (repeatable) fixes an input to a
number in either case (a sample rate, a zero state).  The same inputs serve the pass
manager's checks and the file check.

Tolerance: ``--rtol`` if given; otherwise measured on the reference (its own noise
between onnxruntime optimisation levels x 4, within [1e-5, 1e-4]:
:func:`graphprune.verify.measured_tolerance`).  The printed line and ``--report`` give
the error, the tolerance and the measured noise.

A pass whose check fails has its inexact groups or layers frozen and the rest kept
(:mod:`graphprune.freeze`; the summary and ``--report`` list them), unless
``--no-freeze``.  A model onnxruntime cannot run (a custom op without a kernel) is
optimized unverified, with a warning.  ``-o`` and ``--report`` are checked for
writability before any work.

Exit codes: 0 ok, 1 a check failed (no output written), 2 bad input or an I/O error (no
output written; one line naming the path).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .arrays import as_numpy, is_torch_tensor
from .cli_base import EXIT_OK, command, format_table
from .graph import Graph, GraphError, Node
from .pass_api import TARGET_OPTIONS
from .passes_base import PassManager, PipelineResult, VerificationError, _split_top, get_pass, parse_pipeline
from .probes import check_samples, parse_input_values
from .verify import RTOL_FLOOR, ExactnessCheck, measured_tolerance, reference_noise, relative_error

logger = logging.getLogger(__name__)

WEIGHTED = ("conv", "conv_transpose", "linear", "matmul")


# ------------------------------------------------------------------ arguments
def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x:1,3,224,224", ...]`` -> ``{"x": (1, 3, 224, 224)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, colon, dims = spec.rpartition(":")
        if not colon or not name:
            raise GraphError(f"--input-shape `{spec}` must be written NAME:D0,D1,... (e.g. input:1,3,224,224)")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise GraphError(f"--input-shape `{spec}`: dimensions must be integers") from None
        if not shape or any(d <= 0 for d in shape):
            raise GraphError(f"--input-shape `{spec}`: dimensions must be positive integers")
        out[name] = shape
    return out


def _with_lossless(pipeline: str) -> str:
    """Add ``lossless=true`` to every pass of ``pipeline`` that has the option (so a pass
    that needs a target validates without one)."""
    import dataclasses

    items = []
    for item in _split_top(pipeline):
        name, brace, rest = item.partition("{")
        fields = {f.name for f in dataclasses.fields(get_pass(name.strip()))}
        body = rest[:-1].strip() if brace and rest.endswith("}") else rest
        given = [o.strip() for o in _split_top(body) if o.partition("=")[0].strip() in TARGET_OPTIONS]
        if given:
            raise GraphError(f"--lossless conflicts with {', '.join(given)} in `{item.strip()}`: --lossless removes only "
                             "structure that is already zero; drop one of them")
        if "lossless" in fields and "lossless=" not in body.replace(" ", ""):
            body = f"{body},lossless=true" if body else "lossless=true"
        items.append(f"{name.strip()}{{{body}}}" if body else name.strip())
    return ",".join(items)


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape", action="append", metavar="NAME:D0,D1,...", default=[],
        help="fix a dynamic input's shape for analysis (repeatable); the output keeps the symbolic dims",
    )


def _optimize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="the ONNX model to optimize (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    p.add_argument("-p", "--pipeline", default=None,
                   help="passes to run, e.g. 'prune-channels{ratio=0.3}' (default with --lossless: prune-channels)")
    p.add_argument("--lossless", action="store_true",
                   help="run every pass at its lossless setting (remove only structure that is already zero)")
    _shape_args(p)
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="calibration data for data-driven criteria (criterion=kl|taylor): arrays named by model "
                        "input, optionally `labels`")
    p.add_argument("--report", metavar="FILE", help="write per-layer channels, MACs and params before/after as JSON")
    p.add_argument("--check", type=int, default=3, metavar="N",
                   help="probe inputs to compare on the written file (0: no checks at all)")
    p.add_argument("--check-inputs", metavar="FILE.npz", default=None,
                   help="check on your own inputs instead of probes: arrays named by model input, several samples "
                        "along a leading axis or as keys NAME:0, NAME:1, ...")
    p.add_argument("--input-value", action="append", metavar="NAME=VALUE", default=[],
                   help="fix an input to a number in every check (repeatable), e.g. sr=16000 or state=0")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance of the checks, relative to output scale (default: measured from the model's own "
                        "noise between onnxruntime optimisation levels, x4, within [1e-5, 1e-4])")
    p.add_argument("--no-freeze", action="store_true",
                   help="refuse when a pass's check fails, instead of freezing the groups or layers responsible "
                        "(found by bisection) and keeping the rest")
    p.add_argument("--external-data", action="store_true", help="store tensors in OUT.onnx.data (automatic above 1.5 GiB)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="the ONNX model to inspect")
    _shape_args(p)
    p.add_argument("--ignore", action="append", default=[], metavar="NODE", help="node names whose channels must stay")


def load_calibration(path: str, graph: Graph) -> dict[str, np.ndarray]:
    """Read ``--calibration FILE.npz``: one array per model input (named as the input,
    batch on axis 0), and optionally ``labels`` (integer class per sample)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such calibration file: `{path}`")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise GraphError(f"--calibration `{path}` is not a readable .npz file: {exc}") from None
    missing = [n for n in graph.inputs if n not in arrays]
    if missing:
        raise GraphError(
            f"--calibration `{path}` has arrays {sorted(arrays)} but the model inputs are "
            f"{', '.join(graph.inputs)}; name one array per input (missing: {', '.join(missing)})"
        )
    return {k: v for k, v in arrays.items() if k in graph.inputs or k == "labels"}


# ------------------------------------------------------------------- optimize
@command("optimize", _optimize_args)
def optimize(args: argparse.Namespace) -> int:
    """Run a pass pipeline on an ONNX file and write the slimmed model."""
    from tqdm import tqdm

    from .emit import check_writable
    from .frontends.onnx import load_onnx, save_model

    src, dst = args.input, args.output
    if not os.path.exists(src):
        raise FileNotFoundError(f"no such file: `{src}`")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise GraphError(f"-o `{dst}` is the input file: graphprune never overwrites its input, choose another path")
    check_writable(dst, "-o")
    if args.report:
        check_writable(args.report, "--report")
    if args.check < 0:
        raise GraphError("--check must be 0 or more")
    if args.rtol is not None and not args.rtol > 0:
        raise GraphError("--rtol must be positive")
    if args.pipeline is None and not args.lossless:
        raise GraphError("give a pipeline with -p (e.g. -p 'prune-channels{ratio=0.3}') or use --lossless")
    text = args.pipeline or "prune-channels"
    passes = parse_pipeline(_with_lossless(text) if args.lossless else text)
    shapes = parse_input_shapes(args.input_shape)

    started = time.perf_counter()
    bar = tqdm(total=len(passes) + 2, desc="load", file=sys.stderr, disable=args.no_progress or not sys.stderr.isatty(), leave=False)
    try:
        graph = load_onnx(src, shapes)
        if args.check > 0 and not _runnable(graph):
            args.check = 0  # nothing can check the rewrite: the ops around the unrunnable one still prune
        samples = check_samples(graph, args.check_inputs, values=parse_input_values(args.input_value), n=args.check)
        bar.update(1)

        def progress(p: Any) -> None:
            bar.set_description(p.spec())
            bar.update(1)

        data = load_calibration(args.calibration, graph) if args.calibration else None
        # graphprune's own probes (no --check-inputs, no --input-value): the pipeline makes
        # the same ones and may crop them (graphprune.probe_size); the file check below
        # runs the written file on them at the full size
        own_probes = args.check_inputs is None and not args.input_value
        manager = PassManager(passes, verify=args.check > 0, rtol=args.rtol, lossless=args.lossless,
                              check_inputs=None if own_probes else samples, probes=max(args.check, 1), data=data,
                              freeze=not args.no_freeze)
        result = manager.run(graph, progress=progress)
        bar.set_description("write")
        check = _Check(args, graph, result, samples)
        with _writing(dst):
            save_model(result.graph.frontend.to_model(), dst, external_data=True if args.external_data else None,
                       protect=[src], check=check)
        bar.update(1)
    finally:
        bar.close()
    _print_summary(graph, result, check, time.perf_counter() - started, dst)
    if args.report:
        with _writing(args.report):
            _write_report(args.report, args, [p.spec() for p in manager.passes], graph, result, check)
    return EXIT_OK


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn an OS error while writing ``path`` (a full disk, a folder removed meanwhile)
    into one line naming the user's path, not the temporary file's."""
    try:
        yield
    except OSError as exc:
        raise GraphError(f"cannot write `{path}`: {exc.strerror or exc}") from None


def _runnable(graph: Graph) -> bool:
    """Whether onnxruntime runs the input; if not (a custom-domain op it has no kernel
    for), warn that the checks are skipped and return False."""
    try:
        graph.frontend.session()
        return True
    except GraphError as exc:
        print(f"graphprune: warning: {exc}; the checks are skipped and the output is not verified numerically "
              "(ops without a channel rule, such as custom-domain ops, keep their channels; --check 0 silences this)",
              file=sys.stderr)
        return False


class _Check:
    """Compare the written file with its reference on the check inputs (before it is
    renamed into place); raise :class:`VerificationError` on a mismatch."""

    def __init__(self, args: argparse.Namespace, graph: Graph, result: PipelineResult, samples: list[list[np.ndarray]]) -> None:
        self.enabled = args.check > 0
        self.samples = samples
        self.given_rtol: float | None = args.rtol
        self.lossless = args.lossless
        self.always_measure = bool(args.report)  # a report shows the noise even where it cannot matter
        self.source = args.input
        self.inputs_from = f"inputs from {args.check_inputs}" if args.check_inputs else "probe inputs"
        self.graph = graph
        self.result = result
        self.outcome: ExactnessCheck | None = None
        self.against = ""

    @property
    def n(self) -> int:
        return len(self.samples) if self.enabled else 0

    def reference(self) -> Any:
        """A callable inputs -> outputs: the input file (lossless or unchanged) or the
        projected reference."""
        if self.lossless or not self.result.modified:
            self.against = "input file"
            sess = _file_session(self.source)
            names = [i.name for i in sess.get_inputs()]
            return lambda xs: sess.run(None, {n: as_numpy(x) for n, x in zip(names, xs)})
        last = [r for r in self.result.results if r.modified][-1]
        ref = last.reference()
        self.against = f"projected reference of {last.pass_name}"
        return lambda xs: ref.run(*xs)

    def noise_source(self) -> Graph:
        """The graph whose own float noise sets the measured tolerance: the input graph
        (lossless or unchanged) or the last pass's projected reference."""
        if self._against_input:
            return self.graph
        return [r for r in self.result.results if r.modified][-1].reference()

    @property
    def _against_input(self) -> bool:
        return self.lossless or not self.result.modified

    def __call__(self, path: str) -> None:
        if not self.enabled:
            return
        reference = self.reference()
        sess = _file_session(path)
        names = [i.name for i in sess.get_inputs()]
        worst = 0.0
        expected = []
        for xs in self.samples:
            got = sess.run(None, {n: as_numpy(x) for n, x in zip(names, xs)})
            expected.append(reference(xs))
            worst = max(worst, relative_error(got, expected[-1]))
        # against the projected reference, the noise source is that same graph: its
        # outputs on these inputs are the ones just computed
        self.outcome = _outcome(worst, self.given_rtol, self.noise_source, self.samples,
                                None if self._against_input else expected, always_measure=self.always_measure)
        if not self.outcome.passed:
            raise VerificationError(
                f"the written model differs from the {self.against} by {worst:.3g} on {self.n} {self.inputs_from} "
                f"(tolerance {self.outcome.tolerance_text()}); no output was written"
            )

    def as_dict(self) -> dict[str, Any]:
        numbers = self.outcome.as_dict() if self.outcome else {"max_difference": None, "rtol": self.given_rtol, "noise": None}
        return {**numbers, "inputs": self.n, "input_source": self.inputs_from, "against": self.against}


def _outcome(
    error: float, given_rtol: float | None, reference: Callable[[], Graph], samples: list[list[np.ndarray]],
    outputs: list[list[Any]] | None = None, always_measure: bool = True,
) -> ExactnessCheck:
    """The file check's numbers: ``--rtol`` if given, else the tolerance measured from the
    noise of ``reference()``, as the pipeline's check does it: only when the error
    exceeds the floor (below it the tolerance cannot matter), unless ``always_measure``
    (a report that shows it); ``outputs`` are its outputs on ``samples`` when already computed."""
    if given_rtol is not None:
        return ExactnessCheck(error, given_rtol, None, len(samples), measured=False)
    if not always_measure and error <= RTOL_FLOOR:
        return ExactnessCheck(error, measured_tolerance(None), None, len(samples), measured=True)
    noise = reference_noise(reference(), samples, outputs=outputs)
    return ExactnessCheck(error, measured_tolerance(noise), noise, len(samples), measured=True)


def _file_session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphError(f"onnxruntime cannot run `{path}`: {str(exc).splitlines()[0]}") from exc


# --------------------------------------------------------------------- report
def _channels(graph: Graph, node: Node) -> int | None:
    shape = graph.shape(node.outputs[0]) if node.outputs else None
    if not shape:
        return None
    return int(shape[-1] if node.kind in ("linear", "matmul") else shape[1] if len(shape) > 1 else shape[0])


def layer_rows(before: Graph, after: Graph) -> list[dict[str, Any]]:
    """Per weighted layer (by label): output channels, MACs and params before and after."""
    from .cost import graph_cost

    cb, ca = graph_cost(before), graph_cost(after)
    after_nodes = {n.label or n.name: n for n in after.nodes}
    before_labels = set()
    rows = []
    for node in before.nodes:
        label = node.label or node.name
        if node.kind not in WEIGHTED and not cb.per_node.get(label, (0, 0))[0]:
            continue
        before_labels.add(label)
        other = after_nodes.get(label)
        mb, pb = cb.per_node.get(label, (0, 0))
        ma, pa = ca.per_node.get(label, (0, 0))
        rows.append({
            "layer": label, "kind": node.kind,
            "channels_before": _channels(before, node), "channels_after": _channels(after, other) if other else 0,
            "macs_before": mb, "macs_after": ma if other else 0, "params_before": pb, "params_after": pa if other else 0,
        })
    for node in after.nodes:  # layers a pass created (factorized halves, ...)
        label = node.label or node.name
        if label in before_labels or node.kind not in WEIGHTED:
            continue
        ma, pa = ca.per_node.get(label, (0, 0))
        rows.append({"layer": label, "kind": node.kind, "channels_before": None, "channels_after": _channels(after, node),
                     "macs_before": 0, "macs_after": ma, "params_before": 0, "params_after": pa})
    return rows


def _totals(before: Graph, after: Graph) -> dict[str, Any]:
    from .cost import graph_cost

    cb, ca = graph_cost(before), graph_cost(after)
    return {
        "macs_before": cb.macs, "macs_after": ca.macs, "macs_ratio": ca.macs / max(cb.macs, 1),
        "params_before": cb.params, "params_after": ca.params, "params_ratio": ca.params / max(cb.params, 1),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray) or is_torch_tensor(obj):
        return as_numpy(obj).tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _write_report(path: str, args: argparse.Namespace, specs: list[str], graph: Graph, result: PipelineResult, check: _Check) -> None:
    from .emit import atomic_path

    report = {
        "input": args.input, "output": args.output,
        "pipeline": specs, "lossless": bool(args.lossless),
        "input_shapes": {k: list(v) for k, v in graph.frontend.input_shapes().items()},
        "passes": [
            {"pass": spec, "modified": r.modified, "no_change": r.no_change or None, "frozen": r.frozen,
             "seconds": t, "records": r.records, "check": c.as_dict() if c is not None else None}
            for spec, r, t, c in zip(specs, result.results, result.timings, result.checks)
        ],
        "layers": layer_rows(graph, result.graph),
        "totals": _totals(graph, result.graph),
        "check": check.as_dict(),
    }
    with atomic_path(path, suffix=".json") as tmp, open(tmp, "w") as fh:
        json.dump(report, fh, indent=1, default=_jsonable)


def _print_summary(graph: Graph, result: PipelineResult, check: _Check, seconds: float, dst: str) -> None:
    t = _totals(graph, result.graph)
    for r, secs in zip(result.results, result.timings):
        why = f": {r.no_change}" if not r.modified and r.no_change else ""
        print(f"{r.pass_name}: {'modified' if r.modified else 'no change'}{why} ({secs:.2f}s)")
        for unit, reason in r.frozen.items():
            print(f"  froze {r.units.get(unit, unit)}: {reason}")
    print(f"MACs   {t['macs_before']:,} -> {t['macs_after']:,} ({t['macs_ratio']:.1%})")
    print(f"params {t['params_before']:,} -> {t['params_after']:,} ({t['params_ratio']:.1%})")
    if check.outcome is None:
        print("check: skipped (--check 0, or onnxruntime cannot run the model)")
    if check.outcome is not None:
        print(f"check: {check.n} {check.inputs_from} through onnxruntime, max relative difference "
              f"{check.outcome.error:.2e} vs the {check.against}; tolerance {check.outcome.tolerance_text()}")
    print(f"wrote {dst} in {seconds:.1f}s")


# -------------------------------------------------------------------- inspect
@command("inspect", _inspect_args)
def inspect_model(args: argparse.Namespace) -> int:
    """Print an ONNX model's pruning groups, frozen channels and per-layer cost."""
    from .cost import graph_cost
    from .coupling import analyse
    from .frontends.onnx import load_onnx

    if not os.path.exists(args.input):
        raise FileNotFoundError(f"no such file: `{args.input}`")
    graph = load_onnx(args.input, parse_input_shapes(args.input_shape))
    analysis = analyse(graph, ignore=args.ignore)
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in graph.frontend.input_shapes().items())
    print(f"{args.input}: {len(graph.nodes)} ops, inputs {shapes}")
    print(f"\npruning groups ({len(analysis.groups)}):")
    for g in analysis.groups:
        print(f"  {g.describe()}")
    print("\nfrozen channels:")
    reasons = analysis.frozen_reasons()
    if not reasons:
        print("  none")
    for port, reason in sorted(reasons.items(), key=lambda kv: (kv[0].value, kv[0].axis)):
        size = (graph.shape(port.value) or ())[port.axis] if graph.shape(port.value) else "?"
        print(f"  {port.value} axis {port.axis} ({size} channels): {reason}")
    unknown = [n for n in graph.nodes if n.kind == "unknown"]
    if unknown:
        print("\nops without a channel rule (their channels are frozen):")
        for n in unknown:
            print(f"  {n.label or n.name}: {n.attrs.get('reason', n.target)}")
    cost = graph_cost(graph)
    rows = []
    for node in graph.nodes:
        label = node.label or node.name
        macs, params = cost.per_node.get(label, (0, 0))
        if macs or (params and node.kind != "constant"):
            rows.append((label, node.kind, _channels(graph, node) or "", f"{macs:,}", f"{params:,}"))
    rows.append(("total", "", "", f"{cost.macs:,}", f"{cost.params:,}"))
    print("\ncost per layer:")
    print(format_table(rows, ("layer", "kind", "out channels", "MACs", "params")))
    return EXIT_OK
