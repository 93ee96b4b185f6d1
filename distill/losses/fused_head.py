"""Every logit consumer in one pass over the LM heads, a chunk of rows at a time: no tensor of all rows ×
vocabulary exists for either model, in the forward or the backward.

The objective hands over each model's final hidden states at the target rows and its ``Head``, plus a
list of ``RowSum``: a function of one chunk's float32 logits (student, teacher) giving a value per row,
and the coefficient it enters the training loss with (None: a metric, not differentiated). For each
chunk the student's and teacher's logits are computed from the hidden rows, every function runs, and
the gradient of the chunk's weighted sum is taken at once and pushed through the head by hand: into the
hidden rows (``g @ W``) and, accumulated chunk by chunk, into the head's weight (``gᵀ @ h``) and bias.
The backward then only scales these buffers. The teacher's chunk never needs a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from distill.losses.sparse_teacher import TopK
from distill.models.lm_head import Head

# (student logits, teacher logits (or a cached teacher's top-K) or None, the chunk's rows) -> (rows,) values;
# logits are float32 or wider
RowFn = Callable[[Tensor, Optional[Tensor | TopK], slice], Tensor]

# float32 vocabulary-wide tensors alive at once per row and model at the peak of a chunk (both models'
# logits before and after the soft cap, log-softmax, probabilities, a divergence's pointwise terms and
# the gradient): measured by benchmarks/fused_head.py --budget-sweep, see BENCHMARKS.md
LIVE_ROW_TENSORS = 6

# Elements of the sub-chunks the row functions run over on CPU. A chunk's logits are made and its gradient
# pushed through the head in a few large matmuls, but the divergences' dozen elementwise passes run over
# slices of it that fit in the CPU's cache: over a whole chunk of hundreds of rows × 128k they are bound by
# memory bandwidth (BENCHMARKS.md). Then a chunk holds only its logits (``row_bytes``). A
# GPU runs them over the whole chunk (one kernel each).
SUB_CHUNK_ELEMENTS = {"cpu": 1 << 20}


@dataclass
class RowSum:
    fn: RowFn
    coef: Optional[Tensor | float] = None  # weight in the differentiated total; None: reported only
    out: Optional[Tensor] = None  # (rows,) where the pass also stores each row's value, detached


@dataclass
class Side:
    """One model's part of the pass: its hidden states at the target rows and its head."""

    hidden: Tensor  # (N, d)
    head: Head


# loss.logit_chunk_mib when unset, by device: on CPU the fastest of a sweep (BENCHMARKS.md); on a GPU, a few
# hundred rows at a 128k vocabulary (170 for two models, 340 for CE alone), near Liger-Kernel's 256; the GPU
# check sweeps it
DEFAULT_CHUNK_MIB = {"cpu": 256.0, "cuda": 1024.0}


# weight rows per matmul of a chunk's logits on CPU: a CPU GEMM repacks its whole weight operand on every
# call, so a chunk of a few hundred rows against a 128k × 4096 head ran at half the speed of the same
# arithmetic over all rows; a block of 1024 rows stays in cache and runs at full speed (BENCHMARKS.md).
# GPUs take the whole weight in one call.
VOCAB_BLOCK = {"cpu": 1024}


def chunk_budget(budget_mib: Optional[float], device: torch.device) -> float:
    return budget_mib if budget_mib is not None else DEFAULT_CHUNK_MIB.get(device.type, DEFAULT_CHUNK_MIB["cuda"])


def row_bytes(vocab_sizes: Sequence[int], device: torch.device) -> int:
    """Bytes of working set per row of a chunk: the float32 intermediates of every model's logits, or, with
    sub-chunks, the logits of each model (the student's gradient overwrites its logits)."""
    if device.type in SUB_CHUNK_ELEMENTS:
        return 4 * sum(vocab_sizes)
    return LIVE_ROW_TENSORS * 4 * sum(vocab_sizes)


def rows_per_chunk(budget_mib: float, vocab_sizes: Sequence[int], device: torch.device) -> int:
    """Rows per chunk such that the chunk's working set stays within ``budget_mib``."""
    return max(1, int(budget_mib * 2**20) // row_bytes(vocab_sizes, device))


def head_pass(student: Side, teacher: Optional[Side | TopK], sums: Sequence[RowSum],
              budget_mib: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(Σ_k coef_k · Σ_rows fn_k, differentiable towards the student's hidden rows and head; the vector of
    Σ_rows fn_k over every k, float64, detached). Rows are ``student.hidden``'s; the teacher (a model's
    hidden rows and head, or a cache's top-K) has the same rows. Both heads' weights are gathered for the
    pass when ZeRO-3 partitions them (``Head.call``). ``budget_mib``: ``loss.logit_chunk_mib`` (None: the
    device's default)."""
    rows = None if teacher is None else teacher.hidden.shape[0] if isinstance(teacher, Side) else teacher.lse.shape[0]
    if rows is not None and rows != student.hidden.shape[0]:
        raise ValueError(f"student ({student.hidden.shape[0]}) and teacher ({rows}) rows differ")
    vocabs = [student.head.vocab] + ([] if teacher is None else
                                     [teacher.head.vocab if isinstance(teacher, Side) else teacher.vocab])
    device = student.hidden.device
    chunk = rows_per_chunk(chunk_budget(budget_mib, device), vocabs, device)

    def run(weight: Tensor, bias: Optional[Tensor], hidden: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(teacher, Side):
            return _HeadPass.apply(hidden, weight, bias, None, None, None, (student.head, teacher, sums, chunk))
        with teacher.head.weights() as (t_weight, t_bias):
            return _HeadPass.apply(hidden, weight, bias, teacher.hidden.detach(), t_weight, t_bias,
                                   (student.head, teacher.head, sums, chunk))

    return student.head.call(run, student.hidden)


@torch.no_grad()
def row_values(student: Side, teacher: Optional[Side], fn: RowFn, budget_mib: Optional[float] = None,
               own_forward: bool = True) -> Tensor:
    """``fn``'s value at every row (float32 or wider), without gradient, in one chunked pass. The first
    side's head runs as its module (``Head.call``: inside that model's engine forward) or, with
    ``own_forward`` False, is read through ``Head.weights`` like the teacher's."""
    out = torch.zeros(student.hidden.shape[0], dtype=torch.promote_types(student.hidden.dtype, torch.float32),
                      device=student.hidden.device)
    vocabs = [student.head.vocab] + ([] if teacher is None else [teacher.head.vocab])
    chunk = rows_per_chunk(chunk_budget(budget_mib, out.device), vocabs, out.device)
    spec = (student.head, None if teacher is None else teacher.head, [RowSum(fn, out=out)], chunk)

    def run(weight: Tensor, bias: Optional[Tensor], hidden: Tensor) -> Tensor:
        if teacher is None:
            _HeadPass.apply(hidden, weight, bias, None, None, None, spec)
        else:
            with teacher.head.weights() as (t_weight, t_bias):
                _HeadPass.apply(hidden, weight, bias, teacher.hidden, t_weight, t_bias, spec)
        return out

    if own_forward:
        return student.head.call(run, student.hidden)
    with student.head.weights() as (weight, bias):
        return run(weight, bias, student.hidden)


def _row_sum(item: RowSum, s: Tensor, t: Optional[Tensor | TopK], rows: slice) -> Tensor:
    value = item.fn(s, t, rows)
    if item.out is not None:
        item.out[rows] = value.detach().to(item.out.dtype)
    return value.sum()


class _HeadPass(torch.autograd.Function):
    """See the module docstring. Gradients are computed inside the forward, chunk by chunk (one forward
    and one backward per chunk, as the unfused loss does in total), so nothing is recomputed. Within a
    chunk the row functions run a sub-chunk at a time (``SUB_CHUNK_ELEMENTS``)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_hidden: Optional[Tensor],
                t_weight: Optional[Tensor], t_bias: Optional[Tensor], spec) -> tuple[Tensor, Tensor]:
        head, t_head, sums, chunk = spec
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        differentiable = (need_h or need_w or need_b) and any(s.coef is not None for s in sums)
        grad_h = torch.zeros_like(hidden) if need_h and differentiable else None
        grad_w = None  # the first chunk's product, then accumulated: no zeroing pass over V × d
        grad_b = torch.zeros_like(bias) if need_b and differentiable else None
        compute = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        values = torch.zeros(len(sums), dtype=torch.float64, device=hidden.device)
        device = hidden.device.type
        block = VOCAB_BLOCK.get(device)
        sub = chunk if device not in SUB_CHUNK_ELEMENTS else max(1, SUB_CHUNK_ELEMENTS[device] // weight.shape[0])
        # one buffer per model for every chunk's logits, the student's then holding the chunk's gradient: on CPU
        # a fresh chunk-sized tensor is fresh pages, faulted in again for every chunk
        z_buf = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=weight.dtype)
        t_buf = t_hidden.new_empty(z_buf.shape[0], t_weight.shape[0], dtype=t_weight.dtype) \
            if isinstance(t_head, Head) else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, min(start + chunk, hidden.shape[0]))
            h = hidden[rows]
            z_rows = head.linear(h, weight, bias, block, out=z_buf[:h.shape[0]])
            if isinstance(t_head, Head):
                t_rows = t_head.linear(t_hidden[rows], t_weight, t_bias, block, out=t_buf[:h.shape[0]])
            else:  # a cached teacher's rows, or none
                t_rows = None if t_head is None else t_head[rows]
            for a in range(0, z_rows.shape[0], sub):
                part, absolute = slice(a, a + sub), slice(start + a, min(start + a + sub, rows.stop))
                z = z_rows[part].to(compute).requires_grad_(differentiable)
                t = t_head.cap(t_rows[part].to(compute)) if isinstance(t_head, Head) else \
                    None if t_rows is None else t_rows[part]
                with torch.enable_grad():
                    s = head.cap(z)
                    part_sums = torch.stack([_row_sum(item, s, t, absolute) for item in sums]) if sums else \
                        z.new_zeros(0)
                    weighted = sum((item.coef * part_sums[k] for k, item in enumerate(sums) if item.coef is not None),
                                   start=torch.zeros((), dtype=compute, device=z.device))
                if differentiable:  # the gradient replaces the logits it came from, which nothing reads again
                    z_rows[part] = torch.autograd.grad(weighted, z)[0]
                total += weighted.detach()
                values += part_sums.detach().double()
            if differentiable:
                g_rows = z_rows
                if grad_h is not None:
                    torch.mm(g_rows, weight, out=grad_h[rows])
                    if head.scale != 1.0:
                        grad_h[rows] *= head.scale
                if need_w:  # accumulated in the weight's dtype, as the model's own head would hold it
                    h_scaled = h * head.scale if head.scale != 1.0 else h
                    grad_w = g_rows.t() @ h_scaled if grad_w is None else grad_w.addmm_(g_rows.t(), h_scaled)
                if grad_b is not None:
                    grad_b += g_rows.sum(0)
        if need_w and differentiable and grad_w is None:  # no rows
            grad_w = torch.zeros_like(weight)
        # attributes, not saved tensors: the backward hands the buffers themselves to autograd
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_values: Tensor):
        grads, ctx.grads = ctx.grads, (None, None, None)  # once only: no retain_graph reuse
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None)
