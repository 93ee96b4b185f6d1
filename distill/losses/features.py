"""Pure functions over features: hidden-state distances, attention and relation distributions
and their KL, computed a slice of query rows at a time.

Like the logit losses, each loss is a SUM over the rows (tokens) given as a LongTensor of flat
indices, with no host sync; the caller divides by a count.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.divergences import CHUNK_ELEMENTS, compute_dtype, kl_rows, select_rows

HiddenMetric = Literal["mse", "cosine"]

HIDDEN_METRICS: tuple[str, ...] = get_args(HiddenMetric)


def _common_dtype(*xs: Tensor) -> torch.dtype:
    # the widest of the inputs, and at least float32 (a bf16 teacher next to an fp32 student)
    dtype = compute_dtype(xs[0])
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def hidden_distance(
    student: Tensor, teacher: Tensor, index: Optional[Tensor], metric: str = "mse", normalize: bool = False
) -> Tensor:
    """Σ over the tokens ``index`` of the distance between student and teacher hidden states.

    ``student``/``teacher``: (B, T, d), the student already projected to the teacher's width;
    ``index``: flat indices into (B, T) of real tokens (None = all). Per token, ``mse`` = Σ_d (s − t)² / d
    and ``cosine`` = 1 − cos(s, t). ``normalize`` layer-norms both over d (no affine) first
    (as the distillation code of Shleifer & Rush 2020 does with normalize_hidden), so the loss ignores each layer's scale and offset, which
    differ between teacher and student. Returns 0, still attached to the graph, when no token
    is selected.
    """
    if metric not in HIDDEN_METRICS:
        raise DistillError(f"unknown hidden metric {metric!r}; choose one of {', '.join(HIDDEN_METRICS)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states differ; "
            "project the student to the teacher's width first"
        )
    d = student.shape[-1]
    s, t = select_rows(student, index), select_rows(teacher.detach(), index)  # the teacher: a constant target
    dtype = _common_dtype(s, t)
    s, t = s.to(dtype), t.to(dtype)
    if normalize:
        s = F.layer_norm(s, (d,), eps=1e-5)
        t = F.layer_norm(t, (d,), eps=1e-5)
    if metric == "mse":
        return (s - t).pow(2).sum() / d
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).sum()


def _masked_log_softmax(scores: Tensor, keep: Tensor | None) -> Tensor:
    """log-softmax over the last dim with disallowed entries set to finfo.min, never NaN.

    finfo.min rather than -inf: a row with no allowed entry then comes out uniform and finite
    instead of NaN (−inf − (−inf)), and the disallowed entries get probability exactly 0.
    """
    if keep is not None:
        try:
            shape = torch.broadcast_shapes(keep.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(f"keep {tuple(keep.shape)} does not broadcast to scores {tuple(scores.shape)}")
        keep = keep.to(device=scores.device, dtype=torch.bool)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_log_probs(
    query: Tensor,
    key: Tensor,
    keep: Tensor | None,
    scaling: float | None = None,
    position_bias: Tensor | None = None,
) -> Tensor:
    """log softmax(Q·Kᵀ·scaling + bias) over keys: the attention map an eager HF model computes.

    ``query`` (B, H, Tq, d), ``key`` (B, Hkv, Tk, d) with H a multiple of Hkv (grouped-query
    attention: kv head j serves query heads j·g … j·g+g−1, as transformers' ``repeat_kv``);
    ``scaling`` None = d^−½; ``position_bias`` additive, broadcastable to (B, H, Tq, Tk);
    ``keep`` bool, broadcastable to (B, H, Tq, Tk), True where the query may attend the key
    (None = all). Computed in float32 at least, so the maps of a bf16 teacher and student compare
    without rounding noise. Disallowed entries are ≈ finfo.min, never NaN (see
    ``_masked_log_softmax``). Returns (B, H, Tq, Tk). Nothing is detached: used for both sides.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must both be (B, heads, T, d)")
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    if key.shape[0] != b or key.shape[-1] != d:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or head size")
    if h_kv == 0 or h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key-value heads ({h_kv})")
    dtype = _common_dtype(query, key)
    q, k = query.to(dtype), key.to(dtype)
    if h_kv != h:
        k = k.repeat_interleave(h // h_kv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5 if scaling is None else scaling)
    if position_bias is not None:
        # clamp: a bias that already holds -inf or finfo.min (an HF additive mask) must not leave a
        # row of -inf, which log_softmax turns into NaN
        scores = (scores + position_bias.to(device=scores.device, dtype=dtype)).clamp_min(torch.finfo(dtype).min)
    return _masked_log_softmax(scores, keep)


def relation_log_probs(x: Tensor, heads: int, keep: Tensor | None, rows: slice | None = None) -> Tensor:
    """MiniLMv2 self-attention relation: log softmax(x_a·x_aᵀ / √d_r) per relation head.

    ``x`` (B, T, W): one layer's queries (or keys, or values) with all attention heads
    concatenated. The width is re-split into ``heads`` relation heads of d_r = W / heads, so a
    teacher and a student with different head counts and widths give maps of the same shape
    (B, heads, T, T). ``keep`` bool, broadcastable to (B, heads, T, T); masking as in
    ``attention_log_probs``. ``rows`` limits the query positions (the map's third dim) to a slice,
    for chunking; ``keep`` then covers all rows. Nothing is detached: used for both sides.
    """
    if x.dim() != 3:
        raise ValueError(f"relation input {tuple(x.shape)} must be (B, T, W)")
    b, t, w = x.shape
    if heads <= 0 or w % heads:
        raise DistillError(f"the relation heads ({heads}) must divide the width W={w}")
    d_r = w // heads
    xa = x.to(compute_dtype(x)).reshape(b, t, heads, d_r).transpose(1, 2)
    queries = xa if rows is None else xa[:, :, rows]
    scores = torch.matmul(queries, xa.transpose(-1, -2)) / math.sqrt(d_r)
    return _masked_log_softmax(scores, row_slice(keep, rows))


def common_keep(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Where both models may attend (None: everywhere). A relation compares the same key positions on
    both sides, so a sliding-window layer of one model against a full layer of the other (ModernBERT,
    Qwen2) is compared inside the window, and no key has probability 0 on one side only (an infinite KL)."""
    return b if a is None else a if b is None else a & b


def row_slice(x: Tensor | None, rows: slice | None) -> Tensor | None:
    """The query rows ``rows`` of a mask or bias broadcastable to (..., Tq, Tk); a broadcast row stays."""
    return x if x is None or rows is None or x.shape[-2] == 1 else x[..., rows, :]


def concat_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H·d), head-major along the width: the layout a model's q/k/v_proj emits."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, heads, T, d), got {tuple(x.shape)}")
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def row_mask(index: Optional[Tensor], b: int, t: int, device: torch.device) -> Optional[Tensor]:
    """(B, T) bool, True at the flat indices ``index`` (None stays None: every row). A scatter, not a
    boolean selection: nothing waits for the device to learn how many rows there are."""
    if index is None:
        return None
    return torch.zeros(b * t, dtype=torch.bool, device=device).index_fill_(0, index.to(device), True).view(b, t)


def distribution_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, index: Optional[Tensor]) -> Tensor:
    """Σ over the query rows ``index`` of KL(teacher ‖ student) averaged over the A heads.

    Inputs (B, A, Tq, Tk) log-probabilities over the last dim; ``index`` flat indices into (B, Tq) of
    real query rows (None = all). Per row, 1/A · Σ_heads KL is MiniLM's/MiniLMv2's normalisation.
    Entries with p_T = 0 count 0, so masked keys (-inf or finfo.min on both sides) give neither NaN
    nor inf. Returns 0, still attached to the graph, when no row is selected.
    """
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"student {tuple(student_log_probs.shape)} and teacher {tuple(teacher_log_probs.shape)} "
            "attention distributions differ in shape"
        )
    if student_log_probs.dim() != 4:
        raise ValueError(f"expected (B, heads, Tq, Tk) log-probabilities, got {tuple(student_log_probs.shape)}")
    b, a, tq, _ = student_log_probs.shape
    rows = row_mask(index, b, tq, student_log_probs.device)
    return _map_kl_sum(student_log_probs, teacher_log_probs, rows) / a


def _map_kl_sum(student_log_probs: Tensor, teacher_log_probs: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Sum of KL(teacher ‖ student) over heads and the rows (B, Tq) True in ``rows`` (None = all) of
    (B, A, Tq, Tk) maps. Other rows are computed but replaced by 0 (``where``, not a product: a NaN
    there cannot leak, and their gradient is exactly 0)."""
    dtype = _common_dtype(student_log_probs, teacher_log_probs)
    per_row = kl_rows(teacher_log_probs.detach().to(dtype), student_log_probs.to(dtype)).sum(1)  # the teacher: constant
    if rows is not None:
        per_row = torch.where(rows.to(per_row.device), per_row, 0.0)
    return per_row.sum()


def map_kl(student_maps, teacher_maps, student_inputs: tuple[Tensor, ...], index: Optional[Tensor], n_query: int,
           chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``distribution_kl`` of two families of (B, A, Tq, Tk) maps, built and compared a slice of
    query rows at a time, so only one slice of each map exists at once, in the forward and the
    backward (attention maps and MiniLMv2 relations are Tq × Tk per head).

    ``student_maps(inputs, rows_slice)`` builds the student's log-probabilities for those rows from
    ``student_inputs`` (the tensors the gradient flows to); ``teacher_maps(rows_slice)`` the
    teacher's. ``index`` flat indices into (B, n_query) of real query rows (None = all).
    """
    probe = teacher_maps(slice(0, 1))
    b, a, _, tk = probe.shape
    rows = row_mask(index, b, n_query, probe.device)
    chunk = max(1, chunk_elements // max(b * a * tk, 1))
    return _ChunkedMapKL.apply(student_maps, teacher_maps, rows, n_query, chunk, *student_inputs) / a


class _ChunkedMapKL(torch.autograd.Function):
    """Sum of ``_map_kl_sum`` over query-row chunks; like ``_ChunkedRows``, each chunk's gradient
    (towards every student input: a row of a map depends on all keys) is taken right after its
    forward and summed into buffers the backward only scales."""

    @staticmethod
    def forward(ctx, student_maps, teacher_maps, rows, n_query: int, chunk: int, *inputs: Tensor) -> Tensor:
        wanted = [x.requires_grad for x in inputs]
        leaves = tuple(x.detach().requires_grad_(w) for x, w in zip(inputs, wanted))
        grads = [torch.zeros_like(x) if w else None for x, w in zip(inputs, wanted)]
        total = None
        for start in range(0, n_query, chunk):
            sl = slice(start, min(start + chunk, n_query))
            with torch.no_grad():
                teacher = teacher_maps(sl)
            with torch.enable_grad():
                value = _map_kl_sum(student_maps(leaves, sl), teacher, None if rows is None else rows[:, sl])
            if any(wanted):
                found = torch.autograd.grad(value, [x for x, w in zip(leaves, wanted) if w], allow_unused=True)
                it = iter(found)
                for i, w in enumerate(wanted):
                    g = next(it) if w else None
                    if g is not None:
                        grads[i] += g
            total = value.detach() if total is None else total + value.detach()
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads, ctx.grads = ctx.grads, None
        return (None,) * 5 + tuple(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads)
