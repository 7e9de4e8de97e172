"""The seed runner (benchmarks/seeds): dataset readers and smoke runs of curl and epi."""
from __future__ import annotations

import gzip
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.seeds import common, run  # noqa: E402


def _write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_and_npz(tmp_path) -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "x-idx3-ubyte.gz")
    _write_idx(path, imgs)
    assert np.array_equal(common.read_idx(path), imgs)
    bad = str(tmp_path / "bad.gz")
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad magic"):
        common.read_idx(bad)
    short = str(tmp_path / "short.gz")
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="expected 5 values"):
        common.read_idx(short)
    npz = str(tmp_path / "d.npz")
    np.savez(npz, x_train=imgs, y_train=np.array([0, 1, 2, 1, 0]), x_test=imgs[:2], y_test=np.array([2, 0]))
    data = common.load_dataset(f"npz:{npz}")
    assert data.x_train.shape == (5, 1, 4, 3) and data.x_train.dtype == torch.float32
    assert torch.allclose(data.x_train[:, 0], torch.from_numpy(imgs).float() / 255)
    assert data.n_classes == 3
    sub = common.subset_per_class(data, 1, seed=0)
    assert sorted(sub.y_train.tolist()) == [0, 1, 2]


def test_runner_checks_the_method_contract(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("benchmarks.seeds.methods.fake_method")
    fake.BASELINE_NAME, fake.DEFAULTS, fake.TINY = "b", {"a": 1}, {"a": 2}
    fake.run_seed = lambda seed, data, s: {"ours": 0.5 + seed, "baseline": 0.25 * s["a"], "extra": 1.0}
    monkeypatch.setitem(sys.modules, "benchmarks.seeds.methods.fake_method", fake)
    out = str(tmp_path / "f.json")
    assert run.main(["--method", "fake_method", "--dataset", "digits", "--seeds", "2", "--tiny", "--json", out]) == 0
    res = json.load(open(out))
    assert res["ours"] == [0.5, 1.5] and res["baseline"] == [0.5, 0.5] and res["extra"] == [1.0, 1.0]
    assert res["settings"] == {"a": 2} and res["baseline_name"] == "b" and res["metric"] == "test_accuracy"
    second = str(tmp_path / "g.json")
    run.main(["--method", "fake_method", "--dataset", "digits", "--seeds", "1", "--first-seed", "5", "--tiny", "--json", second])
    merged = str(tmp_path / "m.json")
    assert run.main(["--merge", out, second, "--json", merged]) == 0
    res = json.load(open(merged))
    assert res["seeds"] == [0, 1, 5] and res["ours"] == [0.5, 1.5, 5.5] and res["extra"] == [1.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="already present"):
        run.main(["--merge", out, out, "--json", merged])
    fake.run_seed = lambda seed, data, s: {"ours": 1.0}
    with pytest.raises(SystemExit, match="must return `ours` and `baseline`"):
        run.main(["--method", "fake_method", "--dataset", "digits", "--seeds", "1", "--json", out])


@pytest.mark.parametrize("method", ["curl", "epi"])
def test_smoke_run_on_digits(method: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / f"{method}.json")
    assert run.main(["--method", method, "--dataset", "digits", "--tiny", "--seeds", "1", "--json", out]) == 0
    res = json.load(open(out))
    assert res["method"] == method and len(res["ours"]) == len(res["baseline"]) == 1
    assert all(0.0 <= v <= 1.0 for v in res["ours"] + res["baseline"])
    extra = {"curl": ["kl_ft", "kl_distill", "l1_distill", "l1_lr", "macs_ratio"],
             "epi": ["prune_at_0", "ours_tmacs", "baseline_tmacs", "ours_epoch", "dense"]}[method]
    assert all(k in res and len(res[k]) == 1 for k in extra)
    assert res["macs_ratio"][0] <= {"curl": 0.4, "epi": 0.35}[method] + 1e-9
    assert "mean" in capsys.readouterr().out
