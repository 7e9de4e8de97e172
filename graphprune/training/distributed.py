"""Collective helpers that make data-driven decisions identical on every rank.

Under ``torch.distributed`` (initialised, world size > 1) each rank sees a different
shard of the data, so anything computed from data — criterion scores, the EPI trigger,
label-table rows — is reduced or broadcast before it decides anything.  Every helper is
a no-op in a single process, so the same code runs with and without ``torchrun``.
"""
from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["active", "rank", "world_size", "mean_", "broadcast_object", "all_gather_rows"]

T = TypeVar("T")


def active() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks, in place (float64 on the wire for float inputs)."""
    if active():
        buf = t.detach().double() if t.is_floating_point() else t.detach()
        torch.distributed.all_reduce(buf)
        t.copy_(buf / world_size() if t.is_floating_point() else buf // world_size())
    return t


def mean_array(a: np.ndarray) -> np.ndarray:
    """Average a numpy array over ranks (a copy; unchanged in a single process)."""
    if not active():
        return a
    return mean_(torch.as_tensor(np.array(a, dtype=np.float64))).numpy()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled)."""
    if not active():
        return obj
    box: list[Any] = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_rows(index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's ``(index, rows)`` (rank order); ranks may hold different
    numbers of rows.  Unchanged in a single process."""
    if not active():
        return index, rows
    n = torch.tensor([len(index)], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    pad_i = torch.zeros(most, dtype=torch.long)
    pad_i[: len(index)] = index.long()
    pad_r = torch.zeros((most,) + tuple(rows.shape[1:]), dtype=rows.dtype)
    pad_r[: len(rows)] = rows.detach()
    all_i = [torch.zeros_like(pad_i) for _ in sizes]
    all_r = [torch.zeros_like(pad_r) for _ in sizes]
    torch.distributed.all_gather(all_i, pad_i)
    torch.distributed.all_gather(all_r, pad_r)
    k = [int(s) for s in sizes]
    return (torch.cat([a[:m] for a, m in zip(all_i, k)]), torch.cat([a[:m] for a, m in zip(all_r, k)]))
