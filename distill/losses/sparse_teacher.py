"""Divergences against a cached teacher that kept only its top-K tokens per row.

The cache holds, per target row, the teacher's K largest logits (fp16/bf16), their token ids, the
log-sum-exp of the row's full logits and the log of the tail's mass (fp32, temperature 1). Both
distributions are compared over K+1 buckets: the K kept tokens and one tail bucket holding every other
token's mass. The student has all its logits, so its buckets are exact at any temperature. The teacher's
kept and tail mass are exact at τ = 1 (the fp32 tail, not one minus the rounded kept logits' mass);
elsewhere its tail is V − K tokens sharing that mass equally. With every token kept there is no tail and
the divergences are the dense ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError


@dataclass
class TopK:
    """A teacher's top-K per target row, as the teacher cache stores it."""

    ids: Tensor  # (N, K) int64 token ids, distinct within a row, in any order
    logits: Tensor  # (N, K) the teacher's logits at ``ids`` (fp16/bf16/float32/float64)
    lse: Tensor  # (N,) float32/float64: log-sum-exp of the row's full logits at temperature 1
    vocab: int  # the vocabulary the cache was computed over
    # (N,) float32: log of the mass outside ``ids`` at temperature 1, from the unrounded logits; None:
    # one minus the kept logits' mass
    log_tail: Optional[Tensor] = None

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(self.ids[rows], self.logits[rows], self.lse[rows], self.vocab,
                    None if self.log_tail is None else self.log_tail[rows])

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def _student(logits: Tensor, ids: Tensor, tail: bool) -> Tensor:
    """log q over the buckets from all of the student's (scaled) logits: exact, the tail included."""
    log_z = logits.logsumexp(dim=-1, keepdim=True)
    kept = logits.gather(-1, ids) - log_z
    if not tail:
        return kept
    rest = logits.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([kept, rest - log_z], dim=-1)


def _teacher(teacher: TopK, dtype: torch.dtype, temperature: float, tail: bool) -> Tensor:
    """log p over the buckets. At τ = 1 they are the kept tokens' and the tail's masses; at other
    temperatures the tail is V − K tokens sharing its mass equally (the most even spread: at τ > 1 the
    upper bound of the tail's tempered mass; one token carrying it all, the lower bound, starves the tail
    and pulls the student's tail mass down). The tail is floored at ``tiny`` so a kept mass that rounds
    to >= 1 (fp16 logits) still gives a finite log p_tail, hence a finite reverse KL."""
    z = teacher.logits.detach().to(dtype)
    if not tail:
        return F.log_softmax(z / temperature, dim=-1)
    tiny = torch.finfo(dtype).tiny
    if teacher.log_tail is None:  # one minus the kept logits' mass
        kept = z - teacher.lse.detach().to(dtype).unsqueeze(-1)
        log_tail = torch.log((1.0 - kept.exp().sum(dim=-1, keepdim=True)).clamp_min(tiny))
    else:  # kept: the tokens' shares of the kept mass, 1 − tail
        log_tail = teacher.log_tail.detach().to(dtype).unsqueeze(-1).clamp(min=math.log(tiny), max=0.0)
        kept = F.log_softmax(z, dim=-1) + torch.log1p(-log_tail.exp().clamp_max(1.0 - torch.finfo(dtype).eps))
    spread = math.log(teacher.vocab - teacher.k)
    return F.log_softmax(torch.cat([kept / temperature, spread + (log_tail - spread) / temperature], dim=-1), dim=-1)


def bucket_log_probs(student_logits: Tensor, teacher: TopK, temperature: float) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities over the buckets, each (N, B), in the student logits' dtype
    promoted to >= float32. B = K + 1 (the tail last), or K when every token is kept (known from the shapes,
    so no host sync). Only the student's are differentiable."""
    if student_logits.shape[-1] < teacher.vocab:
        raise DistillError(f"student vocabulary ({student_logits.shape[-1]}) is smaller than the teacher "
                           f"cache's ({teacher.vocab})")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    tail = teacher.k < teacher.vocab
    s = student_logits[..., :teacher.vocab].to(dtype) / temperature  # extra columns: vocabulary padding
    return _student(s, teacher.ids, tail), _teacher(teacher, dtype, temperature, tail)
