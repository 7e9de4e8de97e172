"""Save a pruned model as Python source plus weights, and load it without pickled code.

:func:`save` writes a directory::

    model.py             generated source: a ``PrunedModel(nn.Module)`` whose ``__init__``
                         declares every parameter and buffer with its shape and dtype and
                         whose ``forward`` is the pruned graph's code (aten ops)
    weights.safetensors  the tensors, by qualified name (safetensors stores no code)
    graphprune.json      format version, inputs and outputs, graphprune version

:func:`load` imports ``model.py``, builds the module and loads the weights with
``safetensors`` (no ``pickle``, the same guarantee as ``torch.load(weights_only=True)``).
The forward takes the captured inputs positionally and returns the outputs in the
model's own structure where tuples, lists and dicts express it (else a flat tuple).  A graph from the fx frontend (or a plain module) is captured with
``torch.export`` first, so the file always holds aten-level code.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .graph import Graph, GraphError

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_SOURCE, _WEIGHTS, _META = "model.py", "weights.safetensors", "graphprune.json"


def save(obj: Graph | nn.Module | Any, path: str | os.PathLike, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None) -> str:
    """Write ``obj`` (a :class:`Graph`, a pass/pipeline result, or an ``nn.Module`` with
    ``example_inputs``) to directory ``path`` atomically; return the path."""
    gm, inputs = _graph_module(obj, example_inputs)
    tensors, parameters = _tensors(gm)
    source = _source(gm, tensors, parameters)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".graphprune-save-", dir=parent)
    try:
        _write_weights(os.path.join(tmp, _WEIGHTS), tensors)
        with open(os.path.join(tmp, _SOURCE), "w") as f:
            f.write(source)
        meta = {"format": FORMAT_VERSION, "inputs": [list(t.shape) for t in inputs],
                "input_dtypes": [str(t.dtype) for t in inputs], "graphprune": _version()}
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save` (source import + safetensors weights)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    for name in (_SOURCE, _WEIGHTS, _META):
        if not os.path.isfile(os.path.join(path, name)):
            raise GraphError(f"`{path}` is not a saved graphprune model: `{name}` is missing")
    with open(os.path.join(path, _META)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise GraphError(f"`{path}` has format {meta.get('format')}; this graphprune reads format {FORMAT_VERSION}")
    name = f"graphprune_saved_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, _SOURCE))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.PrunedModel()
    model.load_state_dict(load_file(os.path.join(path, _WEIGHTS)), strict=True)
    return model.eval()


# ------------------------------------------------------------------ helpers
def _graph_module(obj: Any, example_inputs: Any) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    from .frontends.export import capture_export

    graph = obj if isinstance(obj, Graph) else getattr(obj, "graph", None)
    if isinstance(graph, Graph):
        if graph.frontend.name == "export":
            return graph.frontend.gm, graph.example_inputs()
        if graph.frontend.name != "fx":
            raise GraphError(f"save writes PyTorch models; save a {graph.frontend.name} graph with save_onnx")
        module, inputs = graph.to_module().eval(), graph.example_inputs()
    elif isinstance(obj, nn.Module):
        if example_inputs is None:
            raise GraphError("save(module, path, example_inputs): a module needs example inputs to capture it")
        module = obj
        inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    else:
        raise GraphError(f"cannot save a {type(obj).__name__}")
    captured = capture_export(module, inputs)
    return captured.frontend.gm, captured.example_inputs()  # type: ignore[attr-defined]


def _tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor the code reads (``get_attr`` targets), and which are parameters."""
    tensors: dict[str, torch.Tensor] = {}
    parameters: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            key = str(n.target)
            path, _, attr = key.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            value = getattr(owner, attr)
            if not isinstance(value, torch.Tensor):
                raise GraphError(f"`{key}` is not a tensor and cannot be saved")
            tensors[key] = value.detach()
            if isinstance(value, nn.Parameter):
                parameters.add(key)
        elif n.op == "call_module":
            raise GraphError(f"node `{n.name}` calls module `{n.target}`; only aten-level graphs are saved as code")
    return tensors, parameters


def _write_weights(file: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, file)


def _source(gm: fx.GraphModule, tensors: dict[str, torch.Tensor], parameters: set[str]) -> str:
    code = gm.graph.python_code(root_module="self")
    decls = {k: (list(v.shape), str(v.dtype).replace("torch.", ""), k in parameters) for k, v in tensors.items()}
    forward = "\n".join("    " + line if line.strip() else "" for line in code.src.strip("\n").splitlines())
    return _TEMPLATE.format(version=_version(), imports="\n".join(_imports(code.globals)),
                            decls=_literal(decls), forward=forward)


def _literal(decls: dict[str, tuple[list[int], str, bool]]) -> str:
    """The tensor table as a Python literal, one entry a line."""
    rows = [f"    {k!r}: ({shape!r}, {dtype!r}, {param!r})," for k, (shape, dtype, param) in decls.items()]
    return "{\n" + "\n".join(rows) + "\n}"


def _imports(globals_: dict[str, Any]) -> list[str]:
    """Import lines that define every global name the generated forward uses."""
    lines = []
    for name, obj in sorted(globals_.items()):
        if name in ("torch",):
            continue
        if name in ("inf", "nan"):
            lines.append(f"from math import {name}")
        elif name == "NoneType":
            lines.append("NoneType = type(None)")
        elif isinstance(obj, type(sys)):
            lines.append(f"import {obj.__name__} as {name}")
        elif getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
            module = "torch" if obj.__module__.startswith("torch") and hasattr(torch, obj.__qualname__) else obj.__module__
            lines.append(f"from {module} import {obj.__qualname__} as {name}")
        else:
            raise GraphError(f"the generated code uses `{name}` ({type(obj).__name__}), which cannot be imported")
    return lines


def _version() -> str:
    from .version import __version__

    return __version__


_TEMPLATE = '''"""A pruned model written by graphprune {version}: weights in weights.safetensors.

Load it with ``graphprune.load(folder)``; the forward takes the captured inputs
positionally and returns the outputs as the captured model did.
"""
import torch
from torch import nn
{imports}

# qualified name -> (shape, dtype, is a parameter)
TENSORS = {decls}


def _put(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    *path, attr = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if parameter:
        owner.register_parameter(attr, nn.Parameter(value))
    else:
        owner.register_buffer(attr, value)


class PrunedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (shape, dtype, parameter) in TENSORS.items():
            _put(self, name, torch.empty(shape, dtype=getattr(torch, dtype)), parameter)

{forward}
'''
