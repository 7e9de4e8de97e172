"""Stage timers: where compile time goes, at no cost when nobody is measuring.

Library code marks its stages with ``with stage("coupling"):``.  Outside a
:func:`record` block :func:`stage` returns one shared no-op context manager (a global
flag test and a return: nothing is allocated or timed).  Inside ``with record() as
times:`` every stage adds its *exclusive* wall time to ``times[name]``: when stages
nest, the time of the inner stage is not counted again in the outer one, so the
stages of one run add up to the time spent inside any stage.

The names used by graphprune (one per compile stage):

==============  ===========================================================
``capture``     ``torch.export`` / ``torch.fx`` tracing, ONNX loading
``shapes``      shape propagation (a forward of the example inputs)
``view``        building the frontend-neutral view of the graph
``coupling``    the channel-coupling walk (pruning groups)
``scoring``     importance criteria
``search``      budget searches (MAC budget, group counts, ranks)
``rewrite``     decide-to-graph edits and their commit
``copies``      copying graphs (the pass's working copy, the reference)
``verify``      running rewritten graph and projected reference
``emit``        building the output ``nn.Module`` or ONNX file
==============  ===========================================================
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator

__all__ = ["STAGES", "StageTimes", "record", "stage"]

STAGES = ("capture", "shapes", "view", "coupling", "scoring", "search", "rewrite", "copies", "verify", "emit")


class StageTimes(dict):
    """Stage name -> exclusive seconds; :meth:`total` is their sum."""

    def total(self) -> float:
        return float(sum(self.values()))


class _Null(AbstractContextManager):
    """The context manager handed out when no recording is active."""

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL = _Null()
_active: list[StageTimes] = []  # the recordings in progress (innermost last)
_stack: list[list[Any]] = []     # open stages: [name, start, time spent in children]


def stage(name: str) -> AbstractContextManager:
    """Time the enclosed block as stage ``name`` when a :func:`record` is active."""
    if not _active:
        return _NULL
    return _timed(name)


@contextmanager
def _timed(name: str) -> Iterator[None]:
    frame = [name, time.perf_counter(), 0.0]
    _stack.append(frame)
    try:
        yield
    finally:
        _stack.pop()
        spent = time.perf_counter() - frame[1]
        if _stack:
            _stack[-1][2] += spent
        own = spent - frame[2]
        for times in _active:
            times[name] = times.get(name, 0.0) + own


@contextmanager
def record() -> Iterator[StageTimes]:
    """Collect stage times of everything run inside the block."""
    times = StageTimes()
    _active.append(times)
    try:
        yield times
    finally:
        _active.remove(times)
