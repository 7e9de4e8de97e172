"""A pass's copy of an fx/export graph borrows the compiled forward of the graph it was
copied from until its own graph changes; the code it runs must always be the code of
its graph (a stale forward would compute the unedited graph)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphprune as gp
from graphprune.samples.models import randomize_, sample_input, sample_net
from helpers import assert_rel_close

CAPTURES = ("fx", "export")


class ChannelView(nn.Module):
    """A size literal (8 channels) in a ``view``: pruning ``c2`` edits a node argument."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.view(y.size(0), 8, -1).mean(-1))


def _code_is_current(graph: gp.Graph) -> None:
    gm = graph.frontend.gm
    assert gm.code == gm.graph.python_code("self").src


def _borrowed(result: gp.Graph, source: gp.Graph) -> bool:
    return type(result.frontend.gm).forward is type(source.frontend.gm).forward


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("pipeline", [
    "prune-channels{ratio=0.5}", "group-convs{groups=2}", "factorize{macs=0.6}", "shrink-kernels{macs=0.8}",
    "prune-channels{ratio=0.3},factorize{energy=0.9}",
])
def test_every_pass_result_runs_the_code_of_its_own_graph(capture: str, pipeline: str) -> None:
    graph = gp.trace(sample_net(), sample_input(), capture=capture)
    before = graph.frontend.gm.code
    out = gp.run(graph, pipeline)
    for r in out.results:
        _code_is_current(r.graph)
    assert graph.frontend.gm.code == before  # the copy's recompile never reached the input's class
    _code_is_current(graph)
    x = sample_input(seed=3)
    assert_rel_close(out.graph.run(x), out.results[-1].reference().run(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_channel_pruning_borrows_the_code_and_a_size_literal_edit_does_not(capture: str) -> None:
    graph = gp.trace(randomize_(sample_net()), sample_input(), capture=capture)
    graph.run(sample_input())  # the input graph has compiled code
    pruned = gp.run(graph, "prune-channels{ratio=0.5}").graph
    if capture == "fx":  # module attributes only: the same code (export edits conv nodes' arguments)
        assert _borrowed(pruned, graph)
    torch.manual_seed(0)
    literal = gp.trace(randomize_(ChannelView()).eval(), torch.randn(2, 3, 8, 8), capture=capture)
    literal.run(torch.randn(2, 3, 8, 8))
    out = gp.run(literal, "prune-channels{ratio=0.5}")
    assert out.graph.param("fc.weight").shape == (5, 4)  # the view's 8 became 4
    assert not _borrowed(out.graph, literal)
    _code_is_current(out.graph)
    x = torch.randn(2, 3, 8, 8)  # export fixes the batch size
    assert_rel_close(out.graph.run(x), out.results[0].reference().run(x))


@pytest.mark.parametrize("capture", CAPTURES)
def test_to_module_is_a_plain_graph_module_with_its_graphs_code(capture: str) -> None:
    import copy
    import pickle

    import torch.fx as fx
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = gp.trace(randomize_(sample_net()), sample_input(), capture=capture)
    result = gp.run(graph, "prune-channels{ratio=0.5}").graph
    module = result.to_module()
    assert isinstance(module, fx.GraphModule) and not isinstance(module, _LazyGraphModule)
    assert type(module).__name__ == type(graph.frontend.gm).__name__
    assert module.code == module.graph.python_code("self").src
    assert type(module).forward is type(result.frontend.gm).forward  # compiled once, by the check
    x = sample_input(seed=5)
    want = result.run(x)
    assert_rel_close(module(x), want[0], rtol=0)
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert_rel_close(other(x), want[0], rtol=0)
    module.graph.erase_node(next(n for n in module.graph.nodes if n.op == "output"))
    module.graph.output(next(n for n in module.graph.nodes if n.op == "placeholder"))
    module.recompile()  # the user's edit of the module reaches neither graph
    assert_rel_close(module(x), x, rtol=0)
    assert_rel_close(result.run(x), want, rtol=0)
    _code_is_current(result)


def test_an_edit_not_yet_committed_is_in_the_emitted_code() -> None:
    literal = gp.trace(ChannelView().eval(), torch.randn(2, 3, 8, 8), capture="fx")
    literal.run(torch.randn(2, 3, 8, 8))
    edited = literal.copy()
    view = next(n for n in edited.nodes if n.kind == "reshape")
    edited.set_attr(view, "shape", {1: 4})
    module = edited.to_module()
    assert module.code == module.graph.python_code("self").src and ", 4, -1)" in module.code
    assert ", 8, -1)" in literal.frontend.gm.code


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_copy_starts_from_the_view_its_frontend_reads(capture: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    for model, x in ((sample_net(), sample_input()), (ChannelView(), torch.randn(2, 3, 8, 8)),
                     (torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64))):
        graph = gp.trace(model.eval(), x, capture=capture)
        copy = graph.copy()
        assert copy.nodes is graph.nodes  # shared, not read again
        nodes, values, inputs, outputs = copy.frontend.view()
        assert [(n.name, n.kind, n.inputs, n.outputs, n.params, n.attrs) for n in nodes] == \
            [(n.name, n.kind, n.inputs, n.outputs, n.params, n.attrs) for n in copy.nodes]
        assert {k: v.shape for k, v in values.items()} == {k: v.shape for k, v in copy.values.items()}
        assert (inputs, outputs) == (copy.inputs, copy.outputs)
