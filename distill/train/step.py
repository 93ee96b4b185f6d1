"""One optimizer step: teacher forward, student forward, objective, backward, optimizer step.

``train_step`` waits on the host for nothing. The token counts the losses divide by come from tensor
shapes the collator fixed on the host; they reach the device by a non-blocking copy from pinned memory,
and their one all-reduce per step is queued before the first backward; losses, the non-finite flag and
timings stay on the device until a log step reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutput

from distill.data.collate import causal_model_inputs
from distill.data.token_alignment import teacher_view
from distill.losses.objective import Objective, Output
from distill.train.timing import PhaseTimer

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
    agreement: Optional[Tensor] = None  # metrics.AGREEMENT's sums and the rows, on the steps that log


def train_step(models: Models, objective: Objective, batches: list[dict[str, Tensor]], golds: list[bool],
               all_reduce: Callable[[Tensor], Tensor], timer: PhaseTimer, agreement: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches (``golds[i]`` False: on-policy targets, no CE)."""
    device = batches[0]["input_ids"].device
    counts = [sum(c) for c in zip(*(objective.counts(b, g) for b, g in zip(batches, golds)))]
    totals = all_reduce(counts_on(device, counts))  # the step's global counts
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


def counts_on(device: torch.device, counts: list[int]) -> Tensor:
    """Host counts as float32 on the device, copied without waiting: on CUDA from pinned memory, which
    the caching host allocator keeps from reuse until the copy has read it (a later step cannot overwrite it)."""
    pinned = device.type == "cuda"
    return torch.tensor(counts, dtype=torch.float32, pin_memory=pinned).to(device, non_blocking=pinned)


def token_counts(batch: dict[str, Tensor], encoder_decoder: bool) -> tuple[int, int]:
    """(source, target) tokens of a batch, each token counted once, from shapes alone: a decoder-only
    model reads its targets as part of its one sequence, so its source is the real tokens that are not
    targets (the prompt; for plain text, the first token of each example)."""
    real, target = batch["source_index"].numel(), batch["target_index"].numel()
    return (real, target) if encoder_decoder else (real - target, target)
