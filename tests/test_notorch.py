"""The ONNX path without torch, and a fast command line.

Each test runs Python in a subprocess whose import system refuses ``torch``,
``torchvision`` and ``onnxscript`` (a meta-path finder that raises
``ModuleNotFoundError``, as on a machine where they are not installed), or that simply
records which modules got imported.  The model is built with ``onnx.helper`` (no torch
anywhere): a conv with planted zero filters, a ReLU, a second conv.

``make test-notorch`` runs the tests marked ``notorch`` in a real venv without torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.notorch

BLOCKED = ("torch", "torchvision", "onnxscript")

# Refuse torch & co., run the code, and report at exit which of them got imported.
PRELUDE = textwrap.dedent(f"""
    import atexit, importlib.abc, json, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named '{{name}}' (blocked by the test)", name=name)
            return None

    if {{block}}:
        sys.meta_path.insert(0, _NoTorch())

    def _report():
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnxscript", "onnxruntime"))
        sys.stderr.write("IMPORTED " + json.dumps(heavy) + "\\n")
    atexit.register(_report)
""")

ZERO_FILTERS = [1, 4, 5]


def planted_model(path: str) -> str:
    """x (1, 3, 8, 8) -> Conv 3->8 (filters 1, 4, 5 zero, their bias zero) -> Relu ->
    Conv 8->4 -> y.  The zero filters are provably removable: lossless pruning keeps 5."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w1[ZERO_FILTERS] = 0.0
    b1[ZERO_FILTERS] = 0.0
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="/c1/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="/relu/Relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="/c2/Conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(
        nodes, "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def python(code: str, block: bool = True, cwd: str | None = None) -> tuple[int, str, str, list[str]]:
    """Run ``code`` after the prelude; (exit code, stdout, stderr, heavy modules imported).
    It runs outside the source tree, so graphprune comes from the installed package."""
    prog = PRELUDE.replace("{block}", str(block)) + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=cwd or tempfile.gettempdir(),
                          env=env, timeout=600)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("IMPORTED ")]
    assert marker, f"no import report; stderr:\n{proc.stderr[-3000:]}"
    return proc.returncode, proc.stdout, proc.stderr, json.loads(marker[-1][len("IMPORTED "):])


def cli_code(*argv: str) -> str:
    return f"""
        import sys
        from graphprune.cli import main
        code = main({list(argv)!r})
        sys.stdout.flush()
        sys.exit(code)
    """


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def test_blocker_really_blocks_torch() -> None:
    """The environment the other tests rely on: ``import torch`` fails in it."""
    code, out, _, _ = python("""
        try:
            import torch
        except ImportError as exc:
            print("blocked:", exc.name)
    """)
    assert code == 0 and "blocked: torch" in out


def test_optimize_and_inspect_without_torch(tmp_path) -> None:
    src = planted_model(str(tmp_path / "planted.onnx"))
    out, report = str(tmp_path / "out.onnx"), str(tmp_path / "report.json")
    code, stdout, stderr, heavy = python(cli_code("optimize", src, "-o", out, "--lossless", "--report", report,
                                                  "--no-progress"))
    assert code == 0, stderr[-3000:]
    assert not [m for m in heavy if m.split(".")[0] in BLOCKED], heavy
    # decided: exactly the planted filters went, nothing else
    pruned = onnx.load(out)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    w1 = next(w for w in weights.values() if w.shape[1:] == (3, 3, 3))
    w2 = next(w for w in weights.values() if w.shape[0] == 4)
    assert w1.shape[0] == 8 - len(ZERO_FILTERS) and w2.shape[1] == 8 - len(ZERO_FILTERS)
    assert json.load(open(report))["check"]["max_difference"] <= 1e-5
    # exact: the written file computes what the input computes (onnxruntime, fresh inputs)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel(ort_run(out, x), ort_run(src, x).astype(np.float64)) <= 1e-6
    code, stdout, stderr, heavy = python(cli_code("inspect", out))
    assert code == 0, stderr[-3000:]
    assert "/c1/Conv" in stdout
    assert not [m for m in heavy if m.split(".")[0] in BLOCKED], heavy


def test_python_api_on_onnx_without_torch(tmp_path) -> None:
    """``import graphprune; gp.run(...)`` on an ONNX graph, and the torch-only names
    failing with an error that says how to install torch."""
    src = planted_model(str(tmp_path / "planted.onnx"))
    code, stdout, stderr, heavy = python(f"""
        import numpy as np
        import graphprune as gp
        g = gp.load_onnx({src!r})
        result = gp.run(g, "prune-channels{{ratio=0.5}},factorize{{rank=2}}")
        pruned = result.results[0].graph
        w = pruned.param(pruned.find("/c1/Conv").params["weight"])
        print("kept", w.shape[0], type(w).__name__)
        x = g.random_inputs(3)
        print("outputs", type(result.graph.run(*x)[0]).__name__)
        print("error", max(gp.compare(r.graph, r.reference()) for r in result.results))
        print("factorized", [rec["layer"] for rec in result.results[1].records])
        print("macs", gp.graph_cost(result.graph).macs < gp.graph_cost(g).macs)
        try:
            gp.trace
        except ImportError as exc:
            print("trace:", exc)
    """)
    assert code == 0, stderr[-3000:]
    assert not [m for m in heavy if m.split(".")[0] in BLOCKED], heavy
    lines = dict(line.split(" ", 1) for line in stdout.splitlines())
    assert lines["kept"] == "4 ndarray"  # ratio 0.5 of 8 filters, weights are numpy arrays
    assert lines["outputs"] == "ndarray"
    assert float(lines["error"]) <= 1e-5
    assert "/c2/Conv" in lines["factorized"]
    assert lines["macs"] == "True"
    assert "pip install graphprune[torch]" in lines["trace:"]


def test_data_criteria_and_demo_say_they_need_torch(tmp_path) -> None:
    """Without torch, a data-driven criterion and the demo end with exit 2 and one line
    saying how to install torch; no output file is written."""
    src = planted_model(str(tmp_path / "planted.onnx"))
    calib = str(tmp_path / "calib.npz")
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 1, 3, 8, 8)).astype(np.float32))
    out = str(tmp_path / "out.onnx")
    code, _, stderr, heavy = python(cli_code("optimize", src, "-o", out, "-p", "prune-channels{ratio=0.5,criterion=kl}",
                                             "--calibration", calib, "--no-progress"))
    assert code == 2, stderr[-3000:]
    assert "criteria (kl, taylor) need PyTorch" in stderr and "pip install graphprune[torch]" in stderr
    assert "Traceback" not in stderr and not os.path.exists(out)
    code, _, stderr, _ = python(cli_code("demo", "--out", str(tmp_path / "demo")))
    assert code == 2 and "pip install graphprune[torch]" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("argv", [["--help"], ["passes"], ["optimize"], ["optimize", "--bogus", "x.onnx"]])
def test_fast_start_imports_neither_torch_nor_onnxruntime(argv: list[str]) -> None:
    """``--help``, ``passes`` and argument errors load neither torch nor onnxruntime
    (torch is not blocked here: it must simply not be imported)."""
    code, stdout, stderr, heavy = python(cli_code(*argv), block=False)
    assert heavy == [], heavy
    if argv == ["passes"]:
        assert code == 0 and "prune-channels" in stdout and "factorize" in stdout
    elif argv == ["--help"]:
        assert code == 0 and "optimize" in stdout
    else:
        assert code == 2 and "error" in stderr


# ------------------------------------------------------------------ static check
TORCH_MODULES = {
    "graphprune.frontends.fx", "graphprune.frontends.fx_build", "graphprune.frontends.fx_shapes", "graphprune.frontends.export",
    "graphprune.frontends.aten", "graphprune.frontends.capture", "graphprune.apply", "graphprune.saving",
}
"""The modules allowed to import torch at module level, besides ``graphprune.training.*``
(training helpers) and ``graphprune.samples.*`` (the sample nn.Modules)."""


def module_level_imports(tree: "ast.Module") -> set[str]:
    """Top-level package names imported by statements that run on import: module level,
    inside ``try``/``if`` blocks, but not inside functions, classes or ``if TYPE_CHECKING``."""
    import ast

    found: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, ast.Import):
                found.update(a.name.split(".")[0] for a in s.names)
            elif isinstance(s, ast.ImportFrom) and not s.level and s.module:
                found.add(s.module.split(".")[0])
            elif isinstance(s, ast.If):
                if not (isinstance(s.test, ast.Name) and s.test.id == "TYPE_CHECKING"):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body)
                for h in s.handlers:
                    visit(h.body)
                visit(s.orelse)
                visit(s.finalbody)

    visit(tree.body)
    return found


def test_torch_is_imported_at_module_level_only_where_allowed() -> None:
    import ast
    from pathlib import Path

    from test_layout import modules

    offenders = []
    for name, (path, _) in modules().items():
        if name in TORCH_MODULES or name.startswith(("graphprune.training", "graphprune.samples")):
            continue
        imported = module_level_imports(ast.parse(Path(path).read_text()))
        if imported & set(BLOCKED):
            offenders.append(f"{name}: {sorted(imported & set(BLOCKED))}")
    assert not offenders, "modules importing torch at module level:\n  " + "\n  ".join(offenders)
    assert len(modules()) > 30  # the scan saw the package
