"""Smaller check probes (graphprune.probe_size): the factor keeps a full window at every
conv, a wrong weight under any tap is still caught at the smaller size, and graphs that
fix a size are checked at the captured size."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.probe_size import reduced_samples, shrink_factor, taps_reach_data, violated_window, window_values
from graphprune.samples.models import randomize_
from graphprune.verify import check_exact


class Strided(nn.Module):
    """24x24 -> conv3x3 -> stride 2 (12x12) -> stride 2 (6x6) -> 3x3 conv -> pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c3(torch.relu(self.c2(y))))
        y = torch.relu(self.c4(y))
        return self.fc(y.mean((2, 3)))


class FixedSize(nn.Module):
    """A flatten into a linear layer: runs at the captured size only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).flatten(1))


def _graph(model: nn.Module, size: int) -> gp.Graph:
    torch.manual_seed(0)
    return gp.trace(randomize_(model).eval(), torch.randn(2, 3, size, size), capture="fx")


def test_factor_keeps_every_tap_on_data_at_every_conv() -> None:
    # inputs of the 3x3 convs at 24: 24, 24 (stride 2), 12 (stride 2), 6.  A stride-2 3x3
    # conv with pad 1 needs 3 pixels (at 2 its first tap reads only padding), a stride-1 one
    # needs 2: ceil(12/5) = 3 and ceil(6/5) = 2 allow 5; at 6, ceil(12/6) = 2 does not.
    assert shrink_factor(_graph(Strided(), 24)) == 5
    assert shrink_factor(_graph(Strided(), 48)) == 10  # ceil(24/10) = 3, ceil(12/10) = 2
    assert shrink_factor(_graph(Strided(), 8)) == 1.75  # c3 sees ceil(4/1.75) = 3, c4 ceil(2/1.75) = 2
    assert shrink_factor(_graph(Strided(), 4)) == 1.75  # c3 sees 2, c4 1: the same taps at 3 px
    assert shrink_factor(_graph(Strided(), 3)) == 1  # no factor crops a pixel
    graph = _graph(Strided(), 24)
    small = reduced_samples(graph, [graph.random_inputs(0)])
    assert small is not None and tuple(small[0][0].shape) == (2, 3, 5, 5)  # batch and channels kept


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_tap_condition_matches_what_a_conv_reads(stride: int, dilation: int) -> None:
    """taps_reach_data against torch: a one-hot kernel at tap j changes the output of an
    all-ones input exactly when tap j reads a pixel somewhere."""
    checked = 0
    for size in range(1, 7):
        for kernel in range(1, 5):
            for pad in range(0, 3):
                x = torch.ones(1, 1, size)
                reach = []
                for j in range(kernel):
                    w = torch.zeros(1, 1, kernel)
                    w[0, 0, j] = 1.0
                    try:
                        y = torch.nn.functional.conv1d(x, w, stride=stride, padding=pad, dilation=dilation)
                    except RuntimeError:  # output would be empty
                        break
                    reach.append(bool(y.abs().sum() > 0))
                else:
                    out = y.shape[-1]
                    assert taps_reach_data(size, out, kernel, stride, dilation, pad) == all(reach), (size, kernel, pad)
                    checked += 1
    assert checked > 40


class Unpadded(nn.Module):
    """A 7x7 stride-2 conv without padding shrinks more than ceil(size / 2): the estimate
    is optimistic, and the recorded sizes must overrule it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 7, stride=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_recorded_sizes_overrule_an_optimistic_estimate() -> None:
    graph = _graph(Unpadded(), 40)  # c1: 40 -> 17; c2 sees 17
    f = shrink_factor(graph)
    assert f == 6  # estimated: c1 sees ceil(40/6) = 7 >= 7, c2 sees ceil(17/6) = 3
    # but at 7 pixels c1 gives 1 pixel, where c2's outer taps read only padding
    shapes = graph.frontend.run_with_shapes(reduced_samples(graph, [graph.random_inputs(0)])[0],
                                           window_values(graph))[1]
    assert violated_window(graph, lambda v: shapes.get(v)).label == "c2"
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    with recorded_runs(graph) as seen:
        assert check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed
    # 1/6 (7 px) is refused on its recorded sizes; bisection over 5, 4, 3.5, 3, 2.5, ...:
    # 1/2.5 (16 px) passes, 1/4 (10 px: c1 gives 2) passes, 1/5 (8 px) is refused; the
    # check runs at 10 px
    assert [s[2] for s in seen[:4]] == [7, 16, 10, 8] and {s[2] for s in seen[4:]} == {10}, seen
    _corrupt_outer_tap(result, "c2")
    assert not check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed


@contextlib.contextmanager
def recorded_runs(graph: gp.Graph) -> Iterator[list[tuple[int, ...]]]:
    """The input shape of every run of ``graph``'s frontend class (both graphs) inside the block."""
    seen: list[tuple[int, ...]] = []
    cls = graph.frontend.__class__
    run, record = cls.run, cls.run_with_shapes

    def recording(self, inputs):  # type: ignore[no-untyped-def]
        seen.append(tuple(inputs[0].shape))
        return run(self, inputs)

    def recording_shapes(self, inputs, values):  # type: ignore[no-untyped-def]
        seen.append(tuple(inputs[0].shape))
        return record(self, inputs, values)

    cls.run, cls.run_with_shapes = recording, recording_shapes
    try:
        yield seen
    finally:
        cls.run, cls.run_with_shapes = run, record


def _corrupt_outer_tap(result: gp.PassResult, layer: str) -> None:
    """Add 1 to the top-left corner tap of every kept filter of ``layer`` in the rewritten
    graph (a tap that only reaches data at output positions away from the top-left border)."""
    g = result.graph
    key = g.find(layer).params["weight"]
    w = g.param(key).copy()
    w[:, :, 0, 0] += 1.0
    g.set_param(key, w)


def test_wrong_corner_tap_of_the_deepest_conv_is_caught_at_the_smaller_size() -> None:
    graph = _graph(Strided(), 24)
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    assert result.modified
    ok = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert ok.passed and ok.error <= 1e-5
    _corrupt_outer_tap(result, "c4")
    bad = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert not bad.passed and bad.error > 1e-3


def test_graph_that_fixes_its_size_is_checked_at_the_captured_size() -> None:
    graph = _graph(FixedSize(), 16)
    assert reduced_samples(graph, [graph.random_inputs(0)]) is not None  # the crop is offered...
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    check = check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True)
    assert check.passed  # ...fails to run, and the check falls back to 16x16
    _corrupt_outer_tap(result, "c1")
    assert not check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed


def test_export_graphs_are_not_shrunk() -> None:
    torch.manual_seed(0)
    graph = gp.trace(randomize_(Strided()).eval(), torch.randn(2, 3, 24, 24), capture="export")
    assert reduced_samples(graph, [graph.random_inputs(0)]) is None


def test_pipeline_verifies_on_small_probes_by_default() -> None:
    graph = _graph(Strided(), 24)
    with recorded_runs(graph) as seen:
        gp.run(graph, "prune-channels{ratio=0.5}")
        assert seen and all(s[2:] == (5, 5) for s in seen), seen
        seen.clear()
        gp.run(graph, "prune-channels{ratio=0.5}", small_probes=False, probes=1)
        assert len(seen) == 2 and all(s[2:] == (24, 24) for s in seen), seen


def test_probe_count_is_an_option() -> None:
    graph = _graph(Strided(), 24)

    with pytest.raises(gp.PassOptionError, match="probes must be at least 1"):
        gp.run(graph, "prune-channels{ratio=0.5}", probes=0)
    result = gp.run(graph, "prune-channels{ratio=0.5}", probes=3)
    assert result.checks[0] is not None and result.checks[0].samples == 3 and result.checks[0].passed


class BatchOne(nn.Module):
    """Strided, but its head hard-codes a batch of one (``view(1, 8)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Strided()
        self.body.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).view(1, 8)


def test_probes_run_as_one_batch_unless_the_model_refuses() -> None:
    graph = _graph(Strided(), 24)
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    with recorded_runs(graph) as seen:
        assert check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True, n=3).passed
    assert seen == [(6, 3, 5, 5), (6, 3, 5, 5)]  # 3 probes of batch 2: one reference and one rewritten run

    torch.manual_seed(0)
    graph = gp.trace(randomize_(BatchOne()).eval(), torch.randn(1, 3, 24, 24), capture="fx")
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    with recorded_runs(graph) as seen:
        assert check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True, n=2).passed
    # the batch of 2 is refused, the same size one by one is accepted: 2 reference + 2 rewritten runs
    assert seen[0] == (2, 3, 5, 5) and seen[1:] == [(1, 3, 5, 5)] * 4, seen
    _corrupt_outer_tap(result, "body.c4")
    assert not check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True, n=2).passed


class Functional(nn.Module):
    """A conv called through ``F.conv2d`` and a conv module used twice: no hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(nn.functional.conv2d(x, self.w, padding=1, stride=2))
        return self.shared(torch.relu(self.shared(y))).mean((2, 3))


@pytest.mark.parametrize("model, hooked", [(Strided, True), (Unpadded, True), (Functional, False)])
def test_recorded_sizes_are_the_same_through_hooks_or_the_interpreter(model: type, hooked: bool) -> None:
    from graphprune.frontends.fx import _ShapeRecorder, _shape_hooks

    graph = _graph(model(), 20)
    values = window_values(graph)
    fe = graph.frontend
    assert (_shape_hooks(fe.gm, values) is not None) == hooked
    x = torch.randn(2, 3, 13, 11)
    out, shapes = fe.run_with_shapes([x], values)
    recorder = _ShapeRecorder(fe.gm, values)
    with torch.no_grad():
        want = recorder.run(x)
    assert shapes == recorder.shapes and set(shapes) == values
    assert torch.equal(out[0], want)


class Dilated(nn.Module):
    """An ASPP-like branch: a dilation wider than its 12x12 map, so only the centre tap
    ever reads data; that must not stop the crop, and the centre tap must stay checked."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.aspp = nn.Conv2d(8, 8, 3, padding=13, dilation=13)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        return self.fc(self.c3(torch.relu(self.aspp(y))).mean((2, 3)))


def test_taps_that_never_read_data_do_not_stop_the_crop() -> None:
    graph = _graph(Dilated(), 24)
    assert shrink_factor(graph) == 10  # 3 px: c1 (stride 2) needs 3; the ASPP conv only its centre
    result = gp.get_pass("prune-channels")(ratio=0.5)(graph)
    assert result.modified and check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed
    g = result.graph
    key = g.find("aspp").params["weight"]
    w = g.param(key).copy()
    w[:, :, 1, 1] += 1.0  # the centre tap, the one that reads data
    g.set_param(key, w)
    assert not check_exact(result.graph, result.reference(), rtol=1e-5, shrink=True).passed
