"""The ``graphprune`` command line.

Subcommands: ``demo`` (prune the shipped sample model, verify, export, print a table),
``passes`` (list the registered passes and their options).  Exit codes: 0 ok,
1 a verification failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .cli_base import COMMANDS, EXIT_BAD_INPUT, EXIT_CHECK, EXIT_OK, Command, command, format_table  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .graph import Graph


def layer_table(before: Graph, after: Graph) -> str:
    """Per weighted layer: output channels, MACs and parameters before and after."""
    from .cost import graph_cost

    cb, ca = graph_cost(before), graph_cost(after)
    rows = []
    after_nodes = {n.label or n.name: n for n in after.nodes}
    for node in before.nodes:
        if node.kind not in ("conv", "conv_transpose", "linear"):
            continue
        label = node.label or node.name
        other = after_nodes.get(label)
        ch_b = before.shape(node.outputs[0])[1 if node.kind != "linear" else -1]  # type: ignore[index]
        ch_a = after.shape(other.outputs[0])[1 if other.kind != "linear" else -1] if other else 0  # type: ignore[index]
        mb, pb = cb.per_node.get(label, (0, 0))
        ma, pa = ca.per_node.get(label, (0, 0))
        rows.append((label, f"{ch_b} -> {ch_a}", f"{mb:,} -> {ma:,}", f"{pb:,} -> {pa:,}"))
    rows.append(("total", "", f"{cb.macs:,} -> {ca.macs:,} ({ca.macs / max(cb.macs, 1):.1%})",
                 f"{cb.params:,} -> {ca.params:,} ({ca.params / max(cb.params, 1):.1%})"))
    return format_table(rows, ("layer", "channels", "MACs", "params"))


# ---------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="folder for the exported ONNX files")
    p.add_argument("-p", "--pipeline", default="prune-channels{ratio=0.5}", help="pipeline to run")


@command("demo", _demo_args)
def demo(args: argparse.Namespace) -> int:
    """Prune the shipped sample model, verify it, export ONNX, print before/after."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("graphprune: error: demo traces a PyTorch sample model and needs PyTorch: pip install graphprune[torch]",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    import numpy as np
    import onnx
    import onnxruntime as ort

    from . import run, trace
    from .samples.models import sample_input, sample_net
    from .verify import compare

    model, x = sample_net(), sample_input()
    graph = trace(model, x)
    print(f"sample model: SampleNet, input {tuple(x.shape)}; pipeline: {args.pipeline}")
    result = run(graph, args.pipeline)
    err = max(compare(r.graph, r.reference()) for r in result.results if r.modified) if result.modified else 0.0
    print(layer_table(graph, result.graph))
    print(f"\nexactness vs projected reference: max relative error {err:.2e}")
    os.makedirs(args.out, exist_ok=True)
    before_path, after_path = os.path.join(args.out, "sample.onnx"), os.path.join(args.out, "sample-pruned.onnx")
    graph.to_onnx(before_path)
    result.graph.to_onnx(after_path)
    onnx.checker.check_model(onnx.load(after_path))
    sess = ort.InferenceSession(after_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = result.graph.run(x)[0].numpy()
    diff = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    print(f"wrote {before_path} and {after_path}: onnx.checker ok, onnxruntime matches the pruned module ({diff:.1e})")
    return EXIT_OK if err <= 1e-5 and diff <= 1e-5 else EXIT_CHECK


# -------------------------------------------------------------------- passes
@command("passes", lambda p: None)
def list_passes(args: argparse.Namespace) -> int:
    """List the registered passes with their options and defaults."""
    from .passes_base import PASSES, _load_builtin_passes

    _load_builtin_passes()
    for name, cls in sorted(PASSES.items()):
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name}{{{opts}}}\n    {doc}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="graphprune", description="Structured-pruning compiler passes for PyTorch and ONNX models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log pass summaries (-v) or details (-vv)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in COMMANDS.items():
        sp = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        configure(sp)
        sp.set_defaults(func=fn)
    return parser


def _load_commands() -> None:
    """Import modules that register further subcommands (the ONNX optimizer)."""
    try:
        from . import onnx_cli  # noqa: F401
    except ImportError as exc:
        if "onnx_cli" not in str(exc):
            raise


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then run the subcommand.  Heavy modules (numpy-level core, onnxruntime,
    torch) are imported inside the commands, so ``--help`` and argument errors stay fast."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import BudgetError, CheckInputError, PassOptionError, VerificationError
    from .graph import GraphError

    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)], format="%(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `graphprune inspect m.onnx | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (PassOptionError, BudgetError, CheckInputError, GraphError, FileNotFoundError) as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerificationError as exc:
        print(f"graphprune: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK


if __name__ == "__main__":
    sys.exit(main())
