"""Cyclic garbage collection paused during graphprune's own work.

Capturing and rewriting graphs allocates many small container objects (fx nodes, view
nodes, dictionaries), which makes CPython run its cyclic collector often; every tenth
of tenth collection is a full one that walks *every* tracked object in the process
(torch and the user's model included), 0.2-0.4 s each with torchvision loaded, at
random points of a compile.  The public entry points (``trace``, ``run``, ``load_onnx``,
``to_module``, ``to_onnx``) run with automatic collection disabled and restore it when
the outermost one returns; reference counting still frees everything acyclic at once,
and the cycles left behind are collected by the next regular collection.  Nothing
changes when the caller already disabled collection.
"""
from __future__ import annotations

import functools
import gc
from typing import Any, Callable, TypeVar

__all__ = ["gc_paused"]

ENABLED = True
"""Set to False to run the entry points with collection as the caller left it
(``benchmarks/gc_pause.py`` measures both)."""

F = TypeVar("F", bound=Callable[..., Any])


def gc_paused(fn: F) -> F:
    """Run ``fn`` with automatic cyclic collection off (restored by the outermost call)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not ENABLED or not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper  # type: ignore[return-value]
