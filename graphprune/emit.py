"""Emitters: write ONNX files atomically.

Files are written to a temporary file in the destination folder and renamed into place,
so a failed export never leaves a truncated file, and an input file is never the output.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Any, Iterator, Sequence

from .graph import GraphError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".onnx") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.  The file
    gets the mode a plain ``open`` would give it (``0o666`` less the umask), not
    ``mkstemp``'s private ``0o600``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphprune-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise :class:`GraphError` naming ``path`` unless a file can be written there: not a
    directory, its nearest existing folder a folder we can create files in (probed by
    creating and removing a temporary file, which also catches read-only file systems
    and root on them)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GraphError(f"{what} `{path}` is a directory: give a file name, e.g. {os.path.join(path, 'model.onnx')}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise GraphError(f"cannot write {what} `{path}`: `{folder}` is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".graphprune-probe-", dir=folder)
    except OSError as exc:
        raise GraphError(f"cannot write {what} `{path}`: {exc.strerror or exc} (folder `{folder}`)") from None
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_module_onnx(module: Any, inputs: Sequence[Any], path: str, opset: int = 17) -> None:
    """Export the ``nn.Module`` ``module`` with the TorchScript exporter (no external
    data), atomically.  Needs torch."""
    import torch

    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, tuple(inputs), tmp, opset_version=opset, dynamo=False,
                input_names=[f"input{i}" if i else "input" for i in range(len(inputs))],
                do_constant_folding=True,
            )
        except Exception as exc:
            raise GraphError(f"ONNX export failed: {exc}") from exc
