"""Pass infrastructure: registry, pipeline syntax, pass manager verification."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphprune as gp
from graphprune.passes_base import PASSES, PassManager, _load_builtin_passes
from graphprune.samples.models import sample_input, sample_net


def test_registry_keys_equal_pass_names() -> None:
    _load_builtin_passes()
    assert "prune-channels" in PASSES
    for key, cls in PASSES.items():
        assert key == cls.name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_every_pass_has_lossless_option() -> None:
    _load_builtin_passes()
    for cls in PASSES.values():
        assert "lossless" in {f.name for f in dataclasses.fields(cls)}, cls.name


def test_pipeline_round_trip() -> None:
    passes = gp.parse_pipeline("prune-channels{ratio=0.25, round_to=8, ignore=fc;layer1.0.conv1}, prune-channels{lossless=true}")
    assert [p.name for p in passes] == ["prune-channels", "prune-channels"]
    first = passes[0]
    assert first.ratio == 0.25 and first.round_to == 8 and first.ignore == ("fc", "layer1.0.conv1")
    assert gp.parse_pipeline(first.spec())[0] == first
    assert passes[1].lossless is True


@pytest.mark.parametrize("text, message", [
    ("prune-channels{ratio=0.3", "unbalanced"),
    ("prune-channels{ratio}", "key=value"),
    ("", "empty pipeline"),
])
def test_pipeline_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(gp.PassOptionError, match=message):
        gp.parse_pipeline(text)


def test_run_accepts_string_list_and_pass() -> None:
    g = gp.trace(sample_net(), sample_input())
    p = gp.get_pass("prune-channels")(ratio=0.25)
    for pipeline in ("prune-channels{ratio=0.25}", [p], p):
        result = gp.run(g, pipeline)
        assert result.modified and len(result.results) == 1
    assert gp.run(g, "prune-channels{ratio=0.25},prune-channels{ratio=0.25}").graph.param("stem.0.weight").shape[0] < 12


def test_manager_lossless_flag_sets_every_pass() -> None:
    manager = PassManager(gp.parse_pipeline("prune-channels{ratio=0.5}"), lossless=True)
    assert manager.passes[0].lossless


def test_manager_catches_an_inexact_rewrite() -> None:
    """A pass whose rewrite does not match its reference must be caught between passes."""
    from graphprune.passes_base import Pass, PassResult

    @dataclasses.dataclass(frozen=True)
    class Broken(Pass):
        name = "broken"
        lossless: bool = False

        def call(self, graph: gp.Graph) -> PassResult:
            work = graph.copy()
            key = "fc2.weight"
            work.set_param(key, work.param(key) * 1.01)
            work.commit()
            return PassResult(work, True, graph)

    g = gp.trace(sample_net(), sample_input())
    with pytest.raises(gp.VerificationError, match="broken: output differs"):
        PassManager([Broken()]).run(g)
