"""The torchvision classification zoo (random weights) as the fx frontend's breadth test.

Every model is traced, pruned with ``prune-channels{ratio=0.3}``, checked against its
projected reference, and must lose MACs.  A few small models run by default; the whole
zoo runs under the ``zoo`` marker (``make test-zoo``).
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import graphprune as gp
from graphprune.samples.models import randomize_

ALL = torchvision.models.list_models(module=torchvision.models)
DEFAULT = ["resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "shufflenet_v2_x0_5",
           "regnet_x_400mf", "squeezenet1_1", "googlenet", "mnasnet0_5", "resnext50_32x4d"]
# input sizes: models with fixed positional embeddings or large minimum sizes
SIZES = {"inception_v3": 299, "googlenet": 96}
FIXED_224 = ("vit_", "swin", "maxvit")


def input_size(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return SIZES.get(name, 64)


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return randomize_(torchvision.models.get_model(name, weights=None, **kwargs)).eval()


def check_model(name: str) -> None:
    size = input_size(name)
    graph = gp.trace(build(name), torch.randn(1, 3, size, size))
    result = gp.get_pass("prune-channels")(ratio=0.3)(graph)
    assert result.modified, f"{name}: nothing pruned"
    err = gp.compare(result.graph, result.reference(), n=1)
    assert err <= 1e-5, f"{name}: error {err:.3g} against the projected reference"
    assert gp.graph_cost(result.graph).macs < gp.graph_cost(graph).macs


@pytest.mark.parametrize("name", DEFAULT)
def test_zoo_subset(name: str) -> None:
    check_model(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n for n in ALL if n not in DEFAULT])
def test_zoo_full(name: str) -> None:
    check_model(name)
