"""Logit matching by mean squared error (Kim et al. 2021, "Comparing Kullback-Leibler Divergence and
Mean Squared Error Loss in Knowledge Distillation"): the README's worked example of a loss term."""

from __future__ import annotations

from torch import Tensor

from distill.losses.divergences import crop_vocab
from distill.losses.fused_head import RowFn
from distill.losses.terms.base import Term, register


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """‖z_S − z_T‖² per row over the shared vocabulary. Raw logits, no τ: the KL at τ → ∞ tends to this
    logit matching (Kim et al.)."""
    s, t = crop_vocab(student_logits, teacher_logits)
    return (s - t).pow(2).sum(-1)


@register
class LogitMSE(Term):
    """``mse``: ‖z_S − z_T‖² summed over the shared vocabulary, a mean over target tokens."""

    name = "mse"
    uses_logits = True

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        self.parts = {"mse": "target"}

    def row_values(self, labels: Tensor, spans=None) -> dict[str, RowFn]:
        return {"mse": lambda s, t, rows: logit_mse(s, t)}
