"""Built-in passes, installed as ``graphprune.passes``; importing registers them."""
from __future__ import annotations

from .factorize import Factorize
from .group_convs import GroupConvs
from .prune_channels import PruneChannels
from .shrink_kernels import ShrinkKernels

__all__ = ["Factorize", "GroupConvs", "PruneChannels", "ShrinkKernels"]
