"""The cross-entropy with the gold labels."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from distill.losses.divergences import cross_entropy
from distill.losses.terms.base import Output, Term, register


@register
class CrossEntropy(Term):
    """``ce``: the (label-smoothed) cross-entropy of the student with the gold labels, a mean over the
    target tokens of the gold micro-batches (on-policy ones have no gold labels and skip it)."""

    name = "ce"
    needs_teacher = False
    gold_only = True
    uses_logits = True

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        self.parts = {"ce": "target_gold"}

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        return {"ce": cross_entropy(student.logits, batch["labels"], batch["target_index"],
                                    label_smoothing=self.cfg.label_smoothing)}
