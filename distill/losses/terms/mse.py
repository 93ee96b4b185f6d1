"""Logit matching by mean squared error (Kim et al. 2021, "Comparing Kullback-Leibler Divergence and
Mean Squared Error Loss in Knowledge Distillation"): the README's worked example of a loss term."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from distill.losses.divergences import CHUNK_ELEMENTS, row_sum
from distill.losses.terms.base import Output, Term, register


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, index: Optional[Tensor],
              chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Σ over the tokens ``index`` of ‖z_S − z_T‖² over the shared vocabulary. Raw logits, no τ: the
    KL at τ → ∞ tends to this logit matching (Kim et al.). Chunked like the divergences."""
    return row_sum(student_logits, teacher_logits, index, lambda s, t: (s - t).pow(2).sum(-1), chunk_elements)


@register
class LogitMSE(Term):
    """``mse``: ‖z_S − z_T‖² summed over the shared vocabulary, a mean over target tokens."""

    name = "mse"
    uses_logits = True

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        self.parts = {"mse": "target"}

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        return {"mse": logit_mse(student.logits, teacher.logits, batch["target_index"])}
