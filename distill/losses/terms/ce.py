"""The cross-entropy with the gold labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.losses.fused_head import RowFn
from distill.losses.terms.base import Term, register


@register
class CrossEntropy(Term):
    """``ce``: the (label-smoothed, as in torch) cross-entropy of the student with the gold labels over
    its whole head, a mean over the target tokens of the gold micro-batches (on-policy ones have no gold
    labels and skip it)."""

    name = "ce"
    default_weight = 1.0
    needs_teacher = False
    gold_only = True
    uses_logits = True

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        self.parts = {"ce": "target_gold"}

    def row_values(self, labels: Tensor, spans=None) -> dict[str, RowFn]:
        smoothing = self.cfg.label_smoothing
        return {"ce": lambda s, t, rows: F.cross_entropy(s, labels[rows], reduction="none", label_smoothing=smoothing)}
