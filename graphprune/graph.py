"""The frontend-neutral graph view that every analysis and pass talks to.

A :class:`Graph` is a list of :class:`Node` records in topological order over named
tensor values.  Each node has a canonical op ``kind`` (``conv``, ``linear``,
``batchnorm``, ``add``, ``concat``, ...), canonical ``attrs`` and named parameter
``params`` (role -> parameter key).  The view is rebuilt from its frontend after every
edit, so a pass reads a consistent snapshot, edits through the ``Graph`` methods, and
calls :meth:`Graph.commit` once it is done.

Frontends (``graphprune.frontends.fx``, ``.export``, ``.onnx``) implement
:class:`Frontend`; nothing above this module knows which one it is talking to.

Canonical kinds, their inputs, attrs and param roles (both frontends produce these):

=================  ==========================================================================
kind               contract
=================  ==========================================================================
conv               inputs [x]; attrs groups, stride, dilation, kernel (tuple), pads (ONNX
                   order: begin_1..begin_n, end_1..end_n); params weight (F, C/g, k...), bias
conv_transpose     as conv; weight (C, F/g, k...)
linear             inputs [x]; params weight, bias; attrs weight_axes=(out_axis, in_axis),
                   default (0, 1) i.e. weight (out, in)
batchnorm          params weight, bias, running_mean, running_var (instance norm: same kind)
layernorm          attrs normalized_ndim (trailing axes normalised)
groupnorm          attrs num_groups; params weight, bias
act                attrs fn, zero_preserving (f(0) == 0); PReLU: params weight
identity           dropout, identity, casts, contiguous
pool, pad          spatial ops (pooling, resize, spatial padding); pad: attrs pads
add sub mul div    elementwise with broadcasting; attrs tensor_positions, scalar
concat, split      attrs axis; split: attrs sizes via ``set_attr(node, "sizes", [...])``
slice              attrs axes (cut axes), ranges {axis: (start, end, step)} normalised bounds
flatten            attrs start, end
reshape            output shape from shape propagation; ``set_attr(node, "shape", {axis: n})``;
                   attrs shape_of: the target is the run-time shape of that value (ONNX)
permute/transpose  attrs perm / axes
reduce             attrs axes, keepdim
softmax            attrs axis
constant           params value (a weight used as a tensor: layer scale, offsets)
attention          fused scaled dot-product attention: inputs q, k, v (..., H, N, d), optional
                   mask; attrs scale, causal, gqa (heads are channels of axis rank-3)
matmul             a product of two activations (batch axes tie; matrix axes freeze)
select, unbind     single indices of attrs axis (select: attrs index)
shape              the sizes of its input (attrs start, end)
mha                an unexpanded ``nn.MultiheadAttention`` (fx leaf: frozen)
unknown            anything else (frozen)
=================  ==========================================================================

Edit attributes understood by ``set_attr``: ``groups`` (conv), ``num_groups`` (groupnorm),
``pads``, ``stride``, ``dilation`` (conv), ``sizes`` (split), ``shape`` (reshape),
``range`` (slice: ``{axis: (start, end)}``, step 1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from .arrays import as_numpy

from .gcpause import gc_paused
from .profile import stage


class GraphError(Exception):
    """A graph that graphprune cannot read, edit or verify; the message names the node."""


class Port(NamedTuple):
    """One axis of one tensor value: the unit that channel rules connect (a named tuple:
    the coupling walk hashes ports thousands of times per graph)."""

    value: str
    axis: int


@dataclass
class ValueInfo:
    """Static facts about a tensor value, from shape propagation."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None = None


@dataclass
class Node:
    """One op of the view.

    ``inputs``/``outputs`` name tensor values (``""`` for an absent optional input);
    ``params`` maps a role (``weight``, ``bias``, ``running_mean``, ``value``, ...) to a
    parameter key of the frontend; ``label`` is what error messages show (module path
    for fx, node name for ONNX); ``target`` is the frontend's own op name.
    """

    name: str
    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    label: str = ""
    target: str = ""

    def __str__(self) -> str:
        return f"{self.kind} `{self.label or self.name}`"


@dataclass
class NewNode:
    """A node to create in :meth:`Graph.replace_node`: canonical kind, attrs and weights.

    ``inputs`` name existing values or outputs of earlier new nodes, by the index string
    ``"%0"``, ``"%1"``...; the last new node's output replaces the old node's output.
    """

    kind: str
    inputs: list[str]
    attrs: dict[str, Any]
    params: dict[str, np.ndarray]


class Frontend(Protocol):
    """What a frontend provides: read the view, read and edit weights and attrs, run.

    Weights are numpy arrays both ways (``get_param`` may return a read-only or shared
    view: callers never write into it); ``run`` takes and returns the frontend's own
    array type (torch tensors for fx/export, numpy for ONNX) and accepts numpy inputs.
    """

    def view(self) -> tuple[list[Node], dict[str, ValueInfo], list[str], list[str]]: ...

    def get_param(self, key: str) -> np.ndarray: ...

    def set_param(self, key: str, value: np.ndarray) -> None: ...

    def set_attr(self, node: Node, key: str, value: Any) -> None: ...

    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None: ...

    def insert_gather(self, value: str, axis: int, index: Sequence[int], consumers: Sequence[Node]) -> None: ...

    def commit(self) -> None:
        """Re-derive metadata and shapes after edits; may accept ``resized`` (Port -> size)."""
        ...

    def copy(self) -> "Frontend": ...

    def run(self, inputs: Sequence[Any]) -> list[Any]: ...

    def example_inputs(self) -> list[Any]: ...

    @property
    def name(self) -> str: ...


def _accepts_resized(frontend: Frontend) -> bool:
    import inspect

    return "resized" in inspect.signature(frontend.commit).parameters


_VIEW_FIELDS = ("nodes", "values", "inputs", "outputs", "_by_name", "_producer", "_consumers")
"""What :meth:`Graph._read_view` derives from the frontend (shared by a :meth:`Graph.with_weights` copy)."""


class Graph:
    """A frontend-neutral, topologically ordered view with edit operations."""

    def __init__(self, frontend: Frontend) -> None:
        from .emitted import EmittedModules

        self.frontend = frontend
        self._emitted = EmittedModules()
        self._rebuild()

    # ----------------------------------------------------------------- reading
    def _rebuild(self) -> None:
        with stage("view"):
            self._read_view()

    def _read_view(self) -> None:
        nodes, values, inputs, outputs = self.frontend.view()
        self.nodes: list[Node] = nodes
        self.values: dict[str, ValueInfo] = values
        self.inputs: list[str] = inputs
        self.outputs: list[str] = outputs
        self._by_name = {n.name: n for n in nodes}
        self._producer: dict[str, Node] = {}
        self._consumers: dict[str, list[Node]] = {}
        for node in nodes:
            for out in node.outputs:
                self._producer[out] = node
            for inp in node.inputs:
                if inp:
                    self._consumers.setdefault(inp, []).append(node)

    @property
    def frontend_name(self) -> str:
        return self.frontend.name

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise GraphError(f"no node named `{name}`") from None

    def find(self, label: str) -> Node:
        """The node whose label (module path / ONNX node name) or name is ``label``."""
        for node in self.nodes:
            if label in (node.label, node.name):
                return node
        raise GraphError(f"no node labelled `{label}`")

    def producer(self, value: str) -> Node | None:
        return self._producer.get(value)

    def consumers(self, value: str) -> list[Node]:
        return self._consumers.get(value, [])

    def shape(self, value: str) -> tuple[int, ...] | None:
        info = self.values.get(value)
        return info.shape if info else None

    def param(self, key: str) -> np.ndarray:
        """Parameter ``key`` as a numpy array (possibly a view of the frontend's own
        storage: never write into it; replace it with :meth:`set_param`)."""
        return self.frontend.get_param(key)

    def node_param(self, node: Node, role: str) -> np.ndarray | None:
        key = node.params.get(role)
        return None if key is None else self.frontend.get_param(key)

    def param_keys(self) -> Iterator[str]:
        seen: set[str] = set()
        for node in self.nodes:
            for key in node.params.values():
                if key not in seen:
                    seen.add(key)
                    yield key

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    # ----------------------------------------------------------------- editing
    def set_param(self, key: str, value: Any) -> None:
        """Replace parameter ``key`` by ``value`` (a numpy array, or a torch tensor that
        is converted; taken over, not copied).  Weights are never written in place,
        which lets :meth:`copy` share unedited arrays."""
        self.frontend.set_param(key, as_numpy(value))

    def slice_param(self, key: str, axis: int, keep: Sequence[int]) -> None:
        """Keep only indices ``keep`` (sorted) of parameter ``key`` along ``axis``."""
        array = self.frontend.get_param(key)
        self.frontend.set_param(key, np.take(array, np.asarray(keep, dtype=np.int64), axis=axis))

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        self._own_structure()
        self.frontend.set_attr(self._by_name.get(node.name, node), key, value)

    def replace_node(self, node: Node, new: Sequence[NewNode]) -> None:
        self._own_structure()
        self.frontend.replace_node(self._by_name.get(node.name, node), new)

    def insert_gather(self, value: str, axis: int, index: Sequence[int], consumers: Iterable[Node]) -> None:
        """Feed ``consumers`` with ``value`` reindexed along ``axis`` (``out[i] = in[index[i]]``)."""
        self._own_structure()
        self.frontend.insert_gather(value, axis, list(index), [self._by_name.get(c.name, c) for c in consumers])

    def commit(self, resized: Mapping[Port, int] | None = None) -> None:
        """Finish a batch of edits: the frontend re-derives metadata and shapes, the view
        is rebuilt.  ``resized`` (new sizes of the ports an edit changed) lets a frontend
        patch shapes instead of propagating them again."""
        self._own_structure()
        if resized is not None and _accepts_resized(self.frontend):
            self.frontend.commit(resized)  # type: ignore[call-arg]
        else:
            self.frontend.commit()
        self._rebuild()

    def copy(self) -> "Graph":
        """An independent copy (the frontend copies its structure; unedited tensors are
        shared, edits replace them).  Where the frontend's copy reads as the same view
        (``copy_keeps_view``: the same node and value names), the copy starts from this
        graph's view: a view is never edited in place (every commit reads a new one)."""
        with stage("copies"):
            if not getattr(self.frontend, "copy_keeps_view", False):
                return Graph(self.frontend.copy())
            out = Graph.__new__(Graph)
            out.frontend = self.frontend.copy()
            out._emitted = type(self._emitted)()
            out.__dict__.update({k: getattr(self, k) for k in _VIEW_FIELDS})
            return out

    def with_weights(self, params: Mapping[str, Any]) -> "Graph":
        """This graph with the parameters in ``params`` (key -> numpy array or tensor)
        replaced, e.g. the projected reference.  Where the frontend can
        (``with_weights``), the copy shares this graph's structure and view: nothing is
        re-read or recompiled, and only the replaced tensors are new (a frontend's
        ``with_weights`` may return None: then this is a full copy).  The first
        structural edit on it makes its structure its own (a full :meth:`copy`)."""
        make = getattr(self.frontend, "with_weights", None)
        with stage("copies"):
            frontend = make({key: as_numpy(value) for key, value in params.items()}) if make is not None else None
        if frontend is None:  # the frontend cannot share: a full copy
            out = self.copy()
            for key, value in params.items():
                out.set_param(key, value)
            return out
        with stage("copies"):
            out = Graph.__new__(Graph)
            out.frontend = frontend
            out._emitted = type(self._emitted)()
            out.__dict__.update({k: getattr(self, k) for k in _VIEW_FIELDS})
            out._shared_structure = True
        return out

    def _own_structure(self) -> None:
        """Before a structural edit of a :meth:`with_weights` copy: a structure of its own."""
        if self.__dict__.pop("_shared_structure", False):
            self.frontend = self.frontend.copy()
            self._rebuild()

    # --------------------------------------------------------------- executing
    def run(self, *inputs: Any) -> list[Any]:
        """Run the graph on ``inputs`` (numpy arrays or torch tensors; eval mode, no
        grad) and return its outputs: torch tensors from the PyTorch frontends, numpy
        arrays from ONNX (:func:`graphprune.arrays.as_numpy` converts either)."""
        return self.frontend.run(list(inputs))

    def example_inputs(self) -> list[Any]:
        """The inputs the graph was captured with (torch tensors for fx/export, seeded
        numpy arrays for ONNX)."""
        return self.frontend.example_inputs()

    def masked_runner(self, inputs: Sequence[Any]) -> Any:
        """A callable ``runner(masks, k) -> outputs`` that runs ``k`` replicas of the batch
        ``inputs`` with each value named in ``masks`` multiplied by its mask (``k*B`` rows,
        broadcast) as it is computed; ``runner.outputs()`` are the unmasked outputs.
        Optional frontend capability (fx has it): raises :class:`GraphError` when the
        frontend cannot; see :attr:`can_run_masked`."""
        fn = getattr(self.frontend, "masked_runner", None)
        if fn is None:
            raise GraphError(f"the {self.frontend.name} frontend cannot mask values while running")
        return fn(list(inputs))

    @property
    def can_run_masked(self) -> bool:
        return hasattr(self.frontend, "masked_runner")

    def gradients(self, inputs: Sequence[Any], loss: Any, keys: Sequence[str]) -> dict[str, Any]:
        """Gradients of ``loss(outputs)`` w.r.t. parameters ``keys`` (eval mode), as the
        frontend's tensors (torch).  Optional frontend capability (fx has it; an ONNX
        graph cannot be differentiated)."""
        fn = getattr(self.frontend, "gradients", None)
        if fn is None:
            raise GraphError(f"the {self.frontend.name} frontend cannot compute gradients (capture the PyTorch model instead)")
        return fn(list(inputs), loss, list(keys))

    def random_inputs(self, seed: int = 0) -> list[Any]:
        """The seeded default check inputs, shaped and typed like the example inputs:
        standard normal for data, zeros for recurrent state, ones for masks, suggested or
        small non-negative values for integers (:func:`graphprune.probes.probe_inputs`).
        Numpy arrays, converted to the frontend's own tensors where it has a hook for it
        (``inputs_from_arrays``: torch tensors on the model's device for fx/export)."""
        from .probes import probe_inputs

        arrays = probe_inputs(self, seed)
        convert = getattr(self.frontend, "inputs_from_arrays", None)
        return arrays if convert is None else convert(arrays)

    # ------------------------------------------------------------------- emit
    @gc_paused
    def to_module(self) -> Any:
        """The graph as an ``nn.Module`` (PyTorch frontends only)."""
        to_module = getattr(self.frontend, "to_module", None)
        if to_module is None:
            raise GraphError(f"the {self.frontend.name} frontend cannot emit an nn.Module")
        module = to_module()
        self._emitted.add(module)
        return module

    @gc_paused
    def to_onnx(self, path: str, **options: Any) -> None:
        """Write the graph as an ONNX file (atomically).  Refused while a module from
        :meth:`to_module` has been changed (fine-tuned) since: the file would hold the
        weights from before (see :mod:`graphprune.emitted`)."""
        tuned = self._emitted.tuned_message(f"to_onnx(`{path}`)")
        if tuned:
            raise GraphError(tuned)
        with stage("emit"):
            self.frontend.to_onnx(path, **options)

    save_onnx = to_onnx

    def __deepcopy__(self, memo: dict) -> "Graph":
        return Graph(copy.deepcopy(self.frontend, memo))

    def __repr__(self) -> str:
        return f"<Graph {self.frontend.name}: {len(self.nodes)} nodes>"
