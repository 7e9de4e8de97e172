"""Inputs for the exactness checks: default probes, and the user's own inputs.

A check runs the rewritten graph and its reference on the same inputs.  Random values
are right for images and features, but not for every input: a recurrent state or a
sample rate filled with noise sends a model down branches and recurrences it never
takes in use, where float rounding is amplified and an exact rewrite looks inexact.

**Default probes** (:func:`probe_inputs`, behind :meth:`Graph.random_inputs`, so the
pass manager's verification, ``optimize``'s file check and ``gp.apply`` share them).
Each input gets a role (:func:`input_role`), and each role one rule:

* ``state`` — zeros.  An input is state when its name marks it (a word starting with
  ``state``, ``hidden``, ``cache``, ``past`` or ``memory``, or the word ``h0``, ``c0``,
  ``hx``, ``cx``: ``state``, ``h0``, ``past_key_values.0.key``, ``hiddenState``), or when
  it is fed back: a graph output has its shape and the model has another floating input.
  A model whose floating inputs would all be state keeps them random (a check on
  all-zero inputs tests little beyond the biases).
* ``mask`` — ones (a word starting or ending with ``mask``: ``attention_mask``).
* ``integer`` (integer and bool inputs) — the value the model suggests, else small
  non-negative values (0..3; 0..1 for bool).  The ONNX frontend suggests the constant an
  input is compared with (``Equal(sr, 16000)`` -> 16000, through casts and reshapes);
  frontends without that hook (fx, export) suggest the user's own example values.
* ``data`` — everything else (images, audio, features): standard normal, seeded.

**The user's own inputs** (:func:`check_samples`; ``--check-inputs FILE.npz`` and
``--input-value NAME=VALUE`` on the command line, ``check_inputs=`` in Python):

* a mapping (an ``.npz`` file or a ``dict``) of arrays named by model input.  An array
  of the input's shape is one sample; one with an extra leading axis holds several
  samples (``x`` of shape ``(S, 1, 3, 224, 224)`` for an input ``(1, 3, 224, 224)``).
  Keys ``NAME:K`` (``x:0``, ``x:1``, ...) give one sample each instead.  An input with
  one sample is reused with every sample of the others.  A Python number (or a
  ``--input-value``) fills the input's whole shape in every sample;
* or a list of samples, each a mapping name -> array or a sequence in input order (a
  list whose first item is a tensor is one sample).

Every model input must be given, with the input's exact shape (as fixed for analysis)
and dtype; otherwise :class:`CheckInputError` names the input.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, Union

import numpy as np

from .arrays import as_numpy, is_torch_tensor
from .errors import CheckInputError

__all__ = [
    "CheckInputError", "CheckInputs", "InputSpec", "check_samples", "input_role", "input_specs",
    "load_npz", "parse_input_values", "probe_inputs",
]

CheckInputs = Union[str, "os.PathLike[str]", Mapping[str, Any], Sequence[Any]]

STATE_WORDS = ("state", "hidden", "cache", "past", "memory")
STATE_TOKENS = ("h0", "c0", "hx", "cx")
INTEGER_RANGE = 4  # integer probes take values 0..INTEGER_RANGE-1


class GraphLike(Protocol):
    """What the probes read of a :class:`graphprune.graph.Graph` (which calls into this
    module from :meth:`~graphprune.graph.Graph.random_inputs`, so it is not imported)."""

    inputs: list[str]
    outputs: list[str]
    frontend: Any

    def shape(self, value: str) -> tuple[int, ...] | None: ...

    def example_inputs(self) -> list[Any]: ...


@dataclass(frozen=True)
class InputSpec:
    """One model input as the checks see it: name, fixed shape, dtype, role, and the
    value the model suggests for it (integer inputs), if any."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    role: str
    hint: np.ndarray | None = None


# ------------------------------------------------------------------ roles
def name_words(name: str) -> list[str]:
    """Lower-case words of an input name: split at non-alphanumerics and camelCase."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def named_like_state(name: str) -> bool:
    """A word starts with ``state``/``hidden``/``cache``/``past``/``memory``, or is ``h0``/``c0``/``hx``/``cx``."""
    return any(w.startswith(STATE_WORDS) or w in STATE_TOKENS for w in name_words(name))


def named_like_mask(name: str) -> bool:
    """A word starts or ends with ``mask``."""
    return any(w.startswith("mask") or w.endswith("mask") for w in name_words(name))


def fed_back(graph: GraphLike, shape: tuple[int, ...]) -> bool:
    """Some graph output has exactly this shape (a recurrent state returned for the next call)."""
    return any(graph.shape(out) == tuple(shape) for out in graph.outputs)


def _floating(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating))


def input_role(name: str, example: np.ndarray, graph: GraphLike) -> str:
    """``integer``, ``mask``, ``state`` or ``data`` for one input (before the rule that
    keeps a model with only state-like floating inputs random)."""
    if not _floating(example.dtype):
        return "mask" if named_like_mask(name) else "integer"
    if named_like_mask(name):
        return "mask"
    if named_like_state(name):
        return "state"
    if fed_back(graph, tuple(example.shape)):
        return "fed-back"
    return "data"


def input_specs(graph: GraphLike) -> list[InputSpec]:
    """Name, shape, dtype, role and hint of every model input, in input order."""
    examples = [as_numpy(x) for x in graph.example_inputs()]
    names = list(graph.inputs) if len(graph.inputs) == len(examples) else [f"input{i}" for i in range(len(examples))]
    roles = [input_role(n, ex, graph) for n, ex in zip(names, examples)]
    floating = [i for i, ex in enumerate(examples) if _floating(ex.dtype) and roles[i] != "mask"]
    named_data = [i for i in floating if roles[i] == "data"]
    for i in floating:
        if roles[i] == "fed-back":  # fed back, not named: state only if a real data input remains
            roles[i] = "state" if named_data else "data"
    if floating and all(roles[i] == "state" for i in floating):
        for i in floating:  # never zero every floating input
            roles[i] = "data"
    hints = suggested_values(graph, names, examples)
    return [
        InputSpec(n, tuple(ex.shape), ex.dtype, role, hints.get(n))
        for n, ex, role in zip(names, examples, roles)
    ]


def suggested_values(graph: GraphLike, names: Sequence[str], examples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Values the model suggests for its integer inputs: the frontend's ``input_hints()``
    when it has one (ONNX: compared-with constants), else the example inputs themselves
    (fx and export capture the user's own example)."""
    hook = getattr(graph.frontend, "input_hints", None)
    if hook is not None:
        return {k: np.asarray(v) for k, v in hook().items()}
    return {n: ex for n, ex in zip(names, examples) if not _floating(ex.dtype)}


# ---------------------------------------------------------------- probes
def probe_tensor(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    """One probe for one input, by its role (see the module docstring)."""
    if spec.role == "state":
        return np.zeros(spec.shape, dtype=spec.dtype)
    if spec.role == "mask":
        return np.ones(spec.shape, dtype=spec.dtype)
    if spec.role == "integer":
        if spec.hint is not None:
            return np.broadcast_to(np.asarray(spec.hint).astype(spec.dtype), spec.shape).copy()
        high = 2 if spec.dtype == np.bool_ else INTEGER_RANGE
        return rng.integers(0, high, spec.shape).astype(spec.dtype)
    if spec.dtype == np.float64:
        return rng.standard_normal(spec.shape)
    return rng.standard_normal(spec.shape, dtype=np.float32).astype(spec.dtype)


def probe_inputs(graph: GraphLike, seed: int = 0) -> list[np.ndarray]:
    """The default check inputs for ``graph`` (numpy arrays), seeded (see the module docstring)."""
    rng = np.random.default_rng(seed)
    return [probe_tensor(spec, rng) for spec in input_specs(graph)]


# ------------------------------------------------------------ user inputs
def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (``--check-inputs``), by key."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: `{path}` (--check-inputs)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise CheckInputError(f"--check-inputs `{path}` holds one array, not arrays named by model input (save it with np.savez)")
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise CheckInputError(f"--check-inputs `{path}` is not a readable .npz file: {exc}") from exc


def parse_input_values(specs: Sequence[str] | None) -> dict[str, str]:
    """``["sr=16000", ...]`` -> ``{"sr": "16000"}`` (converted per input by :func:`check_samples`)."""
    out: dict[str, str] = {}
    for spec in specs or ():
        name, eq, value = spec.rpartition("=")
        if not eq or not name or not value.strip():
            raise CheckInputError(f"--input-value `{spec}` must be written NAME=VALUE (e.g. sr=16000)")
        out[name.strip()] = value.strip()
    return out


def scalar_value(spec: InputSpec, raw: Any, source: str) -> np.ndarray:
    """A number (or its text) as an array filling ``spec``'s shape, in its dtype."""
    try:
        if isinstance(raw, str):
            text = raw.lower()
            value: Any = {"true": 1, "false": 0}.get(text, None)
            value = float(raw) if value is None else value
        else:
            value = raw.item() if isinstance(raw, np.generic) or is_torch_tensor(raw) else raw
            value = float(value)
    except (TypeError, ValueError):
        raise CheckInputError(f"{source}: input `{spec.name}` needs a number, got `{raw}`") from None
    if not _floating(spec.dtype) and value != int(value):
        raise CheckInputError(f"{source}: input `{spec.name}` is {_dtype_name(spec.dtype)}, so its value must be whole, got `{raw}`")
    return np.full(spec.shape, int(value) if not _floating(spec.dtype) else value, dtype=spec.dtype)


def _dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def _check_dtype(spec: InputSpec, t: np.ndarray, source: str) -> None:
    if t.dtype != spec.dtype:
        raise CheckInputError(
            f"{source}: input `{spec.name}` is {_dtype_name(spec.dtype)}, the given array is {_dtype_name(t.dtype)} "
            f"(convert it, e.g. .astype(np.{_dtype_name(spec.dtype)}))"
        )


def samples_of(spec: InputSpec, value: Any, source: str) -> list[np.ndarray]:
    """One input's samples from one array: its shape is one sample, a leading axis more is several."""
    if isinstance(value, (bool, int, float, str)):
        return [scalar_value(spec, value, source)]
    t = as_numpy(value)
    _check_dtype(spec, t, source)
    if tuple(t.shape) == spec.shape:
        return [t]
    if t.ndim == len(spec.shape) + 1 and tuple(t.shape[1:]) == spec.shape and t.shape[0] > 0:
        return list(t)
    raise CheckInputError(
        f"{source}: input `{spec.name}` has shape {spec.shape}; the given array has shape {tuple(t.shape)} "
        f"(expected {spec.shape} for one sample or (S, {', '.join(map(str, spec.shape))}) for S samples"
        f"{'; fix dynamic dims with --input-shape' if len(t.shape) == len(spec.shape) else ''})"
    )


def _group_keys(specs: Sequence[InputSpec], data: Mapping[str, Any], source: str) -> dict[str, list[Any]]:
    """Arrays per input name: ``NAME`` holds one or S samples, ``NAME:K`` one sample each."""
    names = [s.name for s in specs]
    plain: dict[str, Any] = {}
    numbered: dict[str, dict[int, Any]] = {}
    for key, value in data.items():
        if key in names:
            plain[key] = value
            continue
        base, colon, index = key.rpartition(":")
        if colon and base in names and index.isdigit():
            numbered.setdefault(base, {})[int(index)] = value
            continue
        raise CheckInputError(f"{source} has `{key}`, which is not an input of the model (inputs: {', '.join(names)})")
    both = sorted(set(plain) & set(numbered))
    if both:
        raise CheckInputError(f"{source}: input `{both[0]}` is given both as `{both[0]}` and as `{both[0]}:K`; use one form")
    grouped: dict[str, list[Any]] = {k: [v] for k, v in plain.items()}
    for name, items in numbered.items():
        grouped[name] = [items[k] for k in sorted(items)]
    return grouped


def samples_from_mapping(
    specs: Sequence[InputSpec], data: Mapping[str, Any], values: Mapping[str, Any], source: str
) -> list[list[np.ndarray]]:
    """Samples (each a list in input order) from arrays named by input, plus fixed values."""
    names = [s.name for s in specs]
    for name in values:
        if name not in names:
            raise CheckInputError(f"--input-value names `{name}`, which is not an input of the model (inputs: {', '.join(names)})")
    grouped = _group_keys(specs, data, source)
    per_input: list[list[np.ndarray]] = []
    for spec in specs:
        if spec.name in values:
            per_input.append([scalar_value(spec, values[spec.name], "--input-value")])
        elif spec.name in grouped:
            per_input.append([t for v in grouped[spec.name] for t in samples_of(spec, v, source)])
        else:
            raise CheckInputError(
                f"{source} has no array for input `{spec.name}` {spec.shape} {_dtype_name(spec.dtype)} "
                f"(add it, or give a value with --input-value {spec.name}=VALUE)"
            )
    counts = {spec.name: len(s) for spec, s in zip(specs, per_input)}
    many = {n: c for n, c in counts.items() if c > 1}
    if len(set(many.values())) > 1:
        raise CheckInputError(f"{source}: inputs hold different numbers of samples ({', '.join(f'{n}: {c}' for n, c in many.items())})")
    total = max(counts.values(), default=1)
    return [[s[i] if len(s) > 1 else s[0] for s in per_input] for i in range(total)]


def _is_single_sample(data: Sequence[Any]) -> bool:
    return bool(data) and (isinstance(data[0], np.ndarray) or is_torch_tensor(data[0]))


def check_samples(
    graph: GraphLike,
    data: CheckInputs | None = None,
    *,
    values: Mapping[str, Any] | None = None,
    n: int = 2,
    source: str = "check_inputs",
) -> list[list[np.ndarray]]:
    """The samples the checks run on, each a list of numpy arrays in input order.

    ``data`` None: ``n`` default probes (seeds 0..n-1) with ``values`` filled in.  Else
    the user's inputs (a path to an ``.npz``, a mapping or a list of samples: see the
    module docstring), validated against the model's inputs; every sample is used.
    """
    specs = input_specs(graph)
    values = dict(values or {})
    if data is None:
        names = [s.name for s in specs]
        for name in values:
            if name not in names:
                raise CheckInputError(f"--input-value names `{name}`, which is not an input of the model (inputs: {', '.join(names)})")
        fixed = {s.name: scalar_value(s, values[s.name], "--input-value") for s in specs if s.name in values}
        return [[fixed.get(s.name, x) for s, x in zip(specs, probe_inputs(graph, seed))] for seed in range(n)]
    if isinstance(data, (str, os.PathLike)):
        source = f"--check-inputs `{os.fspath(data)}`"
        data = load_npz(data)
    if isinstance(data, Mapping):
        return samples_from_mapping(specs, data, values, source)
    items = list(data)
    if not items:
        raise CheckInputError(f"{source} is empty")
    if _is_single_sample(items):
        items = [items]
    out: list[list[np.ndarray]] = []
    for k, sample in enumerate(items):
        where = f"{source}[{k}]"
        if isinstance(sample, Mapping):
            out.extend(samples_from_mapping(specs, sample, values, where))
            continue
        sample = list(sample)
        if len(sample) != len(specs):
            raise CheckInputError(f"{where} has {len(sample)} tensors; the model takes {len(specs)} ({', '.join(s.name for s in specs)})")
        out.extend(samples_from_mapping(specs, {s.name: x for s, x in zip(specs, sample)}, values, where))
    return out
