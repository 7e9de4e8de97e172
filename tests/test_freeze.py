"""Prune what can be proven: a failed exactness check freezes the decision units
responsible (found by bisection) and keeps the rest exact."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

import graphprune as gp
from graphprune.coupling import CouplingAnalysis
from graphprune.freeze import freeze_inexact
from graphprune.passes import PruneChannels
from graphprune.samples.models import sample_input, sample_net
from helpers import assert_rel_close


@pytest.fixture(scope="module")
def sample_graph() -> gp.Graph:
    return gp.trace(sample_net(), sample_input())


@dataclass(frozen=True)
class InexactPrune(PruneChannels):
    """Test double: prune-channels whose rewrite of the group holding ``bad_layer``'s
    output channels scales that layer's weight by ``1 + noise`` (a wrong rewrite)."""

    uses_data: ClassVar[bool] = True
    bad_layers: tuple[str, ...] = ("stage1.0.conv1",)
    noise: float = 0.05

    def _rewrite(self, graph: gp.Graph, analysis: CouplingAnalysis, keep: dict[int, np.ndarray]) -> gp.PassResult:
        return _perturbed(super()._rewrite(graph, analysis, keep), graph, analysis, keep, self.bad_layers, self.noise)


def _perturbed(result: gp.PassResult, graph: gp.Graph, analysis: CouplingAnalysis, keep: dict[int, np.ndarray],
               bad_layers: tuple[str, ...], noise: float) -> gp.PassResult:
    """``result`` with each bad layer's weight scaled by ``1 + noise`` when its output
    group is among the rewritten ones."""
    for label in bad_layers:
        group = analysis.group_of(gp.Port(graph.find(label).outputs[0], 1))
        if group is not None and group.id in keep:
            key = result.graph.find(label).params["weight"]
            result.graph.set_param(key, result.graph.param(key) * (1 + noise))
    return result


def _bad_group(graph: gp.Graph, label: str) -> str:
    group = gp.analyse(graph).group_of(gp.Port(graph.find(label).outputs[0], 1))
    return f"group {group.id}"


def test_inexact_group_is_found_frozen_and_the_rest_pruned(sample_graph: gp.Graph) -> None:
    p = InexactPrune(ratio=0.5)
    plain = PruneChannels(ratio=0.5)(sample_graph)
    result = gp.run(sample_graph, [p])
    (r,) = result.results
    bad = _bad_group(sample_graph, "stage1.0.conv1")
    assert r.frozen == {bad: r.frozen[bad]} and r.frozen[bad].startswith("inexact here: max error ")
    assert 1e-5 < float(r.frozen[bad].rsplit(" ", 1)[1]) < 0.05  # the planted error, through the layers after it
    assert result.frozen == {"prune-channels": r.frozen}
    # every other group keeps the decision of the plain pass; the bad one keeps all channels
    decided = {rec["group"] for rec in plain.records}
    assert {f"group {rec['group']}" for rec in r.records} == {f"group {g}" for g in decided} - {bad}
    assert r.modified and gp.graph_cost(r.graph).macs < gp.graph_cost(sample_graph).macs
    assert gp.graph_cost(r.graph).macs > gp.graph_cost(plain.graph).macs
    assert r.graph.param(r.graph.find("stage1.0.conv1").params["weight"]).shape[0] == 16
    assert_rel_close(r.graph.run(*sample_graph.random_inputs(3)), r.reference().run(*sample_graph.random_inputs(3)))
    assert result.checks[0] is not None and result.checks[0].passed


def test_two_bad_groups_both_frozen(sample_graph: gp.Graph) -> None:
    p = InexactPrune(ratio=0.5, bad_layers=("stage1.0.conv1", "stage2.0.conv1"))
    (r,) = gp.run(sample_graph, [p]).results
    assert set(r.frozen) == {_bad_group(sample_graph, "stage1.0.conv1"), _bad_group(sample_graph, "stage2.0.conv1")}
    assert r.modified


def test_freeze_off_raises(sample_graph: gp.Graph) -> None:
    with pytest.raises(gp.VerificationError, match="differs from the projected reference"):
        gp.run(sample_graph, [InexactPrune(ratio=0.5)], freeze=False)


def test_small_errors_inside_the_tolerance_freeze_nothing(sample_graph: gp.Graph) -> None:
    (r,) = gp.run(sample_graph, [InexactPrune(ratio=0.5, noise=1e-7)]).results
    assert r.frozen == {} and r.modified


def test_when_every_unit_is_bad_nothing_is_applied(sample_graph: gp.Graph) -> None:
    plain = PruneChannels(ratio=0.5)(sample_graph)
    every = tuple(sorted({next(m.node.label for ms in g.members.values() for m in ms if m.coupling.role == "produce")
                          for g in gp.analyse(sample_graph).groups if g.id in {rec["group"] for rec in plain.records}}))
    result = gp.run(sample_graph, [InexactPrune(ratio=0.5, bad_layers=every)])
    (r,) = result.results
    assert not r.modified and len(r.frozen) == len(plain.records) and "inexact" in r.no_change
    assert result.checks == [None]


def test_layer_units_freeze_through_ignore(sample_graph: gp.Graph) -> None:
    """A pass without ``redo`` (units = the layers of its records) is re-run with the
    frozen layers ignored."""
    (p,) = gp.parse_pipeline("factorize{energy=0.9}")
    result = p(sample_graph)
    layers = [rec["layer"] for rec in result.records]
    assert len(layers) >= 2
    bad = layers[0]

    def check(r: gp.PassResult) -> gp.ExactnessCheck:
        hit = any(rec["layer"] == bad for rec in r.records)
        return gp.ExactnessCheck(1e-3 if hit else 0.0, 1e-5, None, 1, measured=False)

    kept, c = freeze_inexact(p, sample_graph, result, check)
    assert list(kept.frozen) == [bad] and c is not None and c.passed
    assert [rec["layer"] for rec in kept.records] == layers[1:]


def test_short_reprs(sample_graph: gp.Graph) -> None:
    result = gp.run(sample_graph, "prune-channels{ratio=0.5}")
    for obj in (result, result.results[0], result.graph):
        assert len(repr(obj)) < 300, repr(obj)
    assert "prune-channels" in repr(result) and "modified" in repr(result)
    none = gp.run(sample_graph, "prune-channels{ratio=0}")
    assert "no change" in repr(none.results[0])


def test_cli_freezes_reports_and_writes_an_exact_file(tmp_path, capsys, monkeypatch) -> None:
    """On an ONNX file through `graphprune optimize`: the inexact group is printed and
    listed in the report, the rest is pruned, and the written file passes the check."""
    import json
    import warnings

    import torch

    from graphprune.cli import main

    path = str(tmp_path / "sample.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(sample_net(), (sample_input(),), path, dynamo=False, opset_version=17, input_names=["input"])
    bad_layer = "/stage1/stage1.0/conv1/Conv"
    original = PruneChannels._rewrite

    def inexact(self, graph, analysis, keep):  # every prune-channels rewrite (and redo) now has the bug
        return _perturbed(original(self, graph, analysis, keep), graph, analysis, keep, (bad_layer,), 0.05)

    monkeypatch.setattr(PruneChannels, "_rewrite", inexact)
    out, report = str(tmp_path / "slim.onnx"), str(tmp_path / "report.json")
    code = main(["optimize", path, "-o", out, "-p", "prune-channels{ratio=0.5}", "--report", report, "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    bad = _bad_group(gp.load_onnx(path), bad_layer)
    assert f"froze {bad} [" in stdout and "inexact here: max error" in stdout
    data = json.load(open(report))
    assert list(data["passes"][0]["frozen"]) == [bad]
    assert data["check"]["max_difference"] <= data["check"]["rtol"] and data["totals"]["macs_ratio"] < 0.9

