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
def _passes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a pass to describe in full (its documentation and every option)")


@command("passes", _passes_args)
def list_passes(args: argparse.Namespace) -> int:
    """List the registered passes, or describe one: graphprune passes NAME."""
    from .passes_base import PASSES, get_pass

    if args.name:
        print(describe_pass(get_pass(args.name)))
        return EXIT_OK
    get_pass("prune-channels")  # loads the built-in passes
    for name, cls in sorted(PASSES.items()):
        opts = ", ".join(f"{f.name}={_default(f)}" for f in _cli_fields(cls))
        print(f"{name}{{{opts}}}\n    {_first_paragraph(cls.__doc__ or '')}")
    print("\n`graphprune passes NAME` describes a pass and each option.")
    return EXIT_OK


def describe_pass(cls: type) -> str:
    """A pass's module documentation, then each option with its type, default and meaning."""
    import sys as _sys
    import textwrap
    import typing

    module_doc = (_sys.modules[cls.__module__].__doc__ or "").strip()
    docs = option_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = [(f.name, _type_name(hints.get(f.name)), _default(f), docs.get(f.name, "")) for f in dataclasses.fields(cls)]
    lines = [module_doc or (cls.__doc__ or "").strip(), "", f"options of {cls.name} (write {cls.name}{{option=value,...}}):"]
    for name, typ, default, meaning in rows:
        lines.append(f"  {name}: {typ} = {default}")
        lines.extend(textwrap.wrap(meaning, 88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def option_docs(cls: type) -> dict[str, str]:
    """``{option: meaning}`` from the ``Options:`` section of a pass's class docstring
    (``name: text`` lines, continuation lines indented further)."""
    import inspect

    doc = inspect.cleandoc(cls.__doc__ or "")
    out: dict[str, str] = {}
    current = None
    inside = False
    for line in doc.splitlines():
        if line.strip() == "Options:":
            inside = True
            continue
        if not inside or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name, colon, text = line.strip().partition(":")
        if indent <= 4 and colon and name.isidentifier():
            current = name
            out[name] = text.strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line (whole sentences, never cut)."""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.repr]  # Python-only options (tensors) are not shown


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ";".join(map(str, value)) if value else "(none)"
    return "none" if value is None else str(value)


def _type_name(hint: object) -> str:
    import typing

    if hint is None:
        return "?"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "list of " + _type_name(args[0] if args else str)
    if args and len(args) < len(typing.get_args(hint)):
        return _type_name(args[0]) + " or none"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    common = _global_flags()
    parser = argparse.ArgumentParser(prog="graphprune", parents=[common],
                                     description="Structured-pruning compiler passes for PyTorch and ONNX models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=(fn.__doc__ or "").strip().splitlines()[0])
        configure(sp)
        sp.set_defaults(func=fn)
    return parser


def _global_flags() -> argparse.ArgumentParser:
    """``-v``/``-q``, accepted before or after the subcommand (defaults suppressed, so
    the subcommand's parser does not overwrite a flag given before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log pass summaries (-v) or details (-vv)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="log errors only (no warnings)")
    return common


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "quiet", False):
        return logging.ERROR
    return [logging.WARNING, logging.INFO, logging.DEBUG][min(getattr(args, "verbose", 0), 2)]


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

    logging.basicConfig(level=_log_level(args), format="%(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `graphprune inspect m.onnx | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (PassOptionError, BudgetError, CheckInputError, GraphError, FileNotFoundError) as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # an unreadable input, a full disk, a folder that went away: one line naming the path
        where = f" `{exc.filename}`" if exc.filename else ""
        print(f"graphprune: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerificationError as exc:
        print(f"graphprune: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK


if __name__ == "__main__":
    sys.exit(main())
