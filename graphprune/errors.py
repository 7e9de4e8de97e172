"""The errors of the pass layer, in one module that imports nothing from graphprune.

* :class:`PassOptionError` — an unknown pass, an unknown option or a value out of range;
* :class:`BudgetError` — a budget the graph cannot meet;
* :class:`VerificationError` — a rewritten graph that differs from its projected reference;
* :class:`CheckInputError` — check inputs (``--check-inputs``, ``--input-value``,
  ``check_inputs=``) that do not fit the model.

They are re-exported from :mod:`graphprune` (``gp.VerificationError``) and from
:mod:`graphprune.passes_base`, where they lived first.  Errors about a graph itself are
:class:`graphprune.graph.GraphError` and its subclasses (``CaptureError`` in the fx
frontend, ``OnnxLoadError`` in the ONNX one).
"""
from __future__ import annotations

__all__ = ["BudgetError", "CheckInputError", "NeedsTorchError", "PassOptionError", "VerificationError"]


class PassOptionError(ValueError):
    """An unknown pass, an unknown option or an option value out of range."""


class NeedsTorchError(PassOptionError):
    """An option (a data-driven criterion) that needs PyTorch, which is not installed; the
    message says how to install it (``pip install graphprune[torch]``)."""


class BudgetError(ValueError):
    """A budget that the graph cannot meet (the message says what limits it)."""


class VerificationError(AssertionError):
    """A rewritten graph that does not match its projected reference."""


class CheckInputError(ValueError):
    """Check inputs that do not fit the model: a missing or unknown input name, a wrong
    shape or dtype (the message names the input)."""
