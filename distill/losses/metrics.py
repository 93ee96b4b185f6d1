"""What is measured besides the loss, as row functions of the fused head pass: the teacher-student
agreement logged on log steps (``AGREEMENT``) and the teacher-forced CE and accuracy of an evaluation
(``teacher_forced_sums``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergences import crop_vocab
from distill.losses.fused_head import RowFn, RowSum, Side, head_pass
from distill.losses.sparse_teacher import TopK, bucket_log_probs
from distill.models.capture import Output


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _shared(student_logits: Tensor, teacher: Tensor | TopK) -> tuple[Tensor, Tensor]:
    """(student logits over the shared vocabulary, the teacher's (log-)probabilities' logits there; for
    a cache, over its K + 1 buckets at temperature 1)."""
    if isinstance(teacher, TopK):
        return student_logits[:, :teacher.vocab], bucket_log_probs(student_logits, teacher, 1.0)[1]
    return crop_vocab(student_logits, teacher)


def _top1(student_logits: Tensor, teacher: Tensor | TopK, rows: slice) -> Tensor:
    if isinstance(teacher, TopK):
        best = teacher.ids.gather(1, teacher.logits.argmax(-1, keepdim=True)).squeeze(1)
        return (student_logits[:, :teacher.vocab].argmax(-1) == best).to(student_logits.dtype)
    s, t = crop_vocab(student_logits, teacher)
    return (s.argmax(-1) == t.argmax(-1)).to(s.dtype)


# Teacher-student agreement over the shared vocabulary, per target row (logged as agreement/<name>); with
# a teacher cache the teacher's entropy is over its top-K and one bucket for the rest
AGREEMENT: dict[str, RowFn] = {
    "top1": _top1,
    "teacher_entropy": lambda s, t, rows: _entropy(_shared(s, t)[1]),
    "student_entropy": lambda s, t, rows: _entropy(_shared(s, t)[0]),
}


def agreement_row_sums() -> list[RowSum]:
    """``AGREEMENT``'s metrics for the fused head pass: reported, never differentiated."""
    return [RowSum(fn) for fn in AGREEMENT.values()]


def agreement_sums(values: Tensor, rows: int) -> Tensor:
    """``AGREEMENT``'s sums (``values``, from the head pass) and the row count they are over, in float64."""
    return torch.cat([values, torch.full((1,), rows, dtype=torch.float64, device=values.device)])


@torch.no_grad()
def teacher_forced_sums(student: Output, labels: Tensor, row_weight: Tensor, budget_mib: Optional[float]) -> Tensor:
    """(Σ weight · NLL, Σ weight, Σ weight · [top-1 correct]) over the target rows of ``student``
    (evaluation only); ``labels`` and ``row_weight``: one per row."""
    sums = [RowSum(lambda s, t, rows: F.cross_entropy(s, labels[rows], reduction="none") * row_weight[rows]),
            RowSum(lambda s, t, rows: row_weight[rows].to(s.dtype)),
            RowSum(lambda s, t, rows: (s.argmax(-1) == labels[rows]).to(s.dtype) * row_weight[rows])]
    return head_pass(Side(student.hidden, student.head), None, sums, budget_mib)[1]
