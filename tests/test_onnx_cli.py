"""``graphprune optimize`` and ``graphprune inspect`` on ONNX files: results, reports,
checks, and every bad input (exit code 2, a message naming the problem, no output)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphprune import onnx_cli
from graphprune.cli import main
from graphprune.samples.models import sample_input, sample_net
from test_onnx_frontend import custom_op_model

RTOL = 1e-5


def export(model: torch.nn.Module, path: str, dynamic: bool = True) -> str:
    kwargs = {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample_input(),), path, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["output"], **kwargs)
    return path


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return export(sample_net(), str(tmp_path_factory.mktemp("cli") / "sample.onnx"))


@pytest.fixture(scope="module")
def planted_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SampleNet with zero channels planted (zero BN scale and shift before a ReLU)."""
    model = sample_net()
    with torch.no_grad():
        for bn, idx in ((model.stage1[0].bn1, [0, 4, 7]), (model.stage2[0].bn1, [1, 2, 3, 20])):
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
    return export(model, str(tmp_path_factory.mktemp("cli") / "planted.onnx"))


# ------------------------------------------------------------------ optimize
def test_optimize_prunes_checks_and_reports(model_path: str, tmp_path, capsys) -> None:
    out, report = str(tmp_path / "out.onnx"), str(tmp_path / "report.json")
    digest = sha(model_path)
    code, stdout, _ = cli(capsys, "optimize", model_path, "-o", out, "-p", "prune-channels{ratio=0.3}",
                          "--input-shape", "input:2,3,32,32", "--report", report, "--no-progress")
    assert code == 0, stdout
    assert sha(model_path) == digest  # the input file is untouched
    assert "check: 3 probe inputs" in stdout and "projected reference" in stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.load(open(report))
    assert data["pipeline"] == ["prune-channels{ratio=0.3}"] and data["check"]["max_difference"] <= RTOL
    assert data["totals"]["macs_after"] < 0.8 * data["totals"]["macs_before"]
    assert data["totals"]["params_after"] < data["totals"]["params_before"]
    layers = {row["layer"]: row for row in data["layers"]}
    conv = layers["/stage1/stage1.0/conv1/Conv"]
    assert conv["channels_before"] == 16 and conv["channels_after"] < 16 and conv["macs_after"] < conv["macs_before"]
    assert data["passes"][0]["modified"] and data["passes"][0]["records"]
    # opset, names and the dynamic batch dim survive; the output runs with another batch
    src, saved = onnx.load(model_path), onnx.load(out)
    assert [(o.domain, o.version) for o in saved.opset_import] == [(o.domain, o.version) for o in src.opset_import]
    assert [i.name for i in saved.graph.input] == ["input"] and [o.name for o in saved.graph.output] == ["output"]
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert ort_run(out, np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)).shape == (5, 10)


def test_optimize_lossless_keeps_outputs_and_drops_macs(planted_path: str, tmp_path, capsys) -> None:
    out, report = str(tmp_path / "lossless.onnx"), str(tmp_path / "r.json")
    code, stdout, _ = cli(capsys, "optimize", planted_path, "-o", out, "--lossless", "--input-shape", "input:2,3,32,32",
                          "--report", report, "--no-progress")
    assert code == 0
    assert "vs the input file" in stdout
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a, b = ort_run(out, x), ort_run(planted_path, x)
    assert np.abs(a - b).max() <= RTOL * np.abs(b).max()
    totals = json.load(open(report))["totals"]
    assert totals["macs_after"] < totals["macs_before"]
    kept = {r["layer"]: r for r in json.load(open(report))["layers"]}
    assert kept["/stage1/stage1.0/conv1/Conv"]["channels_after"] == 13
    assert kept["/stage2/stage2.0/conv1/Conv"]["channels_after"] == 28


def test_optimize_external_data(model_path: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "ext.onnx")
    code, _, _ = cli(capsys, "optimize", model_path, "-o", out, "-p", "prune-channels{ratio=0.5}",
                     "--input-shape", "input:1,3,32,32", "--external-data", "--check", "1", "--no-progress")
    assert code == 0
    assert os.path.exists(out + ".data") and os.path.getsize(out) < 30_000
    assert ort_run(out, np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


def test_check_failure_exits_1_and_writes_nothing(model_path: str, tmp_path, capsys, monkeypatch) -> None:
    original = onnx_cli._Check.reference

    def off_by_a_bit(self):
        ref = original(self)
        return lambda xs: [t + 1.0 for t in ref(xs)]

    monkeypatch.setattr(onnx_cli._Check, "reference", off_by_a_bit)
    out = str(tmp_path / "bad.onnx")
    code, _, err = cli(capsys, "optimize", model_path, "-o", out, "-p", "prune-channels{ratio=0.3}",
                       "--input-shape", "input:2,3,32,32", "--no-progress")
    assert code == 1 and "differs" in err
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".graphprune")]


# ------------------------------------------------------------------ bad input
def _bad(capsys, tmp_path, *argv: str) -> str:
    out = str(tmp_path / "never.onnx")
    code, _, err = cli(capsys, "optimize", *argv, "-o", out, "--no-progress")
    assert code == 2, err
    assert not os.path.exists(out)
    assert "graphprune: error:" in err
    return err


def test_missing_file(tmp_path, capsys) -> None:
    err = _bad(capsys, tmp_path, str(tmp_path / "nope.onnx"), "--lossless")
    assert "no such file" in err and "nope.onnx" in err


def test_not_an_onnx_file(tmp_path, capsys) -> None:
    path = tmp_path / "readme.onnx"
    path.write_text("graphprune is a structured pruning compiler\n" * 20)
    err = _bad(capsys, tmp_path, str(path), "--lossless")
    assert "not a valid ONNX file" in err and "readme.onnx" in err
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "not an ONNX model" in _bad(capsys, tmp_path, str(empty), "--lossless")


def test_truncated_file(model_path: str, tmp_path, capsys) -> None:
    data = open(model_path, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    err = _bad(capsys, tmp_path, str(path), "--lossless", "--input-shape", "input:1,3,32,32")
    assert "truncated" in err


def test_output_is_the_input(model_path: str, tmp_path, capsys) -> None:
    digest = sha(model_path)
    folder, name = os.path.split(model_path)
    same = os.path.join(folder, ".", "sub", "..", name)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    code, _, err = cli(capsys, "optimize", model_path, "-o", same, "--lossless", "--input-shape", "input:1,3,32,32")
    assert code == 2 and "is the input file" in err
    assert sha(model_path) == digest


def test_dynamic_dim_without_input_shape(model_path: str, tmp_path, capsys) -> None:
    err = _bad(capsys, tmp_path, model_path, "-p", "prune-channels{ratio=0.3}")
    assert "input `input`" in err and "--input-shape input:N,3,32,32" in err


def test_bad_input_shape_and_pipeline(model_path: str, tmp_path, capsys) -> None:
    assert "NAME:D0,D1" in _bad(capsys, tmp_path, model_path, "--lossless", "--input-shape", "1,3,32,32")
    assert "no such input" in _bad(capsys, tmp_path, model_path, "--lossless", "--input-shape", "image:1,3,32,32")
    assert "unknown pass" in _bad(capsys, tmp_path, model_path, "-p", "prune-everything", "--input-shape", "input:1,3,32,32")


def test_custom_domain_op_onnxruntime_cannot_run(tmp_path, capsys) -> None:
    """An op onnxruntime has no kernel for: the checks are skipped with a warning (or
    silently with --check 0), the op's channels stay, the convs before it prune."""
    path = str(tmp_path / "custom.onnx")
    onnx.save(custom_op_model("my.company", "Mystery"), path)
    for extra, warned in (((), True), (("--check", "0"), False)):
        out = str(tmp_path / f"custom-slim{len(extra)}.onnx")
        code, stdout, err = cli(capsys, "optimize", path, "-o", out, "-p", "prune-channels{ratio=0.5}", "--no-progress", *extra)
        assert code == 0, err
        assert ("onnxruntime cannot run `" in err and "checks are skipped" in err) == warned, err
        assert "check: skipped" in stdout and "modified" in stdout
        saved = onnx.load(out)
        onnx.checker.check_model(saved)
        dims = {i.name: list(i.dims) for i in saved.graph.initializer}
        assert dims["w1"] == [4, 3, 3, 3] and dims["w2"] == [8, 4, 1, 1]  # conv2's output feeds the custom op: kept
        assert any(n.op_type == "Mystery" and n.domain == "my.company" for n in saved.graph.node)


def test_contrib_op_model_optimizes_around_it(tmp_path, capsys) -> None:
    path, out = str(tmp_path / "contrib.onnx"), str(tmp_path / "contrib_out.onnx")
    onnx.save(custom_op_model("com.microsoft", "Gelu"), path)
    code, stdout, _ = cli(capsys, "optimize", path, "-o", out, "-p", "prune-channels{ratio=0.5}", "--no-progress")
    assert code == 0 and "modified" in stdout
    w1 = {i.name: i for i in onnx.load(out).graph.initializer}["w1"]
    assert list(w1.dims) == [4, 3, 3, 3]


# -------------------------------------------------------------------- inspect
def test_inspect_prints_groups_frozen_and_cost(model_path: str, capsys) -> None:
    code, stdout, _ = cli(capsys, "inspect", model_path, "--input-shape", "input:2,3,32,32")
    assert code == 0
    assert "pruning groups" in stdout and "group 0:" in stdout and "prunable" in stdout
    assert "frozen channels:" in stdout and "model input or output" in stdout
    assert "/stem/stem.0/Conv" in stdout and "total" in stdout and "MACs" in stdout


def test_inspect_shows_why_ops_are_unknown(tmp_path, capsys) -> None:
    path = str(tmp_path / "custom.onnx")
    onnx.save(custom_op_model("my.company", "Mystery"), path)
    code, stdout, _ = cli(capsys, "inspect", path)
    assert code == 0
    assert "custom-domain op `my.company::Mystery`" in stdout
    assert "ops without a channel rule" in stdout


def test_entry_point_runs(model_path: str, tmp_path) -> None:
    """The installed console script, end to end (no progress bar: stderr is not a terminal)."""
    out = str(tmp_path / "cli.onnx")
    exe = os.path.join(os.path.dirname(sys.executable), "graphprune")
    proc = subprocess.run([exe, "optimize", model_path, "-o", out, "-p", "prune-channels{ratio=0.25}",
                           "--input-shape", "input:1,3,32,32", "--check", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "MACs" in proc.stdout and os.path.exists(out)


def test_optimize_with_a_no_op_pipeline_writes_the_model(model_path: str, tmp_path, capsys) -> None:
    """Nothing to prune is not an error: the output is written, checked against the input."""
    out = str(tmp_path / "same.onnx")
    code, stdout, err = cli(capsys, "optimize", model_path, "-o", out, "-p", "prune-channels{ratio=0}",
                            "--input-shape", "input:2,3,32,32", "--no-progress")
    assert code == 0, err
    assert os.path.exists(out)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got, want = ort_run(out, x), ort_run(model_path, x)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= RTOL


def test_outputs_get_the_usual_umask_mode(model_path: str, tmp_path, capsys) -> None:
    """Written files are readable like any file the user makes (not mkstemp's 0600)."""
    out = tmp_path / "slim.onnx"
    old = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "optimize", model_path, "-o", str(out), "-p", "prune-channels{ratio=0.3}",
                           "--input-shape", "input:1,3,32,32", "--no-progress")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


def test_inspect_into_a_closed_pipe_exits_quietly(model_path: str) -> None:
    """`graphprune inspect m.onnx | head -1`: no BrokenPipeError traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "graphprune")
    proc = subprocess.run(f"'{exe}' inspect '{model_path}' --input-shape input:1,3,32,32 | head -1", shell=True, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_no_progress_frames_when_stderr_is_not_a_terminal(model_path: str, tmp_path) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "graphprune")
    proc = subprocess.run([exe, "optimize", model_path, "-o", str(tmp_path / "o.onnx"), "-p", "prune-channels{ratio=0.3}",
                           "--input-shape", "input:1,3,32,32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "%|" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr  # no tqdm frames in a log
