"""Pure functions over rows of logits: the divergences between a teacher's and a student's token
distributions, per row. The logit terms apply them to one chunk of rows at a time
(``distill.losses.fused_head``); ``select_rows`` and ``CHUNK_ELEMENTS`` serve the feature losses, which
select rows by flat index: no host syncs (no boolean indexing, no ``nonzero``), and padding costs nothing.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.sparse_teacher import TopK, bucket_log_probs

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"]

DIVERGENCES: tuple[str, ...] = get_args(Divergence)


def crop_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Crop the vocabulary (last) dim of both to the smaller size.

    Models often pad their embedding matrix to a multiple of 64/128; the extra rows are never real
    tokens, so dropping them leaves the shared vocabulary. Views only, no copy. Refusing genuinely
    different tokenizers is done where the tokenizers are known, not here.
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def select_rows(x: Tensor, index: Optional[Tensor]) -> Tensor:
    """The (N, last-dim) rows of ``x`` at the flat indices ``index`` into its leading dims (all rows
    when None). Selecting before any math means padding costs no compute and cannot leak into a result."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if index is None else rows.index_select(0, index.to(rows.device))


def compute_dtype(x: Tensor) -> torch.dtype:
    # at least float32 (bf16/fp16 softmax over a large vocabulary is too coarse); keep float64.
    return torch.promote_types(x.dtype, torch.float32)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log q, log p) per row. The teacher is a constant target: detached here, in one place."""
    return (
        F.log_softmax(student_logits, dim=-1),
        F.log_softmax(teacher_logits.detach(), dim=-1),
    )


def kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per row from log-probabilities.

    Terms with a = 0 count as 0 (the 0·log 0 convention), so -inf logits give 0 instead of NaN. The inner
    ``where`` keeps the product's backward from meeting 0·inf there: the gradient is 0, not NaN.
    """
    a = log_a.exp()
    kept = a > 0
    return torch.where(kept, a * torch.where(kept, log_a - log_b, 0.0), 0.0).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b), done in log space so tiny probabilities neither underflow nor lose precision."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p ‖ q): mode-covering, the classic Hinton/Shleifer KD term."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return kl_rows(log_p, log_q)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q ‖ p): mode-seeking."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return kl_rows(log_q, log_p)


def jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD: β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p ‖ α·p + (1−α)·q): bounded even where q ≈ 0 while p is not."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return kl_rows(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(q ‖ α·q + (1−α)·p)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return kl_rows(log_q, _log_mix(log_q, log_p, alpha))


def taid(student_logits: Tensor, teacher_logits: Tensor, lam: float | Tensor = 0.0) -> Tensor:
    """TAID: KL(r ‖ q), r = softmax((1−λ)·sg(z_S) + λ·z_T).

    The target starts at the student's own distribution (λ=0, zero loss) and moves to the teacher
    (λ=1, forward KL); the student part of the target is stop-gradient so only q is trained. ``lam``
    may be a 0-d tensor: TAID's adaptive λ lives on the device.
    """
    log_q, _ = _log_probs(student_logits, teacher_logits)
    target = (1.0 - lam) * student_logits.detach() + lam * teacher_logits.detach()
    return kl_rows(F.log_softmax(target, dim=-1), log_q)


def _check_params(kind: str, beta: float, alpha: float, lam: float | Tensor) -> None:
    # degenerate values make the loss identically 0 (β∈{0,1}, α=1): refuse rather than train on nothing
    if kind not in DIVERGENCES:
        raise DistillError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise DistillError(f"jsd beta must be in (0, 1), got {beta}")
    if kind in ("skew_kl", "skew_reverse_kl") and not 0.0 <= alpha < 1.0:
        raise DistillError(f"skew alpha must be in [0, 1), got {alpha}")
    # a tensor λ is bounded where it is made (TaidLambda); comparing it here would be a host sync
    if kind == "taid" and not isinstance(lam, Tensor) and not 0.0 <= lam <= 1.0:
        raise DistillError(f"taid lambda must be in [0, 1], got {lam}")


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    lam: float | Tensor = 0.0,
) -> Tensor:
    """Dispatch to the per-token function of ``kind``: (N, V) scaled logits -> (N,)."""
    _check_params(kind, beta, alpha, lam)
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits)
    if kind == "jsd":
        return jsd(student_logits, teacher_logits, beta)
    if kind == "skew_kl":
        return skew_kl(student_logits, teacher_logits, alpha)
    if kind == "skew_reverse_kl":
        return skew_reverse_kl(student_logits, teacher_logits, alpha)
    return taid(student_logits, teacher_logits, lam)


# Elements of one chunk's (rows × last-dim) block for the feature losses' chunking: each float32
# intermediate of a chunk is 4 MB.
CHUNK_ELEMENTS = 1 << 20


def scaled_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor | TopK,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    lam: float | Tensor = 0.0,
) -> Tensor:
    """τ² · D(softmax(z_T/τ) ‖ softmax(z_S/τ)) per row over the shared vocabulary: (N, V_S), (N, V_T) -> (N,).
    The τ² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).

    A ``TopK`` teacher (a cache of its top-K tokens) is compared over its buckets instead
    (``sparse_teacher``): the per-token functions take the bucket log-probabilities as logits, since
    log_softmax leaves log-probabilities unchanged."""
    if not temperature > 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher_logits, TopK):
        log_q, log_p = bucket_log_probs(student_logits, teacher_logits, temperature)
        return (temperature**2) * per_token_divergence(log_q, log_p, kind, beta=beta, alpha=alpha, lam=lam)
    s, t = crop_vocab(student_logits, teacher_logits)
    return (temperature**2) * per_token_divergence(s / temperature, t / temperature, kind, beta=beta, alpha=alpha,
                                                   lam=lam)
