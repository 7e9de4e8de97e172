"""Smoke test of the seed runner for the part-2 methods (TRP, SMOF, group convs) on
scikit-learn's digits with the methods' TINY settings and one seed."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("sklearn")

EXTRA = {
    "trp": {"dense", "macs_ratio", "ours_ft", "baseline_ft"},
    "smof": {"ours_ms", "baseline_ms", "dense_ms", "ours_model_ms", "baseline_model_ms"},
    "gconv": {"ours_noft", "baseline_noft", "search", "search_noft", "search_params", "uniform_params"},
}


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_runner_tiny(method: str, tmp_path) -> None:
    from benchmarks.seeds.run import main

    out = tmp_path / f"{method}.json"
    assert main(["--method", method, "--dataset", "digits", "--tiny", "--seeds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == method and res["seeds"] == [0]
    missing = ({"ours", "baseline"} | EXTRA[method]) - set(res)
    assert not missing, missing
    for arm in ("ours", "baseline"):
        assert len(res[arm]) == 1 and 0.0 <= res[arm][0] <= 1.0
    if method == "trp":
        assert 0.0 < res["macs_ratio"][0] < 1.0
    if method == "gconv":
        assert res["search_params"][0] <= res["uniform_params"][0] + 1e-9
