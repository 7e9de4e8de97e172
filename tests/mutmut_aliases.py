"""A pytest plugin for ``make mutate`` only (loaded with ``-p`` from ``[tool.mutmut]``).

``passes/`` installs as ``graphprune.passes``, but mutmut names a mutant by its file path
(``passes.prune_channels.x_...``) and switches it on by the defining module's ``__name__``.
So import the mutated copies as ``passes.*`` and register each under its
``graphprune.passes.*`` name too: one module object, reachable by both names.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import graphprune
import passes

sys.modules["graphprune.passes"] = passes
graphprune.passes = passes  # type: ignore[attr-defined]
for _info in pkgutil.iter_modules(passes.__path__):
    sys.modules[f"graphprune.passes.{_info.name}"] = importlib.import_module(f"passes.{_info.name}")
