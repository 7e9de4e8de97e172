"""Modules a graph emitted: notice when one was fine-tuned after ``Graph.to_module()``.

``Graph.to_module()`` returns an independent module (new parameters).  Fine-tuning it
changes that module, not the graph, so ``Graph.to_onnx()`` would silently export the
weights from before fine-tuning.  graphprune refuses instead: each emitted module's
parameters and buffers are fingerprinted by identity and in-place version counter
(every optimizer step, ``load_state_dict`` or ``copy_`` bumps it), and ``to_onnx`` raises
:class:`~graphprune.graph.GraphError` while a still-alive emitted module differs from its fingerprint,
saying how to export the fine-tuned weights: trace the tuned module again
(``gp.trace(tuned, x).to_onnx(path)``).
"""
from __future__ import annotations

import weakref
from typing import Any

__all__ = ["EmittedModules"]


def _fingerprint(module: Any) -> dict[str, tuple[int, int]]:
    return {name: (id(t), int(getattr(t, "_version", 0))) for name, t in module.state_dict(keep_vars=True).items()}


class EmittedModules:
    """The modules a graph handed out, with their fingerprints at that time."""

    def __init__(self) -> None:
        self._items: list[tuple[weakref.ref, dict[str, tuple[int, int]]]] = []

    def add(self, module: Any) -> None:
        self._items.append((weakref.ref(module), _fingerprint(module)))

    def changed(self) -> list[str]:
        """Names of parameters or buffers that changed in a live emitted module."""
        out: list[str] = []
        for ref, before in self._items:
            module = ref()
            if module is None:
                continue
            now = _fingerprint(module)
            out.extend(name for name in before if now.get(name) != before[name])
        return out

    def tuned_message(self, what: str) -> str | None:
        """The refusal for ``what`` when an emitted module changed, else None."""
        changed = self.changed()
        if not changed:
            return None
        shown = ", ".join(changed[:3]) + (f" (+{len(changed) - 3})" if len(changed) > 3 else "")
        return (
            f"{what}: the module this graph emitted with to_module() has changed since ({shown}), e.g. by "
            "fine-tuning; the graph still holds the weights from before.  Export the tuned module instead: "
            "gp.trace(tuned, example_input).to_onnx(path)"
        )
