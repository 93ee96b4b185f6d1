"""The interpolated distillation objective (methods.md section 4): the scheduled, weighted sum

    L = Σ_X w_X(step) · L_X      over the active terms X of ``distill.losses.terms``

(ce, kd, hid, attn, rel, mse). ``Objective`` is built from the loss settings and the two models'
configs alone, so every term checks its layer maps, head counts and widths before a model loads; it
gathers what the terms ask each model to capture, their learned projections and their state.

Normalization. A term's value is its SUM over this micro-batch's rows divided by a global count (the
terms declare which: ``count_names``), so the values of all micro-batches of an optimizer step and all
ranks add up to the step's average, whatever the split: a micro-batch with one target token weighs
1/N of the step, not 1/k. Nothing in the loss path reads a tensor back to the host.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from distill.config.settings import LossConfig
from distill.data.collate import IGNORE_INDEX
from distill.errors import DistillError
from distill.losses.terms import COUNTS, TERMS, Output
from distill.losses.terms.base import merge_requests
from distill.models.capture import Features, check_capturable
from distill.models.loading import hidden_size


class Objective:
    def __init__(self, cfg: LossConfig, total_steps: int, student_config: Any, teacher_config: Any = None,
                 partitioned_student: bool = False):
        self.cfg = cfg
        self.partitioned_student = partitioned_student
        self.total_steps = total_steps
        self.step = 0
        self.terms = [cls(cfg, total_steps, student_config, teacher_config) for cls in TERMS.values()
                      if cfg.active(f"w_{cls.name}") and (teacher_config is not None or not cls.needs_teacher)]
        self.needs_teacher = any(term.needs_teacher for term in self.terms)
        self.student_request = merge_requests(term.student_request for term in self.terms)
        self.teacher_request = merge_requests(term.teacher_request for term in self.terms)
        if self.needs_teacher:
            check_capturable(student_config, self.student_request, "student")
            check_capturable(teacher_config, self.teacher_request, "teacher")
            if cfg.teacher_uses_student_encoder:
                self._check_shared_encoder(student_config, teacher_config)
        self.projection_shapes = {k: v for term in self.terms for k, v in term.projection_shapes.items()}
        used = {count for term in self.terms for count in term.parts.values()}
        self.count_names: tuple[str, ...] = tuple(name for name in COUNTS if name in used)

    def _check_shared_encoder(self, s_config: Any, t_config: Any) -> None:
        d_s, d_t = hidden_size(s_config), hidden_size(t_config)
        if not (s_config.is_encoder_decoder and t_config.is_encoder_decoder) or d_s != d_t:
            raise DistillError("loss.teacher_uses_student_encoder needs two encoder-decoder models of the same "
                               f"hidden size (student {d_s}, teacher {d_t})")
        if self.teacher_request.hidden.get("encoder") or self.teacher_request.attention.get("encoder_self"):
            raise DistillError("loss.teacher_uses_student_encoder skips the teacher's encoder, so no encoder "
                               "feature loss can be computed; drop the encoder from the feature terms")

    @property
    def captures_attention(self) -> bool:
        return any(self.student_request.attention.values()) or any(self.teacher_request.attention.values())

    # ---- projections (trained with the student, never exported) ---------------------------------

    def build_projections(self, dtype: torch.dtype) -> nn.ModuleDict:
        return nn.ModuleDict({name: nn.Linear(i, o, bias=False, dtype=dtype)
                              for name, (i, o) in self.projection_shapes.items()})

    def project(self, features: Features, projections: nn.ModuleDict) -> Features:
        """Map the student's features to the teacher's widths; runs inside the student's forward."""
        for term in self.terms:
            term.project(features, projections)
        return features

    # ---- the loss ------------------------------------------------------------------------------

    def counts(self, batch: dict[str, Tensor], gold: bool) -> list[int]:
        """This micro-batch's share of each of ``count_names``, from index shapes alone (no host sync)."""
        return [0 if COUNTS[name].gold_only and not gold else batch[COUNTS[name].index].numel()
                for name in self.count_names]

    def weights(self) -> dict[str, float]:
        """Every active term's weight at the current step."""
        return {term.name: term.weight(self.step) for term in self.terms}

    def schedule_values(self) -> dict[str, float | Tensor]:
        """Scheduled quantities other than the weights, for logging (TAID's λ: a device tensor)."""
        return {k: v for term in self.terms for k, v in term.schedule_values().items()}

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output], gold: bool,
                 totals: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, every term and part), each this micro-batch's sum over its rows divided by
        ``totals``: ``counts`` summed over every micro-batch of the optimizer step and every rank, a
        float tensor on the batch's device ordered as ``count_names``. Parts are named ``term/part``.
        ``gold`` False: the targets are the student's own samples (on-policy), so there is no CE term."""
        if totals.shape != (len(self.count_names),):
            raise ValueError(f"totals {tuple(totals.shape)} must hold one count per name of {self.count_names}")
        count = {name: totals[i].clamp_min(1) for i, name in enumerate(self.count_names)}  # 0 rows: a sum of 0
        weights = self.weights()
        terms: dict[str, Tensor] = {}
        weighted = []
        for term in self.terms:
            if term.gold_only and not gold:
                continue
            sums = term(batch, student, teacher)
            for part, value in sums.items():
                terms[part] = value / count[term.parts[part]].to(value.dtype)
            if term.name not in terms:  # a term of several parts is their sum
                terms[term.name] = sum(terms[part] for part in sums)
            weighted.append((term, weights[term.name] * terms[term.name]))
        total = sum(w for _, w in weighted)
        if self.partitioned_student and not any(term.uses_logits for term, _ in weighted):
            # ZeRO-3 gathers a module's weights for the backward when the gradient reaches that module's
            # output. Feature terms alone enter mid-module (Q/K/V inside an attention block), so the
            # blocks around them would miss that step; the logits join the graph with weight 0 so that
            # every module's output takes part in the backward (at the cost of a full backward).
            total = total + 0.0 * student.logits.sum()
        return total, terms

    # ---- state across steps --------------------------------------------------------------------

    @property
    def tracks_losses(self) -> bool:
        """Whether ``step_end`` needs each step's losses (adaptive state such as TAID's λ)."""
        return any(term.tracks_losses for term in self.terms)

    def step_end(self, step: int, losses: Optional[dict[str, Tensor]] = None) -> None:
        """Advance the weight schedules, and the terms' state. ``losses``: the step's terms (each summed
        over its micro-batches and ranks, so the step's averages), device tensors: never read on the host."""
        self.step = step
        for term in self.terms:
            term.step_end(step, losses)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"step": self.step}
        for term in self.terms:
            state.update(term.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        for term in self.terms:
            term.load_state_dict(state)


@torch.no_grad()
def teacher_forced_sums(logits: Tensor, labels: Tensor, row_weight: Tensor) -> Tensor:
    """(summed NLL, token count, correct top-1) over real target tokens, rows weighted (evaluation only)."""
    mask = labels != IGNORE_INDEX
    weight = row_weight[:, None].expand_as(labels)[mask].float()
    rows = logits[mask].float()
    target = labels[mask]
    nll = torch.nn.functional.cross_entropy(rows, target, reduction="none")
    correct = (rows.argmax(-1) == target).float()
    return torch.stack([(nll * weight).sum(), weight.sum(), (correct * weight).sum()])
