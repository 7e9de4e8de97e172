"""What every ``graphprune`` subcommand module shares: exit codes, the subcommand
registry and plain-text tables.

:mod:`graphprune.cli` builds the parser from :data:`COMMANDS`; modules that add
subcommands (:mod:`graphprune.onnx_cli`) register them with :func:`command`.  Both import
this module, and neither imports the other at module level, so there is no import cycle.
Exit codes: 0 ok, 1 a verification failed, 2 bad input.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

__all__ = ["COMMANDS", "Command", "EXIT_BAD_INPUT", "EXIT_CHECK", "EXIT_OK", "command", "format_table"]

EXIT_OK, EXIT_CHECK, EXIT_BAD_INPUT = 0, 1, 2

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register a subcommand: ``configure`` adds its arguments, the function runs it."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (configure, fn)
        return fn

    return register


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Rows under a header and a dashed rule; the first column left-aligned, the rest right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
