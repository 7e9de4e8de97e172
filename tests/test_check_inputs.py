"""The exactness checks on the inputs a model is meant to get, with a tolerance that
follows the model's own float noise (issue 15).

Two small ONNX models built with onnx.helper:

* ``vad`` — a voice-activity-detector shape: convs on ``x``, a recurrent ``state`` (a
  log-gain) fed back as ``stateN``, and an int64 ``sr`` input that selects an ``If``
  branch.  A random state or sample rate puts the model where ``sin`` of a large
  argument amplifies the rounding of an exact rewrite: random probes (random state,
  sr = 0 as before) refuse an exact ``factorize``; the new probes (zero state,
  sr = 16000 from the ``Equal``) accept it.
* ``deep`` — six conv + batch-norm + relu blocks whose batch norms subtract a large mean:
  the model's own outputs move by more than 1e-5 between onnxruntime's optimisation
  levels (batch norm folding rounds differently), and so does an exact ``factorize``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune import probes
from graphprune.cli import main
from graphprune.verify import RTOL_CAP, RTOL_FLOOR, compare, measured_tolerance, reference_noise

FACTORIZE = "factorize{rank=4}"
DEEP_FACTORIZE = "factorize{rank=3}"


# -------------------------------------------------------------------- models
def vad_model(size: int = 16) -> onnx.ModelProto:
    """x (1,3,S,S), state (1,8,S,S), sr int64 scalar -> output (1,8,S,S), stateN (1,8,S,S).

    ``z = conv2(relu(conv1(x)))``; the state is a log-gain: ``y = z * exp(3 * state)``,
    ``stateN = state + 0.001 * z``; ``output = sin(y)`` when ``sr == 16000``, else
    ``sin(1000 * y)``.  ``sin`` of a large argument amplifies the rounding of ``z``: a
    random state (gains up to e^9) or another sample rate makes an exact rewrite look
    inexact; a zero state and sr = 16000 do not.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 50).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(3.0, np.float32), "log_gain"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "leak"),
        numpy_helper.from_array(np.array(1000.0, np.float32), "other_rate"),
        numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
    ]
    out = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]  # noqa: E731
    then_branch = helper.make_graph([helper.make_node("Sin", ["y"], ["plain"])], "sr16k", [], out("plain"))
    else_branch = helper.make_graph([helper.make_node("Mul", ["y", "other_rate"], ["fast"]),
                                     helper.make_node("Sin", ["fast"], ["resampled"])], "other", [], out("resampled"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["z"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Mul", ["state", "log_gain"], ["lg"], name="log_gain"),
        helper.make_node("Exp", ["lg"], ["gain"], name="gain"),
        helper.make_node("Mul", ["z", "gain"], ["y"], name="apply_gain"),
        helper.make_node("Mul", ["z", "leak"], ["dz"], name="leak"),
        helper.make_node("Add", ["state", "dz"], ["stateN"], name="next_state"),
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="check_sr"),
        helper.make_node("If", ["is16k"], ["output"], then_branch=then_branch, else_branch=else_branch, name="by_rate"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", f, [1, 3, size, size]), helper.make_tensor_value_info("state", f, [1, 8, size, size]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", f, [1, 8, size, size]), helper.make_tensor_value_info("stateN", f, [1, 8, size, size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def deep_model(layers: int = 6, offset: float = 5.0) -> onnx.ModelProto:
    """``layers`` x (conv with bias ``offset``, batch norm with mean ``offset``, relu)."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, cin, c = [], [], "x", 4, 8
    for i in range(layers):
        w = (rng.standard_normal((c, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        for name, value in ((f"w{i}", w), (f"b{i}", np.full(c, offset)), (f"g{i}", np.ones(c)), (f"be{i}", np.zeros(c)),
                            (f"m{i}", np.full(c, offset)), (f"v{i}", np.ones(c))):
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, cin = f"r{i}", c
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def vad_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("vad") / "vad.onnx")
    onnx.save(vad_model(), path)
    return path


@pytest.fixture(scope="module")
def deep_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("deep") / "deep.onnx")
    onnx.save(deep_model(), path)
    return path


def old_random_probes(seed: int) -> list[torch.Tensor]:
    """What the checks fed before: standard normal for every float input, zeros for integers."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 16, 16, generator=gen), torch.randn(1, 8, 16, 16, generator=gen), torch.tensor(0)]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -------------------------------------------------------------------- probes
def test_probe_roles_of_a_recurrent_model() -> None:
    specs = {s.name: s for s in probes.input_specs(gp.load_onnx(vad_model()))}
    assert [specs[n].role for n in ("x", "state", "sr")] == ["data", "state", "integer"]
    assert int(specs["sr"].hint) == 16000  # from Equal(sr, 16000)
    x, state, sr = gp.load_onnx(vad_model()).random_inputs(1)
    assert x.std() > 0.5 and not state.any() and int(sr) == 16000 and sr.dtype == np.int64


def test_probe_roles_by_name_and_feedback() -> None:
    words = probes.named_like_state
    assert all(words(n) for n in ("state", "h0", "c0", "hiddenState", "past_key_values.0.key", "kv_cache", "stateIn"))
    assert not any(words(n) for n in ("input", "image", "x", "pixel_values", "estimate", "statistic_x"))
    assert probes.named_like_mask("attention_mask") and not probes.named_like_mask("image")
    # an unnamed input fed back as an output of its shape is state when a data input remains ...
    model = vad_model()
    model.graph.input[1].name = "carry"
    for node in model.graph.node:
        node.input[:] = ["carry" if i == "state" else i for i in node.input]
    roles = {s.name: s.role for s in probes.input_specs(gp.load_onnx(model))}
    assert roles == {"x": "data", "carry": "state", "sr": "integer"}
    # ... but a model whose only input has its output's shape (an autoencoder) keeps it random
    deep = gp.load_onnx(deep_model(layers=1))
    assert [s.role for s in probes.input_specs(deep)] == ["data"]


def test_integer_inputs_without_a_hint_get_small_non_negative_values() -> None:
    model = vad_model()
    check_sr = next(n for n in model.graph.node if n.name == "check_sr")
    check_sr.input[0] = "sr_times_one"  # compared after arithmetic: no hint
    model.graph.node.insert(0, helper.make_node("Mul", ["sr", "one"], ["sr_times_one"], name="hide"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    graph = gp.load_onnx(model)
    assert graph.frontend.input_hints() == {}
    values = {int(graph.random_inputs(seed)[2]) for seed in range(12)}
    assert values <= {0, 1, 2, 3} and len(values) > 1


# ------------------------------------------------- exactness on the real kind of input
def test_random_probes_refuse_an_exact_rewrite_that_the_new_probes_accept(vad_path: str, tmp_path, capsys) -> None:
    graph = gp.load_onnx(vad_path)
    old = [old_random_probes(seed) for seed in range(2)]
    with pytest.raises(gp.VerificationError, match="differs from the projected reference"):
        gp.run(graph, FACTORIZE, check_inputs=old, freeze=False)
    frozen = gp.run(graph, FACTORIZE, check_inputs=old).results[0]  # by default the layers responsible freeze
    assert frozen.frozen and all(r.startswith("inexact here: max error") for r in frozen.frozen.values())
    result = gp.run(graph, FACTORIZE)  # zero state, sr = 16000
    step = result.results[0]
    assert step.modified and result.checks[0].error < 1e-6
    # the numbers: the same exact rewrite, on each kind of input
    on_random = compare(step.graph, step.reference(), inputs=old)
    real = [[x, torch.zeros(1, 8, 16, 16), torch.tensor(16000)] for x, _, _ in old]
    on_real = compare(step.graph, step.reference(), inputs=real)
    assert on_random > RTOL_CAP and on_real < 1e-6, (on_random, on_real)

    # the same on the command line: default probes accept, the user's random file refuses
    out = str(tmp_path / "vad-slim.onnx")
    code, stdout, err = cli(capsys, "optimize", vad_path, "-o", out, "-p", FACTORIZE, "--no-progress")
    assert code == 0, err
    assert "probe inputs" in stdout and "tolerance" in stdout
    bad = str(tmp_path / "random.npz")
    np.savez(bad, x=np.stack([np.asarray(s[0]) for s in old]), state=np.stack([np.asarray(s[1]) for s in old]), sr=np.int64(0))
    code, _, err = cli(capsys, "optimize", vad_path, "-o", str(tmp_path / "no.onnx"), "-p", FACTORIZE,
                       "--check-inputs", bad, "--no-progress", "--no-freeze")
    assert code == 1 and "differs" in err and not os.path.exists(tmp_path / "no.onnx")
    code, stdout, err = cli(capsys, "optimize", vad_path, "-o", str(tmp_path / "frozen.onnx"), "-p", FACTORIZE,
                            "--check-inputs", bad, "--no-progress")
    assert code == 0 and "froze" in stdout and "inexact here" in stdout, err


def test_check_inputs_file_and_input_values(vad_path: str, tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((3, 1, 3, 16, 16)).astype(np.float32)
    # three samples along a leading axis, the state given once, sr as --input-value
    good = str(tmp_path / "good.npz")
    np.savez(good, x=xs, state=np.zeros((1, 8, 16, 16), np.float32))
    out, report = str(tmp_path / "a.onnx"), str(tmp_path / "a.json")
    code, stdout, err = cli(capsys, "optimize", vad_path, "-o", out, "-p", FACTORIZE, "--check-inputs", good,
                            "--input-value", "sr=16000", "--report", report, "--no-progress")
    assert code == 0, err
    check = json.load(open(report))["check"]
    assert check["inputs"] == 3 and check["input_source"] == f"inputs from {good}"
    assert check["max_difference"] < 1e-6 and check["rtol"] >= RTOL_FLOOR and check["rtol_source"] == "measured"
    # one sample per key suffix; a sample rate the model treats differently is refused
    keyed = str(tmp_path / "keyed.npz")
    np.savez(keyed, **{"x:0": xs[0], "x:1": xs[1]}, state=np.zeros((1, 8, 16, 16), np.float32))
    code, _, err = cli(capsys, "optimize", vad_path, "-o", str(tmp_path / "b.onnx"), "-p", FACTORIZE,
                       "--check-inputs", keyed, "--input-value", "sr=8000", "--no-progress", "--no-freeze")
    assert code == 1 and "on 2 inputs" in err and "tolerance 0.0001 (measured" in err
    code, stdout, err = cli(capsys, "optimize", vad_path, "-o", str(tmp_path / "b.onnx"), "-p", FACTORIZE,
                            "--check-inputs", keyed, "--input-value", "sr=8000", "--no-progress")
    assert code == 0 and "inexact here" in stdout, err  # by default the layers responsible are frozen
    # --input-value alone fixes an input in every probe
    code, _, err = cli(capsys, "optimize", vad_path, "-o", str(tmp_path / "c.onnx"), "-p", FACTORIZE,
                       "--input-value", "state=0", "--input-value", "sr=16000", "--check", "2", "--no-progress")
    assert code == 0, err


def _bad(capsys, tmp_path, vad_path: str, *argv: str) -> str:
    out = str(tmp_path / "never.onnx")
    code, _, err = cli(capsys, "optimize", vad_path, "-o", out, "-p", FACTORIZE, *argv, "--no-progress")
    assert code == 2, err
    assert not os.path.exists(out) and "graphprune: error:" in err
    return err


def test_bad_check_inputs_exit_2_naming_the_input(vad_path: str, tmp_path, capsys) -> None:
    x, state = np.zeros((1, 3, 16, 16), np.float32), np.zeros((1, 8, 16, 16), np.float32)
    cases = {
        "missing": ({"x": x, "state": state}, "no array for input `sr`"),
        "unknown": ({"x": x, "state": state, "sr": np.int64(1), "audio": x}, "`audio`, which is not an input"),
        "shape": ({"x": np.zeros((1, 3, 9, 9), np.float32), "state": state, "sr": np.int64(1)}, "input `x` has shape (1, 3, 16, 16)"),
        "dtype": ({"x": x.astype(np.float64), "state": state, "sr": np.int64(1)}, "input `x` is float32, the given array is float64"),
        "counts": ({"x": np.stack([x, x]), "state": np.stack([state] * 3), "sr": np.int64(1)}, "different numbers of samples"),
    }
    for name, (arrays, message) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        assert message in _bad(capsys, tmp_path, vad_path, "--check-inputs", path), name
    assert "not an input of the model" in _bad(capsys, tmp_path, vad_path, "--input-value", "rate=16000")
    assert "input `sr` is int64, so its value must be whole" in _bad(capsys, tmp_path, vad_path, "--input-value", "sr=1.5")
    assert "NAME=VALUE" in _bad(capsys, tmp_path, vad_path, "--input-value", "16000")
    assert "no such file" in _bad(capsys, tmp_path, vad_path, "--check-inputs", str(tmp_path / "nope.npz"))


def test_python_check_inputs_forms() -> None:
    graph = gp.load_onnx(vad_model())
    x = np.ones((2, 1, 3, 16, 16), np.float32)
    by_name = probes.check_samples(graph, {"x": x, "state": 0.0, "sr": 16000})
    assert len(by_name) == 2 and int(by_name[1][2]) == 16000 and by_name[0][1].shape == (1, 8, 16, 16)
    one = probes.check_samples(graph, [torch.ones(1, 3, 16, 16), torch.zeros(1, 8, 16, 16), torch.tensor(16000)])
    listed = probes.check_samples(graph, [{"x": x[0], "state": 0, "sr": 16000}, {"x": x[1], "state": 0, "sr": 8000}])
    assert len(one) == 1 and len(listed) == 2 and int(listed[1][2]) == 8000
    with pytest.raises(gp.CheckInputError, match="`state`"):
        probes.check_samples(graph, [torch.ones(1, 3, 16, 16), torch.zeros(1, 8, 16), torch.tensor(16000)])


# ----------------------------------------------------- tolerance from the model's noise
def test_measured_tolerance_rule() -> None:
    assert measured_tolerance(None) == RTOL_FLOOR and measured_tolerance(1e-8) == RTOL_FLOOR
    assert measured_tolerance(1e-5) == pytest.approx(4e-5) and measured_tolerance(1e-3) == RTOL_CAP
    assert measured_tolerance(float("nan")) == RTOL_FLOOR


def test_deep_model_noise_sets_the_tolerance(deep_path: str, tmp_path, capsys) -> None:
    graph = gp.load_onnx(deep_path)
    step = gp.run(graph, DEEP_FACTORIZE, verify=False).results[0]
    reference, probes_ = step.reference(), [graph.random_inputs(s) for s in range(2)]
    noise = reference_noise(reference, probes_)  # the reference's own spread between optimisation levels
    error = compare(step.graph, reference, inputs=probes_)
    assert noise is not None and noise > RTOL_FLOOR and RTOL_FLOOR < error < measured_tolerance(noise), (noise, error)
    out, report = str(tmp_path / "deep-slim.onnx"), str(tmp_path / "deep.json")
    code, stdout, err = cli(capsys, "optimize", deep_path, "-o", out, "-p", DEEP_FACTORIZE, "--report", report, "--no-progress")
    assert code == 0, err
    data = json.load(open(report))
    check, between_passes = data["check"], data["passes"][0]["check"]
    assert RTOL_FLOOR < check["max_difference"] <= check["rtol"] <= RTOL_CAP, check  # exact, but above 1e-5
    # between passes the check runs on the probes cropped to 2x2 (graphprune.probe_size), where this
    # model's rounding stays below the floor; the written file is checked at the full size (above)
    assert between_passes["max_difference"] <= between_passes["rtol"] <= RTOL_CAP, between_passes
    assert check["noise"] > RTOL_FLOOR and check["rtol"] == pytest.approx(measured_tolerance(check["noise"]))
    assert "model noise" in stdout
    # an explicit --rtol still wins: the fixed 1e-5 refuses the same exact rewrite
    code, _, err = cli(capsys, "optimize", deep_path, "-o", str(tmp_path / "fixed.onnx"), "-p", DEEP_FACTORIZE,
                       "--rtol", "1e-5", "--no-progress", "--no-freeze")
    assert code == 1 and "tolerance 1e-05" in err


def test_inexact_rewrite_is_still_refused_with_the_measured_tolerance(deep_path: str, tmp_path, capsys, monkeypatch) -> None:
    from graphprune.passes.factorize import Factorize

    original = Factorize.call

    def corrupt_one_weight(self, graph):
        result = original(self, graph)
        node = next(n for n in result.graph.nodes if n.kind == "conv")
        key = node.params["weight"]
        w = result.graph.param(key).copy()
        w.reshape(-1)[0] += 0.01 * float(np.abs(w).max())
        result.graph.set_param(key, w)
        result.graph.commit()
        return result

    monkeypatch.setattr(Factorize, "call", corrupt_one_weight)
    with pytest.raises(gp.VerificationError, match=r"measured: model noise"):
        gp.run(gp.load_onnx(deep_path), DEEP_FACTORIZE, freeze=False)
    code, _, err = cli(capsys, "optimize", deep_path, "-o", str(tmp_path / "bad.onnx"), "-p", DEEP_FACTORIZE,
                       "--no-progress", "--no-freeze")
    assert code == 1 and "differs" in err and not os.path.exists(tmp_path / "bad.onnx")
