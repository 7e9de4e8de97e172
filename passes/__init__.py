"""Built-in passes, installed as ``graphprune.passes``; importing registers them."""
from __future__ import annotations

from .group_convs import GroupConvs
from .prune_channels import PruneChannels

__all__ = ["GroupConvs", "PruneChannels"]
