"""A timm sample (one architecture per family, random weights) as the export frontend's
breadth test: captured (export, or fx as the fallback), pruned with
``prune-channels{ratio=0.3}``, exact against the projected reference, fewer MACs.

The sample is one model per timm family (the name up to its first ``_`` or digit, from
``timm.list_models()``): the family's smallest member by parameter count, skipping
families with more than 100M parameters in their smallest member or a default input
above 384 (and a few near-duplicates of other families).  Each runs at the smallest of
64, 128 (both with ``img_size=`` passed to ``create_model`` where a model needs it) and
its default input size that its forward accepts.  A model whose groups are all frozen
passes only if every frozen group says why, naming the op.

Runs under the ``zoo`` marker only (``make test-zoo``); ``benchmarks/timm_zoo.py`` runs
the same sample side by side with Torch-Pruning.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import graphprune as gp

timm = pytest.importorskip("timm")

# (timm name, input size, create_model kwargs); one per family, sorted by name
MODELS: list[tuple[str, int, dict[str, Any]]] = [
    ("bat_resnext26ts", 256, {}),
    ("beit_base_patch16_224", 64, {"img_size": 64}),
    ("botnet26t_256", 64, {"img_size": 64}),
    ("caformer_s18", 64, {}),
    ("cait_xxs24_224", 64, {"img_size": 64}),
    ("coat_tiny", 64, {"img_size": 64}),
    ("coatnet_pico_rw_224", 64, {"img_size": 64}),
    ("coatnext_nano_rw_224", 64, {"img_size": 64}),
    ("convformer_s18", 64, {}),
    ("convit_tiny", 64, {"img_size": 64}),
    ("convmixer_768_32", 64, {}),
    ("convnext_zepto_rms", 64, {}),
    ("convnextv2_atto", 64, {}),
    ("cpubone_nano", 64, {}),
    ("crossvit_tiny_240", 64, {}),
    ("cs3darknet_focus_s", 64, {}),
    ("cspdarknet53", 64, {}),
    ("cspnext_tiny", 64, {}),
    ("cspresnet50", 64, {}),
    ("cspresnext50", 64, {}),
    ("darknet17", 64, {}),
    ("darknetaa53", 64, {}),
    ("davit_tiny", 64, {}),
    ("deit_tiny_patch16_224", 64, {"img_size": 64}),
    ("densenet121", 64, {}),
    ("densenetblur121d", 64, {}),
    ("dla34", 64, {}),
    ("dpn68", 64, {}),
    ("eca_nfnet_l0", 64, {}),
    ("ecaresnet26t", 64, {}),
    ("ecaresnetlight", 64, {}),
    ("ecaresnext26t_32x4d", 64, {}),
    ("edgenext_x_small", 64, {}),
    ("efficientformer_l1", 224, {}),
    ("efficientformerv2_s0", 64, {"img_size": 64}),
    ("efficientnet_b0", 64, {}),
    ("efficientnetv2_rw_t", 64, {}),
    ("efficientvim_m1", 64, {}),
    ("efficientvit_m0", 64, {}),
    ("ese_vovnet39b", 64, {}),
    ("eva02_tiny_patch14_224", 64, {"img_size": 64}),
    ("fasternet_t0", 64, {}),
    ("fastvit_t8", 64, {}),
    ("fbnetc_100", 64, {}),
    ("fbnetv3_b", 64, {}),
    ("flexivit_small", 64, {"img_size": 64}),
    ("focalnet_tiny_srf", 64, {}),
    ("gc_efficientnetv2_rw_t", 64, {}),
    ("gcresnet33ts", 64, {}),
    ("gcresnext26ts", 64, {}),
    ("gcvit_xtiny", 64, {"img_size": 64}),
    ("gernet_s", 64, {}),
    ("ghostnet_050", 64, {}),
    ("ghostnetv3_050", 64, {}),
    ("gmixer_12_224", 64, {"img_size": 64}),
    ("gmlp_ti16_224", 64, {"img_size": 64}),
    ("halo2botnet50ts_256", 128, {"img_size": 128}),
    ("halonet_h1", 256, {}),
    ("haloregnetz_b", 224, {}),
    ("hardcorenas_b", 64, {}),
    ("hgnet_tiny", 64, {}),
    ("hgnetv2_b0", 64, {}),
    ("hiera_tiny_224", 64, {"img_size": 64}),
    ("hieradet_small", 64, {}),
    ("hrnet_w18_small", 64, {}),
    ("iformer_t", 64, {}),
    ("inception_next_atto", 64, {}),
    ("lambda_resnet26t", 64, {}),
    ("lamhalobotnet50ts_256", 128, {"img_size": 128}),
    ("lcnet_035", 64, {}),
    ("lcnetv2_small", 64, {}),
    ("legacy_seresnet18", 64, {}),
    ("levit_128", 64, {"img_size": 64}),
    ("lowformer_b0", 64, {}),
    ("mambaout_femto", 64, {}),
    ("maxvit_pico_rw_256", 64, {"img_size": 64}),
    ("maxxvit_rmlp_nano_rw_256", 64, {"img_size": 64}),
    ("maxxvitv2_nano_rw_256", 64, {"img_size": 64}),
    ("mixer_b32_224", 64, {"img_size": 64}),
    ("mixnet_s", 64, {}),
    ("mnasnet_small", 64, {}),
    ("mobilenet_edgetpu_100", 64, {}),
    ("mobilenetv2_035", 64, {}),
    ("mobileone_s1", 64, {}),
    ("mobilevit_xxs", 64, {}),
    ("mobilevitv2_050", 64, {}),
    ("mvitv2_tiny", 64, {}),
    ("nest_tiny", 64, {"img_size": 64}),
    ("nextvit_small", 64, {}),
    ("nf_regnet_b0", 64, {}),
    ("nfnet_f0", 64, {}),
    ("pit_ti_224", 64, {"img_size": 64}),
    ("poolformer_s12", 64, {}),
    ("poolformerv2_s12", 64, {}),
    ("pvt_v2_b0", 64, {}),
    ("rdnet_tiny", 64, {}),
    ("regnetv_040", 64, {}),
    ("regnetx_002", 64, {}),
    ("regnety_002", 64, {}),
    ("regnetz_005", 64, {}),
    ("repghostnet_050", 64, {}),
    ("repvgg_a0", 64, {}),
    ("repvit_m1", 64, {}),
    ("res2next50", 64, {}),
    ("resmlp_12_224", 64, {"img_size": 64}),
    ("resnest14d", 64, {}),
    ("resnet18", 64, {}),
    ("resnetaa34d", 64, {}),
    ("resnetblur18", 64, {}),
    ("resnetrs50", 64, {}),
    ("resnetv2_18", 64, {}),
    ("resnext26ts", 64, {}),
    ("rexnet_100", 64, {}),
    ("rexnetr_100", 64, {}),
    ("sebotnet33ts_256", 64, {"img_size": 64}),
    ("sedarknet21", 64, {}),
    ("sehalonet33ts", 256, {}),
    ("selecsls42", 64, {}),
    ("semnasnet_050", 64, {}),
    ("sequencer2d_s", 64, {}),
    ("seresnet18", 64, {}),
    ("seresnetaa50d", 64, {}),
    ("seresnext26ts", 64, {}),
    ("shvit_s1", 64, {}),
    ("skresnet18", 64, {}),
    ("skresnext50_32x4d", 64, {}),
    ("spnasnet_100", 64, {}),
    ("starnet_s1", 64, {}),
    ("swiftformer_xs", 64, {}),
    ("swin_tiny_patch4_window7_224", 64, {"img_size": 64}),
    ("swinv2_cr_tiny_224", 64, {"img_size": 64}),
    ("test_vit", 64, {}),
    ("tf_efficientnet_b0", 64, {}),
    ("tiny_vit_5m_224", 64, {}),
    ("tinynet_c", 64, {}),
    ("tnt_s_legacy_patch16_224", 64, {"img_size": 64}),
    ("tresnet_m", 64, {}),
    ("twins_svt_small", 64, {}),
    ("visformer_tiny", 64, {"img_size": 64}),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("vitamin_small_224", 64, {"img_size": 64}),
    ("volo_d1_224", 64, {"img_size": 64}),
    ("vovnet39a", 64, {}),
    ("xception41", 64, {}),
    ("xcit_nano_12_p8_224", 64, {}),
]
SPECS: dict[str, tuple[int, dict[str, Any]]] = {name: (size, kwargs) for name, size, kwargs in MODELS}
# known failures: name -> what fails (strict xfail, so a fix shows up)
KNOWN: dict[str, str] = {}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random weights, as ``graphprune.samples.models.randomize_`` gives the
    torchvision zoo, for timm's norms too: every norm-like module (any module with a
    ``running_var`` buffer or a 1-d ``weight`` of norm type) gets random scales, shifts
    (where it has them) and statistics; then every all-zero parameter gets random values."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in model.modules():
            is_norm = isinstance(mod, norms) or "Norm" in type(mod).__name__
            weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if is_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1:
                weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
            mean, var = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.1)
                var.copy_(torch.rand(var.shape, generator=gen) + 0.5)
        for p in model.parameters():
            if p.dim() >= 1 and p.numel() and float(p.abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def build(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``name`` with random weights made non-trivial (norm statistics and scales, zero
    initialised tensors), in eval mode."""
    torch.manual_seed(0)
    return randomize(timm.create_model(name, pretrained=False, **kwargs)).eval()


def example(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def check_frozen_reasons(graph: gp.Graph, name: str) -> None:
    """Every group with frozen channels says why, and each reason names an op or the
    model's inputs and outputs."""
    for group in gp.analyse(graph).groups:
        if not group.frozen.any():
            continue
        assert group.reasons, f"{name}: {group.describe()} is frozen without a reason"
        for reason in group.reasons.values():
            assert "`" in reason or reason == "model input or output", f"{name}: reason names no op: {reason!r}"


def check_model(name: str) -> None:
    torch.set_num_threads(1)
    size, kwargs = SPECS[name]
    graph = gp.trace(build(name, kwargs), example(size))
    assert graph.frontend.name in ("export", "fx")
    before = gp.graph_cost(graph).macs
    result = gp.run(graph, "prune-channels{ratio=0.3}")
    r = result.results[0]
    if not r.modified:  # every group frozen: each must say why, naming the op
        check_frozen_reasons(graph, name)
        shrinkable = [g.describe() for g in gp.analyse(graph).groups  # ratio 0.3 removes floor(0.3 n), keeps >= 1 class
                      if math.floor(0.3 * int(g.prunable.sum())) >= 1 and g.n_classes > 1]
        assert not shrinkable, f"{name}: groups the ratio shrinks left unpruned: {shrinkable[:3]}"
        return
    err = gp.compare(result.graph, r.reference(), n=1)
    assert err <= 1e-5, f"{name} ({graph.frontend.name}): error {err:.3g} against the projected reference"
    assert gp.graph_cost(result.graph).macs < before


@pytest.mark.zoo
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=True)) if n in KNOWN else n for n in SPECS
])
def test_timm_zoo(name: str) -> None:
    check_model(name)


def test_timm_sample_is_one_per_family() -> None:
    """The sample stays broad and deterministic: at least 100 models, distinct families."""
    import re

    families = [re.split(r"[_\d]", n)[0] for n in SPECS]
    assert len(SPECS) == len(MODELS) >= 100
    assert len(set(families)) == len(families)
    assert [n for n, _, _ in MODELS] == sorted(n for n, _, _ in MODELS)
