"""Users' mistakes and papercuts (issue 12): each handled with a clear message, tested."""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune import onnx_cli
from graphprune.cli import main, option_docs
from graphprune.names import module_path, resolve_names
from graphprune.passes_base import PASSES, get_pass
from graphprune.samples.models import randomize_, sample_input, sample_net


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("small") / "small.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(randomize_(Small()).eval(), (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def no_temp_files(folder: str) -> bool:
    return not [f for f in os.listdir(folder) if f.startswith(".graphprune")]


# ------------------------------------------------------------------ ignore names
def test_module_path_of_scoped_onnx_names() -> None:
    assert module_path("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_path("/fc/Gemm") == "fc"
    assert module_path("/features/features.0/Conv") == "features.0"
    assert module_path("/Relu") is None and module_path("conv1") is None


def test_onnx_ignore_accepts_module_paths(small_onnx: str) -> None:
    graph = gp.load_onnx(small_onnx)
    assert resolve_names(graph, ["fc"]) == {"/fc/Gemm"}
    assert resolve_names(graph, ["/fc/Gemm"]) == {"/fc/Gemm"}
    assert resolve_names(graph, ["features.2"]) == {"/features/features.2/Conv"}
    assert {"/features/features.0/Conv", "/features/features.2/Conv"} <= resolve_names(graph, ["features"])
    # ignoring the first conv by its module path keeps its channels
    free = gp.run(graph, "prune-channels{ratio=0.5}").results[0]
    kept = gp.run(graph, "prune-channels{ratio=0.5,ignore=features.0}").results[0]
    w = "/features/features.0/Conv"
    assert free.graph.param(free.graph.node(w).params["weight"]).shape[0] == 4
    assert kept.graph.param(kept.graph.node(w).params["weight"]).shape[0] == 8


def test_unknown_ignore_name_is_an_error_with_close_matches(small_onnx: str, tmp_path, capsys) -> None:
    graph = gp.load_onnx(small_onnx)
    with pytest.raises(gp.PassOptionError, match=r"`featres.0` names no layer of this model; close matches: features.0"):
        gp.run(graph, "prune-channels{ratio=0.5,ignore=featres.0}")
    fx = gp.trace(sample_net(), sample_input())
    for p in ("prune-channels{ratio=0.5,ignore=stage1.0.conv9}", "factorize{energy=0.9,ignore=stage1.0.conv9}",
              "shrink-kernels{energy=0.1,ignore=stage1.0.conv9}", "group-convs{groups=2,ignore=stage1.0.conv9}"):
        with pytest.raises(gp.PassOptionError, match=r"close matches: .*stage1\.0\.conv1"):
            gp.run(fx, p)
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", str(tmp_path / "o.onnx"), "-p", "prune-channels{ratio=0.5,ignore=fcc}")
    assert code == 2 and "`fcc` names no layer" in err and "fc" in err and not os.path.exists(tmp_path / "o.onnx")
    code, _, err = cli(capsys, "inspect", small_onnx, "--ignore", "fcc")
    assert code == 2 and "close matches" in err


# --------------------------------------------------------------- output paths
def test_output_directory_is_refused_before_any_work(small_onnx: str, tmp_path, capsys, monkeypatch) -> None:
    def never(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("graphprune.frontends.onnx.load_onnx", never)
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", str(tmp_path), "--lossless")
    assert code == 2 and "is a directory" in err and str(tmp_path) in err
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", str(afile / "out.onnx"), "--lossless")
    assert code == 2 and "is a file, not a folder" in err
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", str(tmp_path / "ok.onnx"), "--lossless", "--report", str(tmp_path))
    assert code == 2 and "--report" in err and "is a directory" in err


def _read_only_folder(tmp_path) -> str:
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        open(folder / "probe", "w").close()
    except OSError:
        return str(folder)
    os.unlink(folder / "probe")  # root writes anyway: /sys refuses even root
    return "/sys"


def test_read_only_output_folder_exits_2_naming_it(small_onnx: str, tmp_path, capsys) -> None:
    folder = _read_only_folder(tmp_path)
    out = os.path.join(folder, "slim.onnx")
    code, stdout, err = cli(capsys, "optimize", small_onnx, "-o", out, "--lossless")
    assert code == 2 and f"cannot write -o `{out}`" in err and len(err.strip().splitlines()) == 1
    assert "MACs" not in stdout and not os.path.exists(out)


def test_write_error_exits_2_with_one_line_and_no_file(small_onnx: str, tmp_path, capsys, monkeypatch) -> None:
    """A full disk while writing: one line naming the user's path, no file left."""
    import graphprune.frontends.onnx.save as save

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / ".graphprune-x.onnx"))

    monkeypatch.setattr(save.onnx, "save_model", disk_full)
    out = str(tmp_path / "slim.onnx")
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", out, "--lossless", "--no-progress")
    assert code == 2 and err.strip() == f"graphprune: error: cannot write `{out}`: No space left on device"
    assert not os.path.exists(out) and no_temp_files(str(tmp_path))


def test_unreadable_input_exits_2(tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "optimize", str(tmp_path), "-o", str(tmp_path / "o.onnx"), "--lossless")
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err


# ---------------------------------------------------------- conflicting options
def test_lossless_with_a_target_is_an_error(small_onnx: str, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "optimize", small_onnx, "-o", str(tmp_path / "o.onnx"), "--lossless", "-p", "prune-channels{ratio=0.3}")
    assert code == 2 and "--lossless conflicts with ratio=0.3" in err
    for p, opt in (("prune-channels{lossless=true,macs=0.5}", "macs=0.5"), ("factorize{lossless=true,energy=0.9}", "energy=0.9"),
                   ("shrink-kernels{lossless=true,energy=0.1}", "energy=0.1")):
        with pytest.raises(gp.PassOptionError, match=f"lossless conflicts with {opt}"):
            gp.parse_pipeline(p)
    g = gp.load_onnx(small_onnx)
    with pytest.raises(gp.PassOptionError, match="lossless conflicts with ratio=0.3"):
        gp.run(g, "prune-channels{ratio=0.3}", lossless=True)
    gp.parse_pipeline("group-convs{groups=4,lossless=true}")  # a constraint there, not a conflict


# ------------------------------------------------------------ no change: why
def test_no_change_says_why(small_onnx: str, capsys, tmp_path) -> None:
    g = gp.trace(sample_net(), sample_input())
    why = {p: gp.run(g, p).results[0].no_change for p in (
        "prune-channels{lossless=true}", "prune-channels{ratio=0.01}", "factorize{lossless=true}", "shrink-kernels{energy=0.0}")}
    assert "no prunable channel is zero" in why["prune-channels{lossless=true}"]
    assert "removes no channel" in why["prune-channels{ratio=0.01}"]
    assert "already zero or low-rank" in why["factorize{lossless=true}"] and "grouped conv: not factorized" in why["factorize{lossless=true}"]
    assert "shrink-kernels{energy=0.0}" in why["shrink-kernels{energy=0.0}"]
    # every group frozen, with the reasons
    every = gp.run(g, "prune-channels{ratio=0.5,ignore=stem;stage1;stage2;dw;fc1;fc2;branch_a;branch_b}").results[0]
    assert not every.modified and every.no_change.startswith("every group is frozen") and "is ignored" in every.no_change
    code, stdout, _ = cli(capsys, "optimize", small_onnx, "-o", str(tmp_path / "o.onnx"), "--lossless", "--no-progress")
    assert code == 0 and "prune-channels: no change: no prunable channel is zero" in stdout


def test_constant_channels_from_a_folded_batchnorm_are_explained(tmp_path) -> None:
    """Zeroed conv filters before a batchnorm that the exporter folds are not zero
    channels (the folded bias is beta - mean*gamma/sqrt(var)): lossless cannot remove
    them, and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[0].weight[::2] = 0
        model[0].bias.zero_()
    path = str(tmp_path / "bnfold.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17)
    r = gp.run(gp.load_onnx(path), "prune-channels{lossless=true}").results[0]
    assert not r.modified and "4 channels have an all-zero filter but a nonzero bias" in r.no_change


# -------------------------------------------------------------- passes NAME
def test_passes_lists_whole_first_paragraphs(capsys) -> None:
    code, stdout, _ = cli(capsys, "passes")
    assert code == 0
    get_pass("prune-channels")
    for name, cls in PASSES.items():
        first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        assert first in stdout, name


@pytest.mark.parametrize("name", ["prune-channels", "factorize", "shrink-kernels", "group-convs"])
def test_passes_name_documents_every_option(name: str, capsys) -> None:
    import dataclasses

    cls = get_pass(name)
    docs = option_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}, "every option needs a line in `Options:`"
    assert all(len(text) > 10 for text in docs.values())
    code, stdout, _ = cli(capsys, "passes", name)
    assert code == 0
    import sys

    assert sys.modules[cls.__module__].__doc__.strip().splitlines()[0] in stdout  # the full documentation
    for f in dataclasses.fields(cls):
        assert f"  {f.name}: " in stdout
    assert "lossless: bool = false" in stdout


def test_passes_unknown_name_exits_2(capsys) -> None:
    code, _, err = cli(capsys, "passes", "prune-everything")
    assert code == 2 and "unknown pass" in err


# ---------------------------------------------------------------- global flags
@pytest.mark.parametrize("argv", [["-v", "passes"], ["passes", "-v"], ["-q", "passes"], ["passes", "-q"]])
def test_global_flags_before_or_after_the_subcommand(argv: list[str], capsys) -> None:
    import argparse
    from graphprune.cli import _log_level, build_parser

    args = build_parser().parse_args(argv)
    assert _log_level(args) == (20 if "-v" in argv else 40)
    assert isinstance(args, argparse.Namespace)


def test_verbose_after_the_subcommand_logs(small_onnx: str, tmp_path) -> None:
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "graphprune")
    proc = subprocess.run([exe, "optimize", small_onnx, "-o", str(tmp_path / "v.onnx"), "--lossless", "-v"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "prune-channels{lossless=true}: " in proc.stderr  # the pass manager's info line


# ---------------------------------------------------------- to_onnx after tuning
def test_to_onnx_after_fine_tuning_to_module_is_refused(tmp_path) -> None:
    x = sample_input()
    r = gp.run(gp.trace(sample_net(), x), "prune-channels{ratio=0.5}")
    module = r.graph.to_module()
    r.graph.to_onnx(str(tmp_path / "before.onnx"))  # untouched module: fine
    with torch.no_grad():
        next(module.parameters()).mul_(2.0)  # an optimizer step, in place
    with pytest.raises(gp.GraphError, match=r"changed since .*gp\.trace\(tuned, example_input\)\.to_onnx"):
        r.graph.save_onnx(str(tmp_path / "after.onnx"))
    assert not os.path.exists(tmp_path / "after.onnx")
    gp.trace(module.eval(), x).to_onnx(str(tmp_path / "tuned.onnx"))  # the way out: the tuned weights
    onnx.checker.check_model(onnx.load(str(tmp_path / "tuned.onnx")))


# ------------------------------------------------------- dynamo exporter's view
def test_reshape_segments_take_trailing_unit_axes() -> None:
    from graphprune.rules import _reshape_segments

    assert _reshape_segments((1, 512, 1, 1), (1, 512)) == [((0, 0), (0, 0)), ((1, 3), (1, 1))]
    assert _reshape_segments((1, 512), (1, 512, 1, 1)) == [((0, 0), (0, 0)), ((1, 1), (1, 3))]
    assert _reshape_segments((2, 6, 1), (2, 3, 4)) is None


def test_dynamo_and_torchscript_exports_prune_the_same(tmp_path) -> None:
    """resnet18 exported by both exporters: the dynamo one ends with
    ReduceMean(keepdims) -> Reshape(1, 512) (a `view`), the TorchScript one with Flatten;
    both prune the same channels, to the same MACs."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    paths = {}
    for dynamo in (False, True):
        paths[dynamo] = str(tmp_path / f"r18-{dynamo}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {} if dynamo else {"opset_version": 17}
            torch.onnx.export(model, (x,), paths[dynamo], dynamo=dynamo, input_names=["input"], **kwargs)
    assert any(n.op_type == "Reshape" for n in onnx.load(paths[True]).graph.node)
    macs, kept = {}, {}
    for dynamo, path in paths.items():
        graph = gp.load_onnx(path)
        r = gp.run(graph, "prune-channels{ratio=0.3}").results[0]
        macs[dynamo] = gp.graph_cost(r.graph).macs / gp.graph_cost(graph).macs
        kept[dynamo] = sorted(rec["kept_classes"] for rec in r.records)
    assert macs[True] == pytest.approx(macs[False], rel=1e-9) and kept[True] == kept[False]
    assert macs[True] < 0.55
