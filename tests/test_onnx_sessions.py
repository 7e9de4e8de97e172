"""The ONNX path's cheap exactness check: onnxruntime sessions whose weights are handed
over as arrays instead of serialised, and check probes cropped to a smaller spatial size.

* A session built from the structure plus the weight arrays computes bit for bit what a
  session on the fully serialised model computes, with and without onnxruntime's graph
  optimisations, also through the temporary-file path for models above the protobuf
  limit, and holds no reference to arrays edited afterwards.
* Cropping is chosen where every conv tap still reads data at the smaller size (on the
  shapes ONNX inference gives there, :meth:`OnnxFrontend.run_with_shapes`) and refused,
  before any session is built, where the graph fixes a size (a target shape, a Gemm after
  a flatten) or a constant slice would empty a conv's input; a refused size is
  remembered by copies of the graph.
* A wrong tap planted in the rewritten graph is caught at the cropped size, and where
  cropping is refused, at the captured size; a check that fails at the cropped size is
  repeated at the captured size, whose verdict counts (rounding grows differently with
  the size: a deep model with a measured tolerance is exact at both sizes).

The models are built with ``onnx.helper`` (no torch).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.frontends.onnx import OnnxLoadError, load_onnx
from graphprune.frontends.onnx import run as onnx_run
from graphprune.frontends.onnx.run import make_session, session_model
from graphprune.frontends.onnx.save import export_model
from graphprune.probe_size import candidate_factors, shrink_factor
from graphprune import verify
from graphprune.verify import check_exact

pytestmark = pytest.mark.notorch

RTOL = 1e-5


def _conv(name: str, x: str, y: str, cin: int, cout: int, rng: np.random.Generator, inits: list, nodes: list,
          k: int = 3, pad: int = 1, stride: int = 1) -> None:
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[k, k],
                                  pads=[pad] * 4, strides=[stride] * 2))


def _model(nodes: list, inits: list, size: int, out_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def pooled_net(size: int = 32) -> onnx.ModelProto:
    """x (1, 3, s, s) -> conv 3->16 -> relu -> conv 16->32 stride 2 -> relu -> conv 32->32 ->
    relu -> global average pool -> flatten -> Gemm 32->10 (runs at any size)."""
    rng = np.random.default_rng(0)
    nodes: list = []
    inits: list = []
    _conv("c1", "x", "a1", 3, 16, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a1"], ["r1"]))
    _conv("c2", "r1", "a2", 16, 32, rng, inits, nodes, stride=2)
    nodes.append(helper.make_node("Relu", ["a2"], ["r2"]))
    _conv("c3", "r2", "a3", 32, 32, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a3"], ["r3"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["r3"], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1))
    fc = (rng.standard_normal((10, 32)) / np.sqrt(32)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1))
    return _model(nodes, inits, size, [1, 10])


def fixed_reshape_net(size: int = 16, reshape: bool = True) -> onnx.ModelProto:
    """x -> conv 3->8 -> relu -> conv 8->8 -> relu -> a constant Reshape to (1, 8*s*s) (or a
    Flatten) -> Gemm 8*s*s->4: the graph fixes the size."""
    rng = np.random.default_rng(1)
    nodes: list = []
    inits: list = []
    _conv("c1", "x", "a1", 3, 8, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a1"], ["r1"]))
    _conv("c2", "r1", "a2", 8, 8, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a2"], ["r2"]))
    features = 8 * size * size
    if reshape:
        inits.append(numpy_helper.from_array(np.array([1, features], np.int64), "target"))
        nodes.append(helper.make_node("Reshape", ["r2", "target"], ["f"]))
    else:
        nodes.append(helper.make_node("Flatten", ["r2"], ["f"], axis=1))
    fc = (rng.standard_normal((4, features)) / np.sqrt(features)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(4, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1))
    return _model(nodes, inits, size, [1, 4])


def sliced_net(size: int = 36) -> onnx.ModelProto:
    """x -> conv 3->8 -> relu -> Slice [24:36] on both spatial axes (constant starts) ->
    conv 8->8 -> relu -> conv 8->8 -> global pool -> flatten.  The convs see 36, 12 and 12
    pixels, so the captured shapes allow a factor 4; but at 1/4 of the size (9 pixels)
    the slice starts past the end: the later convs would see nothing at all."""
    rng = np.random.default_rng(2)
    nodes: list = []
    inits: list = []
    _conv("c1", "x", "a1", 3, 8, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a1"], ["r1"]))
    inits += [numpy_helper.from_array(np.array([24, 24], np.int64), "starts"),
              numpy_helper.from_array(np.array([size, size], np.int64), "ends"),
              numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes.append(helper.make_node("Slice", ["r1", "starts", "ends", "axes"], ["s"]))
    _conv("c2", "s", "a2", 8, 8, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a2"], ["r2"]))
    _conv("c3", "r2", "a3", 8, 8, rng, inits, nodes)
    nodes.append(helper.make_node("GlobalAveragePool", ["a3"], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["y"], axis=1))
    return _model(nodes, inits, size, [1, 8])


def se_net(size: int = 32) -> onnx.ModelProto:
    """x -> conv 3->16 -> relu -> squeeze-excite (global pool -> 1x1 conv 16->4 -> relu ->
    1x1 conv 4->16 -> sigmoid -> mul) -> conv 16->16 -> global pool -> flatten.  The
    excite convs see 1x1 inputs at every input size."""
    rng = np.random.default_rng(3)
    nodes: list = []
    inits: list = []
    _conv("c1", "x", "a1", 3, 16, rng, inits, nodes)
    nodes.append(helper.make_node("Relu", ["a1"], ["r1"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["r1"], ["g"]))
    _conv("fc1", "g", "e1", 16, 4, rng, inits, nodes, k=1, pad=0)
    nodes.append(helper.make_node("Relu", ["e1"], ["e2"]))
    _conv("fc2", "e2", "e3", 4, 16, rng, inits, nodes, k=1, pad=0)
    nodes.append(helper.make_node("Sigmoid", ["e3"], ["gate"]))
    nodes.append(helper.make_node("Mul", ["r1", "gate"], ["m"]))
    _conv("c2", "m", "a2", 16, 16, rng, inits, nodes)
    nodes.append(helper.make_node("GlobalAveragePool", ["a2"], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["y"], axis=1))
    return _model(nodes, inits, size, [1, 16])


def patchify_net(size: int = 28) -> onnx.ModelProto:
    """x -> 2x2 stride-2 conv 3->8 -> 2x2 stride-2 conv 8->8 -> 7x7 conv (pad 3) 8->8 ->
    global pool -> flatten.  At 28 pixels the 7x7 conv sees 7; at 14 (a factor 2, which
    the estimate ceil(7 / 2) = 4 allows) the unpadded stride-2 convs give it 3, where its
    first tap reads no data."""
    rng = np.random.default_rng(4)
    nodes: list = []
    inits: list = []
    _conv("d1", "x", "a1", 3, 8, rng, inits, nodes, k=2, pad=0, stride=2)
    _conv("d2", "a1", "a2", 8, 8, rng, inits, nodes, k=2, pad=0, stride=2)
    _conv("c7", "a2", "a3", 8, 8, rng, inits, nodes, k=7, pad=3)
    nodes.append(helper.make_node("GlobalAveragePool", ["a3"], ["p"]))
    nodes.append(helper.make_node("Flatten", ["p"], ["y"], axis=1))
    return _model(nodes, inits, size, [1, 8])


def _load(model: onnx.ModelProto) -> gp.Graph:
    return load_onnx(model)


def _full_session(graph: gp.Graph, optimise: bool = False) -> ort.InferenceSession:
    """A session on the fully serialised model (the way sessions were built before)."""
    fe = graph.frontend
    return make_session(export_model(fe.graph, fe._shell), optimise=optimise)


def _outputs(sess: ort.InferenceSession, xs: list[np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


# ------------------------------------------------------------- sessions
@pytest.mark.parametrize("optimise", [False, True])
def test_session_with_weights_by_reference_matches_the_serialised_model(optimise: bool) -> None:
    graph = _load(pooled_net())
    structure = session_model(graph.frontend.graph, graph.frontend._shell)
    # the large weights go as arrays; the small ones (biases, 10x32 Gemm) stay embedded
    assert sorted(structure.weights) == ["c2.w", "c3.w"]
    assert structure.model.ByteSize() < 0.25 * sum(a.nbytes for a in structure.weights.values())
    by_reference = make_session(structure, optimise=optimise)
    full = _full_session(graph, optimise=optimise)
    for seed in range(2):
        xs = graph.random_inputs(seed)
        for a, b in zip(_outputs(by_reference, xs), _outputs(full, xs)):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_session_copies_the_weights_in() -> None:
    graph = _load(pooled_net())
    structure = session_model(graph.frontend.graph, graph.frontend._shell)
    sess = make_session(structure)
    xs = graph.random_inputs(0)
    before = _outputs(sess, xs)[0]
    structure.weights["c3.w"][...] = 0.0  # the session must not read the array afterwards
    assert np.array_equal(_outputs(sess, xs)[0], before)


def test_temporary_file_path_for_large_structures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the protobuf limit the structure goes through a file; the referenced weights
    still come as arrays (the limit is lowered so that this small model takes that path)."""
    graph = _load(pooled_net())
    expected = _outputs(_full_session(graph), graph.random_inputs(0))
    monkeypatch.setattr(onnx_run, "PROTOBUF_LIMIT", 16)
    structure = session_model(graph.frontend.graph, graph.frontend._shell)
    assert onnx_run.proto_nbytes(structure.model) >= 16
    got = _outputs(make_session(structure), graph.random_inputs(0))
    assert np.array_equal(got[0], expected[0])


def test_graph_run_reuses_one_export_for_both_sessions() -> None:
    graph = _load(pooled_net())
    fe = graph.frontend
    xs = graph.random_inputs(0)
    plain = graph.run(*xs)
    structure = fe._structure
    assert structure is not None
    optimised = fe.run_optimised(xs)
    assert fe._structure is structure
    assert gp.verify.relative_error(optimised, plain) < 1e-5
    graph.set_param("c3.b", np.zeros(32, np.float32))  # an edit invalidates it
    assert fe._structure is None


# ------------------------------------------------------------- cropping
def _chosen_size(graph: gp.Graph) -> tuple[int, ...] | None:
    """The spatial probe size the check settles on for ``graph`` (None: the captured size)."""
    found = verify._compare_small(graph, graph, [graph.random_inputs(0)])
    return None if found is None else tuple(found[1][0][0].shape[2:])


def _ran_at(graph: gp.Graph) -> set[tuple[int, ...]]:
    """The spatial input sizes ``graph`` built sessions for besides its captured one (the
    check runs its probes as one batch)."""
    return {key[0][2:] for key, _ in graph.frontend._resized_sessions}


def test_cropping_chosen_where_every_tap_reads_data() -> None:
    graph = _load(pooled_net(32))
    assert shrink_factor(graph) >= 2
    # at 3x3, c1 (pad 1) and the stride-2 c2 see 3 pixels, c3 sees 2: every tap reads data
    assert _chosen_size(graph) == (3, 3)
    shapes = graph.frontend.shapes_at([(1, 3, 3, 3)])
    assert shapes["r2"] == (1, 32, 2, 2) and shapes["y"] == (1, 10)
    out, recorded = graph.frontend.run_with_shapes([np.zeros((1, 3, 3, 3), np.float32)], {"r1", "a3"})
    assert out[0].shape == (1, 10) and recorded == {"r1": (1, 16, 3, 3), "a3": (1, 32, 2, 2)}


@pytest.mark.parametrize("reshape", [True, False], ids=["constant-reshape", "flatten"])
def test_cropping_refused_where_the_graph_fixes_a_size(reshape: bool) -> None:
    graph = _load(fixed_reshape_net(16, reshape=reshape))
    assert shrink_factor(graph) >= 2  # the captured shapes alone would allow it
    assert _chosen_size(graph) is None
    assert graph.frontend._sizes_refused and _ran_at(graph) == set()  # refused by inference: no session built
    assert graph.frontend.shapes_at([(1, 3, 4, 4)]) is None
    copy = graph.copy()
    assert ((1, 3, 4, 4),) in copy.frontend._sizes_refused  # copies (references, rewrites) know it
    with pytest.raises(OnnxLoadError, match="cannot run at input shapes"):
        copy.run(np.zeros((1, 3, 4, 4), np.float32))


def test_cropping_refused_where_a_slice_empties_a_conv_input() -> None:
    graph = _load(sliced_net(36))
    assert shrink_factor(graph) >= 2
    assert graph.frontend.shapes_at([(1, 3, 9, 9)]) is None  # the slice [24:36] of 9 pixels is empty
    assert graph.frontend.shapes_at([(1, 3, 36, 36)]) is not None
    size = _chosen_size(graph)
    # the slice leaves size - 24 pixels; the 3x3 convs behind it need 2
    assert size is not None and 26 <= size[-1] < 36
    assert all(key[-1] >= 26 for key in _ran_at(graph))  # smaller sizes refused before any session


def test_cropping_refused_on_inferred_sizes_without_running() -> None:
    graph = _load(patchify_net(28))
    assert 2 in candidate_factors(graph)  # the estimated sizes allow a factor 2
    assert graph.frontend.shapes_at([(1, 3, 14, 14)])["a2"] == (1, 8, 3, 3)
    size = _chosen_size(graph)
    assert size is not None and size[-1] > 14  # a smaller factor: the 7x7 conv sees 4 pixels or more
    assert graph.frontend.shapes_at([(1, 3, *size)])["a2"][-1] >= 4
    assert (14, 14) not in _ran_at(graph)  # 1/2 refused on the inferred sizes: no session, no forward


def _prune(graph: gp.Graph) -> gp.PassResult:
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    assert result.modified
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(graph).macs
    return result


def _corrupt_corner_tap(result: gp.PassResult, conv: str) -> None:
    """Add 1 to the top-left tap of every kept filter of ``conv`` in the rewritten graph:
    a tap that meets data only away from the top-left border."""
    g = result.graph
    key = g.find(conv).params["weight"]
    w = g.param(key).copy()
    w[:, :, 0, 0] += 1.0
    g.set_param(key, w)


@pytest.mark.parametrize("conv", ["c1", "c2", "c3"])
def test_wrong_tap_caught_at_the_cropped_size(conv: str) -> None:
    graph = _load(pooled_net(32))
    result = _prune(graph)
    reference = result.reference()
    size = _chosen_size(reference)
    assert size is not None and size[-1] < 32
    ok = check_exact(result.graph, reference, rtol=RTOL, shrink=True)
    assert ok.passed and ok.error <= RTOL
    assert _ran_at(result.graph) == {size}  # it ran at the cropped size, not at 32x32
    assert result.graph.frontend._session_cache is None
    _corrupt_corner_tap(result, conv)
    found = verify._compare_small(result.graph, reference, [reference.random_inputs(0), reference.random_inputs(1)])
    assert found is not None and found[0] > 1e-3  # the cropped probes alone catch it
    bad = check_exact(result.graph, reference, rtol=RTOL, shrink=True)  # (a failure is confirmed at 32x32)
    assert not bad.passed and bad.error > 1e-3


def test_wrong_tap_caught_at_the_captured_size_when_cropping_is_refused() -> None:
    graph = _load(fixed_reshape_net(16))
    result = _prune(graph)
    reference = result.reference()
    ok = check_exact(result.graph, reference, rtol=RTOL, shrink=True)
    assert ok.passed
    assert _ran_at(result.graph) == set() and result.graph.frontend._session_cache is not None
    _corrupt_corner_tap(result, "c2")
    bad = check_exact(result.graph, reference, rtol=RTOL, shrink=True)
    assert not bad.passed and bad.error > 1e-3


def test_pipeline_check_crops_and_catches_a_corrupting_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """gp.run's check at the cropped size passes a correct rewrite; a rewrite that
    corrupts the deepest conv's corner tap is refused."""
    graph = _load(pooled_net(32))
    clean = gp.run(graph, "prune-channels{ratio=0.5}")
    assert clean.checks[0] is not None and clean.checks[0].passed
    assert _ran_at(clean.graph) == {(3, 3)}

    import graphprune.passes.prune_channels as prune_channels

    original = prune_channels.remove_channels

    def corrupting(work, *args, **kwargs):  # type: ignore[no-untyped-def]
        removed = original(work, *args, **kwargs)
        key = work.find("c3").params["weight"]
        w = work.param(key).copy()
        w[:, :, 0, 0] += 1.0
        work.set_param(key, w)
        return removed

    monkeypatch.setattr(prune_channels, "remove_channels", corrupting)
    with pytest.raises(gp.VerificationError, match="differs from the projected reference"):
        gp.run(graph, "prune-channels{ratio=0.5}", freeze=False)


def test_wrong_tap_behind_a_slice_caught() -> None:
    """The check crops only as far as the slice in front of c2 and c3 keeps them fed; the
    corrupted c3 is caught there."""
    graph = _load(sliced_net(36))
    result = _prune(graph)
    reference = result.reference()
    assert check_exact(result.graph, reference, rtol=RTOL, shrink=True).passed
    assert all(26 <= key[-1] < 36 for key in _ran_at(result.graph))
    _corrupt_corner_tap(result, "c3")
    found = verify._compare_small(result.graph, reference, [reference.random_inputs(0), reference.random_inputs(1)])
    assert found is not None and found[0] > 1e-3
    bad = check_exact(result.graph, reference, rtol=RTOL, shrink=True)
    assert not bad.passed and bad.error > 1e-3


def test_failure_at_the_cropped_size_is_confirmed_at_the_captured_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that fails on the cropped probes is repeated on the probes as given; a pass
    there is the verdict (with its own numbers), so size-dependent rounding never freezes
    an exact rewrite."""
    graph = _load(pooled_net(32))
    result = _prune(graph)
    reference = result.reference()
    calls: list[tuple[int, ...]] = []
    real = verify._compare_small

    def pessimistic(g, ref, samples):  # type: ignore[no-untyped-def]
        found = real(g, ref, samples)
        assert found is not None
        calls.append(tuple(found[1][0][0].shape))
        return 1.0, found[1]

    monkeypatch.setattr(verify, "_compare_small", pessimistic)
    check = check_exact(result.graph, reference, rtol=RTOL, shrink=True)
    assert [c[2:] for c in calls] == [(3, 3)]
    assert check.passed and check.error <= RTOL
    assert result.graph.frontend._session_cache is not None  # the verdict came from 32x32


def test_one_wide_windows_after_global_pooling_do_not_limit_the_factor() -> None:
    """The excite convs' 1x1 inputs stay 1x1 at any size: the check crops to where the 3x3
    convs still read data, passes a correct rewrite and catches a wrong tap in the last conv."""
    graph = _load(se_net(32))
    assert shrink_factor(graph) >= 8
    result = _prune(graph)
    reference = result.reference()
    size = _chosen_size(reference)
    assert size is not None and size[-1] <= 4
    assert graph.frontend.shapes_at([(1, 3, *size)])["e1"] == (1, 4, 1, 1)
    assert check_exact(result.graph, reference, rtol=RTOL, shrink=True).passed
    assert _ran_at(result.graph) == {size}
    _corrupt_corner_tap(result, "c2")
    found = verify._compare_small(result.graph, reference, [reference.random_inputs(0)])
    assert found is not None and found[0] > 1e-3
