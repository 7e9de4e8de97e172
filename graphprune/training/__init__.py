"""Training-time helpers for the user's own loop (torch is imported here, not in the core).

Part 1 (issue 10): data-driven pruning support — distillation with label refinement and
mixup (CURL), batch-norm recalibration, a reference loop, and the early pruning
indicator (EPI).  Every helper is DDP-safe: decisions taken from data are reduced or
broadcast with :mod:`graphprune.dist` when ``torch.distributed`` is initialised.
"""
from __future__ import annotations

from .distill import LabelRefinement, distillation_loss, mixup, soft_cross_entropy
from .epi import EarlyPruningIndicator, architecture_distance, epi_indicator
from .loop import fit, recalibrate_bn, unwrap

__all__ = [
    "EarlyPruningIndicator", "LabelRefinement", "architecture_distance", "distillation_loss", "epi_indicator",
    "fit", "mixup", "recalibrate_bn", "soft_cross_entropy", "unwrap",
]

# --- part 2: TRP, SMOF, group-conv (issue 11) ---
# (imports of graphprune.training.trp / smof / gconv go here; extend __all__ below them)
from .gconv import GroupConvFinetune, group_conv_finetune, lossless_spec, taylor_scores  # noqa: E402
from .smof import (  # noqa: E402
    ChannelGate, LatencyTable, RingGate, SMOFGates, baked_state_dict, smof_gates, smof_penalty, smof_threshold,
)
from .trp import TRP, energy_rank, low_rank_projection  # noqa: E402

__all__ += [
    "ChannelGate", "GroupConvFinetune", "LatencyTable", "RingGate", "SMOFGates", "TRP", "baked_state_dict",
    "energy_rank", "group_conv_finetune", "lossless_spec", "low_rank_projection", "smof_gates", "smof_penalty",
    "smof_threshold", "taylor_scores",
]
