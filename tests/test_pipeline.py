"""Pass infrastructure: registry, pipeline syntax, pass manager verification."""
from __future__ import annotations

import dataclasses
import sys
import types
import typing

import pytest
import torch

import graphprune as gp
from graphprune.passes_base import PASSES, PassManager, _load_builtin_passes
from graphprune.samples.models import sample_input, sample_net


# values to try for string options (a new pass whose string option takes none of these
# fails the round trip below: add one of its values here)
STRING_VALUES = ("global", "l2", "l1", "bn_scale", "spatial", "channel", "macs", "latency", "params")


def _option_values(hint: object, default: object) -> list[object]:
    """Non-default values of an option's annotated type, to build passes with."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if base is bool:
        return [not default]
    if base is int:
        return [v for v in (2, 3, (default or 0) + 1) if v != default]
    if base is float:
        return [v for v in (0.5, 0.25) if v != default]
    if base is str:
        return [v for v in STRING_VALUES if v != default]
    if typing.get_origin(base) is tuple:
        return [("conv", "layer1.0.conv1")]
    raise AssertionError(f"option type {hint} has no pipeline syntax")


def test_every_pass_option_round_trips_through_the_pipeline_syntax() -> None:
    """Each option of each registered pass, set to a non-default value, survives
    ``parse_pipeline(p.spec())``; options that cannot (``compare=False``, e.g. gradient
    tensors) are left out of ``spec`` and of equality."""
    _load_builtin_passes()
    assert {"prune-channels", "group-convs", "shrink-kernels", "factorize"} <= set(PASSES)
    for name, cls in PASSES.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert gp.get_pass(name) is cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.compare:
                continue
            tried = 0
            for value in _option_values(hints[f.name], f.default):
                for base in ({"lossless": True}, {}):
                    if f.name in base:
                        continue
                    try:
                        p = cls(**base, **{f.name: value})
                        p.check_lossless()
                        p.validate()
                    except gp.PassOptionError:
                        continue
                    spec = p.spec()
                    assert f"{f.name}=" in spec, spec
                    (q,) = gp.parse_pipeline(spec)
                    assert q == p and getattr(q, f.name) == value, (spec, q)
                    tried += 1
            assert tried, f"{name}: option `{f.name}` never round-tripped"


def test_every_pass_option_is_documented_and_listed(capsys) -> None:
    from graphprune.cli import _default, main

    _load_builtin_passes()
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    for name, cls in PASSES.items():
        doc = (sys.modules[cls.__module__].__doc__ or "") + (cls.__doc__ or "")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in hints, f"{name}: option `{f.name}` has no type"
            assert f.name in doc, f"{name}: option `{f.name}` is not in the pass's docstrings"
            if f.repr:  # Python-only options (tensors) are described by `passes NAME`, not listed
                assert f"{f.name}={_default(f)}" in listing, f"{name}: `graphprune passes` does not list `{f.name}`"


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


def test_modified_is_false_when_no_pass_changes_anything() -> None:
    g = gp.trace(sample_net(), sample_input())
    for pipeline in ("prune-channels{ratio=0}", "prune-channels{lossless=true},factorize{lossless=true}"):
        result = gp.run(g, pipeline)
        assert not result.modified and not any(r.modified for r in result.results), pipeline
    mixed = gp.run(g, "prune-channels{ratio=0},prune-channels{ratio=0.25}")
    assert mixed.modified and [r.modified for r in mixed.results] == [False, True]


def test_cyclic_collection_is_paused_during_a_run_and_restored_after() -> None:
    import gc

    from graphprune.samples.models import sample_input, sample_net

    states: list[bool] = []

    class Probe(gp.get_pass("prune-channels")):  # type: ignore[misc,valid-type]
        def call(self, graph, data=None):  # type: ignore[no-untyped-def]
            states.append(gc.isenabled())
            return super().call(graph)

    graph = gp.trace(sample_net(), sample_input())
    assert gc.isenabled()
    gp.run(graph, [Probe(ratio=0.5)])
    assert states == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller's own setting is left alone
        gp.run(graph, [Probe(ratio=0.5)])
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(gp.PassOptionError):  # restored on errors too
        gp.run(graph, "prune-channels{ratio=2}")
    assert gc.isenabled()
