"""The ONNX frontend object that a :class:`~graphprune.graph.Graph` talks to, and ``load_onnx``.

:class:`OnnxFrontend` holds the model as an onnx-graphsurgeon graph plus what saving
needs to restore (the model header, the original input/output types, node doc strings,
which constants loading unshared).  It composes the modules of this package: loading and
normalising (:mod:`.load`), shapes (:mod:`.shapes`), the view (:mod:`.classify`), edits
(:mod:`.edit`, mixed in), saving (:mod:`.save`) and running (:mod:`.run`).

:meth:`OnnxFrontend.commit` cleans up, sorts and re-infers shapes.  :meth:`OnnxFrontend.run`
uses an onnxruntime CPU session with graph optimisations disabled, cached until the next
edit; it is built from the graph's structure with the weights handed over as arrays
(:func:`~graphprune.frontends.onnx.run.session_model`, exported once per edit for every
session).  Inputs of another size run in a session built for that size, where
:meth:`OnnxFrontend.shapes_at` infers every shape first (the cropped check probes of
:mod:`graphprune.probe_size`); a size that fails is remembered by every copy.  A copy
shares weight arrays with its original: edits replace arrays, never write into them.
"""
from __future__ import annotations

import copy as _copy
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...graph import Graph, GraphError, Node, ValueInfo
from ...profile import stage
from .classify import OpContext, build_view
from .edit import OnnxEdits
from .load import OnnxLoadError, fix_input_shapes, model_shell, name_nodes, normalise, read_model
from .run import (
    SessionModel, compared_constants, example_inputs, make_session, resized_model, run_session, session_model,
)
from .save import model_for_save, save_model
from .shapes import infer_shapes, strict_shapes
from .tensors import constant_node_value, fresh_name, is_default
from ...gcpause import gc_paused

__all__ = ["OnnxFrontend", "load_onnx"]

InputShapes = tuple[tuple[int, ...], ...]  # one shape per graph input, in input order


def _reshape_mismatch(graph: gs.Graph, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first ``Reshape`` whose inferred output has another element count than its
    input (ONNX inference takes a constant target shape as given), if any."""
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2:
            continue
        src, out = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
        if src is not None and out is not None and math.prod(src) != math.prod(out):
            return node.name
    return None


def _emptied(captured: Mapping[str, tuple[int, ...] | None], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first value that has elements at the captured size and none in ``shapes`` (a
    constant slice past a cropped input's end), if any: nothing would be checked there."""
    for name, shape in shapes.items():
        before = captured.get(name)
        if 0 in shape and before is not None and 0 not in before:
            return name
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@gc_paused
def load_onnx(
    path_or_model: str | os.PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    external_data_dir: str | os.PathLike | None = None,
) -> Graph:
    """Load an ONNX model as a graphprune :class:`Graph`.

    ``input_shapes`` fixes dynamic input dimensions (``{"input": (1, 3, 224, 224)}``);
    ``external_data_dir`` is where external tensor data lives when it is not beside the
    file (or when a ``ModelProto`` with external references is given).
    """
    with stage("capture"):
        model, source = read_model(path_or_model, external_data_dir)
        return Graph(OnnxFrontend(model, input_shapes or {}, source=source))


class OnnxFrontend(OnnxEdits):
    """Reads and edits an ONNX model held as an onnx-graphsurgeon graph."""

    name = "onnx"
    shape_polymorphic = True
    """Runs at other input sizes too (:meth:`run`: a session per size, every other shape
    inferred again) as far as the graph's constants allow: a size they fix (a target
    shape, a Gemm after a flatten) fails there, and :meth:`shapes_at` finds most such
    failures before anything runs."""

    def __init__(self, model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], source: str = "<model>") -> None:
        self.source = source
        self._shell = model_shell(model)
        self._io_protos = {v.name: _copy.deepcopy(v) for v in list(model.graph.input) + list(model.graph.output)}
        self._node_docs = {
            n.name: (n.doc_string, list(n.metadata_props))
            for n in model.graph.node if n.name and (n.doc_string or len(n.metadata_props))
        }
        try:
            self.graph: gs.Graph = gs.import_onnx(model)
        except Exception as exc:
            raise OnnxLoadError(f"cannot import `{source}`: {exc}") from exc
        fix_input_shapes(self.graph, input_shapes, source)
        self._copies: dict[str, str] = {}  # constant copy name -> the name it was copied from
        self._sizes_refused: set[InputShapes] = set()  # shared with copies: sizes this model family cannot run at
        name_nodes(self.graph)
        normalise(self.graph, self._copies)
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._dtypes: dict[str, str] = {}
        self._reset_caches()
        self._infer()
        self._inputs = example_inputs(self.graph)

    # ---------------------------------------------------------------- caches
    def _reset_caches(self) -> None:
        self._session_cache: Any = None
        self._optimised_cache: Any = None
        self._structure: SessionModel | None = None
        self._resized: dict[InputShapes, onnx.ModelProto] = {}  # other input sizes -> structure
        self._resized_sessions: dict[tuple[InputShapes, bool], Any] = {}  # (size, optimised) -> session
        self._refs: dict[str, gs.Constant | gs.Node] | None = None
        self._index: dict[str, gs.Node] = {}
        self._fused: dict[str, gs.Node] = {}  # linear view node (MatMul) -> the bias Add it absorbs
        self._folded: dict[str, np.ndarray | None] = {}

    def _edited(self) -> None:
        self._session_cache = None
        self._optimised_cache = None
        self._structure = None
        self._resized = {}
        self._resized_sessions = {}
        self._folded = {}

    def _ops(self) -> OpContext:
        """Shapes, folded constants and opset of the current graph, for classifiers and edits."""
        return OpContext(self.graph, self._shapes, self._dtypes, self._shell.opset_import, self._folded)

    def _fresh_tensor_name(self, base: str) -> str:
        return fresh_name(base, self.graph.tensors())

    def _fresh_node_name(self, base: str) -> str:
        return fresh_name(base, (n.name for n in self.graph.nodes))

    def _infer(self) -> None:
        """Shapes of every value: ONNX shape inference, then onnxruntime for the rest."""
        with stage("shapes"):
            self._shapes, self._dtypes = infer_shapes(self.graph, self._shell)

    # ------------------------------------------------------------ parameters
    def _refs_map(self) -> dict[str, gs.Constant | gs.Node]:
        if self._refs is None:
            refs: dict[str, gs.Constant | gs.Node] = {}
            for node in self.graph.nodes:
                if node.op == "Constant" and is_default(node) and len(node.outputs) == 1:
                    refs[node.outputs[0].name] = node
                for t in node.inputs:
                    if isinstance(t, gs.Constant):
                        refs[t.name] = t
            self._refs = refs
        return self._refs

    def get_param(self, key: str) -> np.ndarray:
        overrides = self.__dict__.get("_overrides")
        if overrides is not None and key in overrides:
            return overrides[key]
        ref = self._refs_map().get(key)
        if ref is None:
            raise GraphError(f"no constant named `{key}` in the ONNX graph")
        value = np.asarray(ref.values) if isinstance(ref, gs.Constant) else constant_node_value(ref)
        if not value.flags.writeable or value.dtype.byteorder not in "=|":
            value = np.array(value, copy=True)
        return value  # shared: weights are replaced, never written in place

    # ------------------------------------------------------------------ view
    def view(self) -> tuple[list[Node], dict[str, ValueInfo], list[str], list[str]]:
        self._refs = None
        self._index = {n.name: n for n in self.graph.nodes}
        view, self._fused = build_view(self._ops())
        return view

    def commit(self) -> None:
        self._own_graph()
        self._sync_kernel_shapes()
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self._reset_caches()
        self._infer()

    # --------------------------------------------------------------- copying
    def copy(self) -> "OnnxFrontend":
        other = OnnxFrontend.__new__(OnnxFrontend)
        other.__dict__.update(self.__dict__)
        overrides = other.__dict__.pop("_overrides", None)
        other.graph = self.graph.copy()
        other._shapes = dict(self._shapes)
        other._dtypes = dict(self._dtypes)
        other._copies = dict(self._copies)
        other._reset_caches()
        for key, value in (overrides or {}).items():
            other.set_param(key, value)
        return other

    def with_weights(self, params: Mapping[str, np.ndarray]) -> "OnnxFrontend | None":
        """A frontend that shares this one's graph and exported structure, with the
        parameters in ``params`` replaced in what onnxruntime is handed (and in
        :meth:`get_param`); None when one of them is embedded in the structure (a small
        constant), and the caller copies instead.  Its first edit or save makes the
        graph its own (:meth:`_own_graph`)."""
        base = self.session_model()
        refs = self._refs_map()
        if not params or any(not isinstance(refs.get(k), gs.Constant) for k in params):
            return None
        arrays = {k: np.ascontiguousarray(np.asarray(v).astype(refs[k].values.dtype, copy=False))  # type: ignore[union-attr]
                  for k, v in params.items()}
        model = _with_initializers(base.model, {k: a for k, a in arrays.items() if k not in base.weights})
        if model is None:
            return None
        other = OnnxFrontend.__new__(OnnxFrontend)
        other.__dict__.update(self.__dict__)
        other._edited()  # sessions and folded constants of its own
        other._structure = SessionModel(model, {**base.weights, **{k: a for k, a in arrays.items() if k in base.weights}})
        other._overrides = arrays
        return other

    def _own_graph(self) -> None:
        """Before an edit or a save of a :meth:`with_weights` frontend: the shared graph
        copied, with the replaced weights written into it."""
        overrides = self.__dict__.pop("_overrides", None)
        if overrides is None:
            return
        own = self.copy()
        self.__dict__.update(own.__dict__)
        self.view()  # the view's node index and fused biases, on the own graph
        for key, value in overrides.items():
            self.set_param(key, value)

    def __deepcopy__(self, memo: dict) -> "OnnxFrontend":
        return self.copy()

    # --------------------------------------------------------------- running
    def session_model(self) -> SessionModel:
        """The current graph's structure and weights for onnxruntime (weights by reference,
        :func:`~graphprune.frontends.onnx.run.session_model`), exported once per edit for
        both sessions."""
        if self._structure is None:
            self._structure = session_model(self.graph, self._shell)
        return self._structure

    def session(self) -> Any:
        """The cached onnxruntime session (graph optimisations off) of the current graph."""
        if self._session_cache is None:
            try:
                self._session_cache = make_session(self.session_model())
            except Exception as exc:
                raise OnnxLoadError(f"onnxruntime cannot run `{self.source}`: {str(exc).splitlines()[0]}") from exc
        return self._session_cache

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Outputs (numpy) on ``inputs`` (numpy arrays or torch tensors), in input order.
        Inputs of other sizes than the fixed ones run in a session built for their sizes
        (:meth:`shapes_at`); a size the graph cannot run at raises :class:`OnnxLoadError`."""
        return self._run(inputs, optimise=False)

    def run_optimised(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Run with every onnxruntime graph optimisation on (``ORT_ENABLE_ALL``): against
        :meth:`run`, this shows the model's own float noise (:mod:`graphprune.verify`)."""
        return self._run(inputs, optimise=True)

    def _run(self, inputs: Sequence[Any], optimise: bool) -> list[np.ndarray]:
        key = tuple(tuple(int(d) for d in np.shape(x)) for x in inputs)
        fixed = tuple(self.input_shapes().values())
        if key == fixed or len(key) != len(fixed):
            return run_session(self._optimised_session() if optimise else self.session(), self.graph, inputs)
        try:
            return run_session(self._resized_session(key, optimise), self.graph, inputs)
        except Exception as exc:
            self._sizes_refused.add(key)
            if isinstance(exc, OnnxLoadError):
                raise
            raise OnnxLoadError(f"`{self.source}` cannot run at input shapes {list(key)}: {_first_line(exc)}") from exc

    def run_with_shapes(self, inputs: Sequence[Any], values: set[str]) -> tuple[list[np.ndarray], dict[str, tuple[int, ...]]]:
        """:meth:`run`, and the shapes of the values named in ``values`` at these inputs'
        sizes (:meth:`shapes_at`: inferred before running, so a size the graph cannot run
        at is refused without a session).  Raises :class:`OnnxLoadError` when the graph
        cannot run there or a shape in ``values`` cannot be inferred (a size that the
        check's window condition could not confirm)."""
        key = [tuple(int(d) for d in np.shape(x)) for x in inputs]
        shapes = self.shapes_at(key) if tuple(key) != tuple(self.input_shapes().values()) else self._shapes
        if shapes is None:
            raise OnnxLoadError(f"`{self.source}` cannot run at input shapes {key}: shape inference refuses that size")
        unknown = sorted(v for v in values if shapes.get(v) is None)
        if unknown:
            raise OnnxLoadError(f"`{self.source}` at input shapes {key}: the shape of `{unknown[0]}` is not inferred")
        return self.run(inputs), {v: tuple(shapes[v]) for v in values}  # type: ignore[misc]

    def shapes_at(self, input_shapes: Sequence[Sequence[int]]) -> dict[str, tuple[int, ...]] | None:
        """Every value's shape when the graph inputs have ``input_shapes`` (in input
        order), by strict ONNX shape inference on the structure alone; None when the graph
        cannot run there (inference finds a size its constants fix, a value would be
        empty there, or an earlier run of this model or a copy of it at that size failed)."""
        key = tuple(tuple(int(d) for d in s) for s in input_shapes)
        if key in self._sizes_refused:
            return None
        shapes = strict_shapes(self._resized_structure(key))
        if shapes is None or _reshape_mismatch(self.graph, shapes) or _emptied(self._shapes, shapes):
            self._sizes_refused.add(key)
            return None
        return shapes

    def _resized_structure(self, key: InputShapes) -> onnx.ModelProto:
        if key not in self._resized:
            names = [t.name for t in self.graph.inputs if isinstance(t, gs.Variable)]
            self._resized[key] = resized_model(self.session_model().model, dict(zip(names, key)))
        return self._resized[key]

    def _resized_session(self, key: InputShapes, optimise: bool) -> Any:
        if key in self._sizes_refused:
            raise OnnxLoadError(f"`{self.source}` cannot run at input shapes {list(key)} (it failed there before)")
        session = self._resized_sessions.get((key, optimise))
        if session is None:
            structure = SessionModel(self._resized_structure(key), self.session_model().weights)
            session = self._resized_sessions[key, optimise] = make_session(structure, optimise=optimise)
        return session

    def _optimised_session(self) -> Any:
        if self._optimised_cache is None:
            self._optimised_cache = make_session(self.session_model(), optimise=True)
        return self._optimised_cache

    def example_inputs(self) -> list[np.ndarray]:
        return list(self._inputs)

    def input_hints(self) -> dict[str, np.ndarray]:
        """Values the model suggests for its integer inputs: the constant each is compared
        with (``Equal(sr, 16000)`` -> 16000), used by the check probes."""
        return compared_constants(self.graph)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The fixed shapes used for analysis, per graph input."""
        return {t.name: tuple(int(d) for d in t.shape) for t in self.graph.inputs if isinstance(t, gs.Variable)}

    # ---------------------------------------------------------------- saving
    def to_model(self) -> onnx.ModelProto:
        """The model to save: symbolic input/output dims restored, no stale value_info."""
        self._own_graph()
        return model_for_save(self.graph, self._shell, self._copies, self._dtypes, self._io_protos, self._node_docs)

    def to_onnx(self, path: str | os.PathLike, external_data: bool | None = None, **_: Any) -> None:
        """Write the model atomically; tensors go to ``<file>.data`` when ``external_data``
        is true, or when it is None and the model is larger than 1.5 GiB."""
        save_model(self.to_model(), path, external_data=external_data, protect=[self.source])

    save_onnx = to_onnx


def _with_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto | None:
    """``model`` (itself when ``arrays`` is empty, else a copy) with the embedded top-level
    initializers named in ``arrays`` replaced; None when one of them is not one."""
    if not arrays:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = {t.name: t for t in out.graph.initializer}
    for name, array in arrays.items():
        if name not in index or index[name].data_location == onnx.TensorProto.EXTERNAL:
            return None
        index[name].CopyFrom(onnx.numpy_helper.from_array(array, name))
    return out
