"""Fine-tuning a pruned model from few labels (CURL): distillation, label refinement, mixup.

Distillation.  With student logits ``s``, teacher logits ``t``, temperature ``T`` and
targets ``y`` (class indices or a probability vector per sample)::

    L = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, softmax(s))

(the ``T^2`` keeps the soft term's gradient scale independent of ``T``).

Label refinement.  With only a few labelled images, CURL fine-tunes the pruned student
against soft labels that are themselves learned: every training sample ``i`` owns a
row ``z_i`` of a table of label logits, initialised from the teacher (``z_i = t_i / T0``),
and its soft label is ``q_i = softmax(z_i)``.  After each student step the rows of the
batch take one gradient step of their own (step size ``lr``) on

    L_label(z_i) = KL(p_i || q_i) + beta * CE(y_i, q_i),   p_i = softmax(s_i) (detached)

whose gradient is ``dL/dz_i = (q_i - p_i) + beta * (q_i - onehot(y_i))``: the label moves
toward the student's prediction (and, with ``beta > 0``, stays compatible with the given
hard label), so labels the teacher got wrong can drift toward what the data supports.
The gradient is per sample (summed over the batch), so a row's step does not depend on
the batch size.

Under ``torch.distributed`` every rank updates the rows of its own batch; the updated
rows are all-gathered and written on every rank (rank order), so the tables stay equal.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graphprune.training import distributed as dist

__all__ = ["distillation_loss", "LabelRefinement", "mixup", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class indices (int) or probability rows (float)."""
    if targets.is_floating_point():
        return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()
    return F.cross_entropy(logits, targets)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    T: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, s)``
    (batch means).  Without a teacher it is the cross-entropy; without targets, the
    distillation term alone."""
    if T <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need T > 0 and 0 <= alpha <= 1, got T={T}, alpha={alpha}")
    loss = student_logits.new_zeros(())
    if teacher_logits is not None and alpha > 0:
        log_p_s = F.log_softmax(student_logits / T, -1)
        log_p_t = F.log_softmax(teacher_logits.detach() / T, -1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        loss = loss + (alpha if targets is not None else 1.0) * T * T * kl
    if targets is not None and (teacher_logits is None or alpha < 1):
        loss = loss + (1.0 - alpha if teacher_logits is not None else 1.0) * soft_cross_entropy(student_logits, targets)
    return loss


class LabelRefinement:
    """A per-sample table of label logits, initialised from the teacher and refined with
    its own step size during fine-tuning (see the module docstring for the math)::

        refine = LabelRefinement(teacher_logits_of_train_set, lr=0.5, beta=0.1, labels=y)
        for x, y, idx in loader:
            s = student(x)
            loss = distillation_loss(s, teacher(x), refine.targets(idx), T, alpha)
            ...; opt.step()
            refine.step(idx, s)
    """

    def __init__(
        self,
        teacher_logits: torch.Tensor,
        lr: float = 0.5,
        T: float = 1.0,
        beta: float = 0.0,
        labels: torch.Tensor | None = None,
    ) -> None:
        if lr < 0 or T <= 0 or beta < 0:
            raise ValueError(f"need lr >= 0, T > 0, beta >= 0; got lr={lr}, T={T}, beta={beta}")
        if beta > 0 and labels is None:
            raise ValueError("beta > 0 needs the hard labels (labels=...)")
        self.table = (teacher_logits.detach().float() / T).clone()
        self.lr = lr
        self.beta = beta
        self.labels = None if labels is None else labels.detach().long().clone()
        self.steps = 0

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        """Soft labels ``softmax(z_i)`` of the samples ``index`` (no gradient)."""
        return F.softmax(self.table[index], -1)

    def loss(self, rows: torch.Tensor, student_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``sum_i KL(p_i || softmax(z_i)) + beta * CE(y_i, softmax(z_i))`` over the batch."""
        log_q = F.log_softmax(rows, -1)
        log_p = F.log_softmax(student_logits.detach().float(), -1)
        out = (log_p.exp() * (log_p - log_q)).sum()
        if self.beta > 0:
            out = out - self.beta * log_q.gather(1, self.labels[index].view(-1, 1)).sum()  # type: ignore[index]
        return out

    def gradient(self, index: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """``dL_label / dz`` for the rows ``index`` (by autograd)."""
        rows = self.table[index].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.loss(rows, student_logits, index), rows)
        return grad

    @torch.no_grad()
    def step(self, index: torch.Tensor, student_logits: torch.Tensor) -> None:
        """One step ``z_i <- z_i - lr * dL_label/dz_i`` for the batch's rows, then the
        updated rows of every rank are written on every rank."""
        index = torch.as_tensor(index, dtype=torch.long)
        with torch.enable_grad():
            grad = self.gradient(index, student_logits)
        rows = self.table[index] - self.lr * grad
        index, rows = dist.all_gather_rows(index, rows)
        self.table[index] = rows.to(self.table.dtype)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.clone(), "lr": self.lr, "beta": self.beta, "steps": self.steps,
                "labels": None if self.labels is None else self.labels.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table = state["table"].clone()
        self.lr, self.beta, self.steps = state["lr"], state["beta"], state["steps"]
        self.labels = state["labels"]


def mixup(
    x: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.2,
    n_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup: ``lam ~ Beta(alpha, alpha)``, a random pairing ``perm``;
    ``x' = lam x + (1-lam) x[perm]``, ``y' = lam y + (1-lam) y[perm]`` with ``y`` as
    probability rows (class indices are one-hot encoded with ``n_classes``).
    Returns ``(x', y', perm, lam)``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not targets.is_floating_point():
        if n_classes is None:
            raise ValueError("class-index targets need n_classes")
        targets = F.one_hot(targets.long(), n_classes).float()
    lam = _beta_sample(float(torch.rand((), generator=generator, dtype=torch.float64)), alpha)
    perm = torch.randperm(len(x), generator=generator)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm], perm, lam


def _beta_sample(u: float, alpha: float) -> float:
    """A Beta(alpha, alpha) draw by the inverse CDF at the uniform ``u`` (the density
    ``x^(a-1) (1-x)^(a-1)`` integrated numerically on a fine grid), so a
    ``torch.Generator`` makes it reproducible."""
    grid = torch.linspace(1e-6, 1 - 1e-6, 4001, dtype=torch.float64)
    cdf = torch.cumsum(((alpha - 1) * (grid.log() + (1 - grid).log())).exp(), 0)
    cdf = cdf / cdf[-1]
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64)).clamp(max=len(grid) - 1))
    return float(grid[i])
