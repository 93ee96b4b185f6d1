"""One optimizer step: teacher forward, student forward, objective, backward, optimizer step.

``train_step`` waits on the host for nothing. The token counts the losses divide by come from tensor
shapes the collator fixed on the host; their one all-reduce per step is queued before the first
backward; losses, the non-finite flag and timings stay on the device until a log step reads them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

from distill.data.collate import causal_model_inputs
from distill.data.token_alignment import teacher_view
from distill.losses.objective import Objective, Output

SEQ2SEQ_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")
ENCODER_INPUTS = ("input_ids", "attention_mask")


@dataclass
class Models:
    """The engines a step drives (DeepSpeed's, or anything with the same calls) and how to feed them."""

    student: Any  # __call__(features=, **inputs) -> (outputs, features); backward(loss); step(); get_global_grad_norm()
    teacher: Any = None
    encoder_decoder: bool = True
    packed: bool = False  # decoder-only packed rows: no 2-D mask, position ids mark the examples
    teacher_uses_student_encoder: bool = False  # distilBART: the teacher's decoder reads the student's encoder
    # Gradients are the step's global token averages: DeepSpeed averages them over ranks and accumulation
    # steps, so each micro-batch's loss is multiplied back by world size x accumulation steps.
    loss_scale: float = 1.0
    check_grad_norm: bool = True  # fp16's loss scaler overflows routinely: there only the loss counts

    encoder_only: bool = False  # a masked LM: it reads the whole (corrupted) row, bidirectionally

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        if self.encoder_decoder:
            return {**{k: batch[k] for k in SEQ2SEQ_INPUTS}, "use_cache": False}
        if self.encoder_only:
            return {k: batch[k] for k in ENCODER_INPUTS}
        return causal_model_inputs(batch, self.packed)


def forward(engine, models: Models, batch: dict[str, Tensor], loss: Optional[Callable[[Output], Any]] = None,
            **extra) -> Any:
    """The engine's ``Output`` at the batch's target rows, with features; or ``loss(output)``, computed
    inside the engine's forward (``FeatureModel``)."""
    return engine(rows=batch["target_index"], features=True, loss=loss, **models.inputs(batch), **extra)


@dataclass
class StepResult:
    """This rank's share of the step: summed over ranks, each term is the step's token average."""

    terms: dict[str, Tensor]
    nonfinite: Tensor  # 0-dim bool: the loss or the gradient norm was not finite
    source_tokens: int  # token_counts
    target_tokens: int
    agreement: Optional[Tensor] = None  # objective.AGREEMENT's sums and the rows, on the steps that log


class PhaseTimer:
    """Seconds per phase, read at log steps only: CUDA events on a GPU (recording one waits for
    nothing), the wall clock on a CPU (where an op has finished when it returns). A phase entered
    inside another pauses it: each phase's time is its own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self.open: list[list[Any]] = []  # [phase, mark it (re)started at], innermost last

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, phase: str):
        mark = self._mark()
        if self.open:
            self.spans.append((self.open[-1][0], self.open[-1][1], mark))
        self.open.append([phase, mark])
        try:
            yield
        finally:
            end = self._mark()
            name, start = self.open.pop()
            self.spans.append((name, start, end))
            if self.open:
                self.open[-1][1] = end

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (synchronizes on a GPU: call it on log steps)."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        out: dict[str, float] = {}
        for phase, a, b in self.spans:
            out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1000 if self.cuda else b - a)
        self.spans = []
        return out


def train_step(models: Models, objective: Objective, batches: list[dict[str, Tensor]], golds: list[bool],
               all_reduce: Callable[[Tensor], Tensor], timer: PhaseTimer, agreement: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches (``golds[i]`` False: on-policy targets, no CE)."""
    device = batches[0]["input_ids"].device
    counts = [sum(c) for c in zip(*(objective.counts(b, g) for b, g in zip(batches, golds)))]
    totals = all_reduce(torch.tensor(counts, dtype=torch.float32, device=device))  # the step's global counts
    terms: dict[str, Tensor] = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    agree = None
    teacher_first = objective.needs_teacher and not models.teacher_uses_student_encoder
    for batch, gold in zip(batches, golds):
        teacher = None
        if teacher_first:
            with timer("teacher"), torch.no_grad():
                teacher = forward(models.teacher, models, teacher_view(batch))

        def loss(student: Output, batch=batch, gold=gold, teacher=teacher):
            if objective.needs_teacher and teacher is None:  # distilBART: the teacher decodes the student's encoding
                encoded = BaseModelOutput(last_hidden_state=student.encoder_hidden.detach())
                with timer("teacher"), torch.no_grad():
                    teacher = forward(models.teacher, models, batch, encoder_outputs=encoded)
            with timer("loss"):
                return objective(batch, student, teacher, gold, totals, agreement)

        with timer("student"):
            total, parts, sums = forward(models.student, models, batch, loss)
            models.student.backward(total * models.loss_scale)
            models.student.step()
        nonfinite |= ~torch.isfinite(total.detach())
        for name, value in {**parts, "total": total}.items():
            terms[name] = terms[name] + value.detach() if name in terms else value.detach()
        if sums is not None:
            agree = sums if agree is None else agree + sums
    norm = models.student.get_global_grad_norm() if models.check_grad_norm else None
    if norm is not None:
        nonfinite |= ~torch.isfinite(torch.as_tensor(norm, device=device))
    source, target = (sum(n) for n in zip(*(token_counts(b, models.encoder_decoder) for b in batches)))
    return StepResult(terms, nonfinite, source, target, agree)


def token_counts(batch: dict[str, Tensor], encoder_decoder: bool) -> tuple[int, int]:
    """(source, target) tokens of a batch, each token counted once, from shapes alone: a decoder-only
    model reads its targets as part of its one sequence, so its source is the real tokens that are not
    targets (the prompt; for plain text, the first token of each example)."""
    real, target = batch["source_index"].numel(), batch["target_index"].numel()
    return (real, target) if encoder_decoder else (real - target, target)


@dataclass
class Window:
    """What the steps since the last log line add up to, kept on the device until it is read."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    on_policy: int = 0
    micro_batches: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    terms: dict[str, Tensor] = field(default_factory=dict)
    agreement: Optional[Tensor] = None

    def add(self, result: StepResult, golds: list[bool]) -> None:
        self.steps += 1
        self.micro_batches += len(golds)
        self.on_policy += golds.count(False)
        self.source_tokens += result.source_tokens
        self.target_tokens += result.target_tokens
        for name, value in result.terms.items():
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        if result.agreement is not None:
            self.agreement = result.agreement if self.agreement is None else self.agreement + result.agreement


class DivergenceWatch:
    """Counts steps in a row whose loss or gradient norm was not finite, on the device; a log step and a
    save (both sync points already) read the longest streak (agreed over ranks) and end the run when it
    reaches ``limit``. ``in_streak`` says whether the last step read was not finite: a checkpoint saved
    then must not prune the last one before the streak."""

    def __init__(self, limit: int, device: torch.device, all_reduce_max: Callable[[Tensor], Tensor],
                 last_checkpoint: Callable[[], Optional[str]]):
        self.limit, self.all_reduce_max, self.last_checkpoint = limit, all_reduce_max, last_checkpoint
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)
        self.in_streak = False

    def add(self, nonfinite: Tensor) -> None:
        self.streak = torch.where(nonfinite, self.streak + 1, torch.zeros_like(self.streak))
        self.longest = torch.maximum(self.longest, self.streak)
        self.bad += nonfinite

    def check(self, step: int, say: Callable[[str], None]) -> None:
        bad, longest, streak = self.all_reduce_max(torch.stack([self.bad, self.longest, self.streak])).tolist()
        self.in_streak = streak > 0
        self.bad.zero_()
        self.longest.copy_(self.streak)
        if bad:
            say(f"distill: {bad} steps up to step {step} had a loss or gradient norm that is not finite; DeepSpeed "
                f"skipped their updates (the longest run of them: {longest}, training.max_nonfinite_steps={self.limit})")
        if longest >= self.limit:
            from distill.errors import DistillError

            raise DistillError(f"training diverged: the loss or gradient norm was not finite for {longest} steps in a "
                               f"row, up to step {step}; the last finite checkpoint is {self.last_checkpoint() or 'none'}"
                               " (lower training.learning_rate, or raise training.max_nonfinite_steps)")
