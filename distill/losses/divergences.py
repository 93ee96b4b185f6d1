"""Pure functions over logits: the divergences, chunked over tokens, cross-entropy, TAID's λ."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.schedules import schedule_value

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid")

TAID_MODES = ("constant", "linear", "adaptive")


def crop_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Crop the vocabulary (last) dim of both to the smaller size.

    Models often pad their embedding matrix to a multiple of 64/128; the extra rows are never real
    tokens, so dropping them leaves the shared vocabulary. Views only, no copy. Refusing genuinely
    different tokenizers is done where the tokenizers are known, not here.
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def _select_rows(a: Tensor, b: Tensor, mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    """The (N, last-dim) rows of both where ``mask`` is True (all rows when None). Selecting before
    any math means padding costs no compute and cannot leak into a result."""
    if mask is None:
        return a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if mask.shape != a.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match {what} {tuple(a.shape[:-1])}")
    mask = mask.to(device=a.device, dtype=torch.bool)
    return a[mask], b[mask]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # at least float32 (bf16/fp16 softmax over a large vocabulary is too coarse); keep float64.
    return torch.promote_types(x.dtype, torch.float32)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log q, log p) per row. The teacher is a constant target: detached here, in one place."""
    return (
        F.log_softmax(student_logits, dim=-1),
        F.log_softmax(teacher_logits.detach(), dim=-1),
    )


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per row from log-probabilities.

    Terms with a = 0 count as 0 (the 0·log 0 convention), so -inf logits give 0 instead of NaN.
    """
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(dim=-1)


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
    return _kl(log_p, log_q)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q ‖ p): mode-seeking."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return _kl(log_q, log_p)


def jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD: β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p ‖ α·p + (1−α)·q): bounded even where q ≈ 0 while p is not."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(q ‖ α·q + (1−α)·p)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def taid(student_logits: Tensor, teacher_logits: Tensor, lam: float = 0.0) -> Tensor:
    """TAID: KL(r ‖ q), r = softmax((1−λ)·sg(z_S) + λ·z_T).

    The target starts at the student's own distribution (λ=0, zero loss) and moves to the teacher
    (λ=1, forward KL); the student part of the target is stop-gradient so only q is trained.
    """
    log_q, _ = _log_probs(student_logits, teacher_logits)
    target = (1.0 - lam) * student_logits.detach() + lam * teacher_logits.detach()
    return _kl(F.log_softmax(target, dim=-1), log_q)


def _check_params(kind: str, beta: float, alpha: float, lam: float) -> None:
    # degenerate values make the loss identically 0 (β∈{0,1}, α=1): refuse rather than train on nothing
    if kind not in DIVERGENCES:
        raise DistillError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise DistillError(f"jsd beta must be in (0, 1), got {beta}")
    if kind in ("skew_kl", "skew_reverse_kl") and not 0.0 <= alpha < 1.0:
        raise DistillError(f"skew alpha must be in [0, 1), got {alpha}")
    if kind == "taid" and not 0.0 <= lam <= 1.0:
        raise DistillError(f"taid lambda must be in [0, 1], got {lam}")


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    lam: float = 0.0,
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


# Elements of one chunk's (rows × vocabulary) block: each float32 intermediate of a chunk is 4 MB.
CHUNK_ELEMENTS = 1 << 20


def logit_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    lam: float = 0.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """τ² · mean over masked tokens of the per-token divergence between softmax(z/τ) distributions.

    ``student_logits``/``teacher_logits``: (..., V) with the same leading shape (vocab sizes may
    differ by padding rows); ``mask``: (...) True on real tokens (None = all). The τ² factor keeps
    gradient magnitudes comparable across temperatures (Hinton et al.). Returns 0, still attached
    to the student's graph, when no token is selected.

    Computed over chunks of tokens (``_ChunkedDivergence``): the float32 probabilities of the two
    models exist for one chunk at a time, in the forward and the backward.
    """
    _check_params(kind, beta, alpha, lam)  # fail before any tensor work
    if not temperature > 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits differ in their leading (token) dims"
        )
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape[:-1])}")
    s = student_logits.reshape(-1, student_logits.shape[-1])  # views: nothing vocabulary-sized is copied
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    rows = (mask.reshape(-1).to(s.device).nonzero().squeeze(1) if mask is not None
            else torch.arange(s.shape[0], device=s.device))
    vocab = min(s.shape[-1], t.shape[-1])  # padding rows of an embedding matrix are no tokens

    def per_token(s_rows: Tensor, t_rows: Tensor) -> Tensor:
        return per_token_divergence(s_rows / temperature, t_rows / temperature, kind, beta=beta, alpha=alpha, lam=lam)

    chunk = max(1, chunk_elements // vocab)
    total = _ChunkedDivergence.apply(s, t, rows, vocab, chunk, per_token)
    # sum/max(n,1) rather than mean(): an empty selection gives 0 (not NaN) with the graph intact
    return (temperature**2) * total / max(rows.numel(), 1)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over ``rows`` of ``per_token(student[rows, :vocab], teacher[rows, :vocab])``, a chunk of
    rows at a time. Each chunk's gradient is taken right after its forward (one forward and one
    backward per chunk, as an unchunked loss would do) and written into one gradient buffer of the
    logits' shape and dtype; the backward only scales that buffer. So no float32 tensor larger than a
    chunk's block ever exists, and nothing is recomputed."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, vocab: int, chunk: int, per_token) -> Tensor:
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if needs_grad else None
        total = torch.zeros((), dtype=_compute_dtype(student), device=student.device)
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            s = student.index_select(0, r)[:, :vocab]
            s = s.to(_compute_dtype(s)).requires_grad_(needs_grad)
            t = teacher.index_select(0, r)[:, :vocab]
            with torch.enable_grad():
                value = per_token(s, t.to(_compute_dtype(t))).sum()
            if needs_grad:
                (g,) = torch.autograd.grad(value, s)
                grad[r, :vocab] = g.to(grad.dtype)
            total += value.detach()
        # Kept as an attribute, not saved: the backward hands the buffer itself to autograd, which can then
        # adopt it as the logits' gradient instead of copying a vocabulary-sized tensor.
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None  # once only: no retain_graph reuse
        if grad is None:
            return (None,) * 6
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Token-mean cross-entropy over labels != ignore_index (label-smoothed NLL as in torch).

    ``logits`` (..., V) and ``labels`` (...) must already be aligned (shift causal LMs first).
    Returns 0 attached to the graph, never NaN, when every label is ignored.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    if not 0.0 <= label_smoothing < 1.0:
        raise DistillError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    valid = labels != ignore_index
    # select first so padding costs nothing, then up-cast only the real rows
    rows = logits[valid]
    rows = rows.to(_compute_dtype(rows))
    total = F.cross_entropy(rows, labels[valid], reduction="sum", label_smoothing=label_smoothing)
    return total / max(rows.shape[0], 1)


class TaidLambda:
    """The TAID interpolation weight λ, stepped once per optimizer step.

    Modes: ``constant`` (λ = start), ``linear`` (start → end over total_steps), ``adaptive``
    (Shing et al. 2025, Alg. 1): with δ_n the relative drop of the loss since the previous step and
    m_n = momentum·m_{n−1} + (1−momentum)·δ_n,
        λ ← min(end, max(linear(n), λ + adaptive_rate·sigmoid(m_n)·(1−λ))).
    A fast-falling loss means the student keeps up, so the target moves on to the teacher faster;
    the linear schedule is a floor so λ always reaches ``end`` by total_steps.

    ``update(step, loss)``: ``step`` = optimizer steps completed (1 after the first), ``loss`` the
    step's distillation loss. All ranks must pass the same (reduced) loss so λ stays identical.
    """

    def __init__(
        self,
        start: float = 0.1,
        end: float = 1.0,
        total_steps: int | None = None,
        mode: str = "linear",
        momentum: float = 0.99,
        adaptive_rate: float = 5e-4,
        eps: float = 1e-8,
    ):
        if mode not in TAID_MODES:
            raise DistillError(f"unknown taid lambda mode {mode!r}; choose one of {', '.join(TAID_MODES)}")
        if not 0.0 <= start <= end <= 1.0:
            raise DistillError(f"taid lambda needs 0 <= start <= end <= 1, got start={start} end={end}")
        if mode != "constant" and (total_steps is None or total_steps <= 0):
            raise DistillError(f"taid lambda mode {mode!r} needs total_steps > 0, got {total_steps}")
        if not 0.0 <= momentum < 1.0:
            raise DistillError(f"taid momentum must be in [0, 1), got {momentum}")
        if adaptive_rate < 0:
            raise DistillError(f"taid adaptive_rate must be >= 0, got {adaptive_rate}")
        self.start, self.end, self.total_steps = float(start), float(end), total_steps
        self.mode, self.momentum, self.adaptive_rate, self.eps = mode, momentum, adaptive_rate, eps
        self._value = float(start)
        self._step = 0
        self._m = 0.0  # momentum of the relative loss change
        self._prev_loss: float | None = None

    @property
    def value(self) -> float:
        """λ to use for the next forward pass."""
        return self._value

    def update(self, step: int, loss: float | Tensor) -> float:
        """Advance λ after optimizer step ``step``; returns the new value."""
        self._step = int(step)
        if self.mode == "constant":
            return self._value
        floor = schedule_value("linear", self.start, self.end, self._step, self.total_steps)
        if self.mode == "linear":
            self._value = floor
            return self._value
        loss = float(loss)
        delta = 0.0  # no evidence on the first step, or from a non-finite loss
        if math.isfinite(loss):
            if self._prev_loss is not None:
                delta = (self._prev_loss - loss) / (abs(self._prev_loss) + self.eps)
            self._prev_loss = loss
        self._m = self.momentum * self._m + (1.0 - self.momentum) * delta
        grow = self.adaptive_rate * _sigmoid(self._m) * (1.0 - self._value)
        self._value = min(self.end, max(floor, self._value + grow))
        return self._value

    def state_dict(self) -> dict:
        return {"value": self._value, "step": self._step, "m": self._m, "prev_loss": self._prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self._value = float(state["value"])
        self._step = int(state["step"])
        self._m = float(state["m"])
        self._prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])


def _sigmoid(x: float) -> float:
    # overflow-safe for large |x| (math.exp(800) raises)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
