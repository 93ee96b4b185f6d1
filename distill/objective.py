"""The interpolated distillation objective: which terms are active, their weights, and their sum.

L = w_ce * CE(gold) + w_kd * tau^2 * D(teacher || student), D chosen by ``loss.divergence``.
The trainer asks ``needs_teacher`` before running the teacher at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from distill.config import LossConfig
from distill.data import IGNORE_INDEX
from distill.losses import TaidLambda, cross_entropy, logit_divergence


class Objective:
    def __init__(self, cfg: LossConfig, total_steps: int, has_teacher: bool):
        self.cfg = cfg
        self.needs_teacher = has_teacher and cfg.w_kd > 0
        self.taid = (TaidLambda(cfg.taid_lambda_start, cfg.taid_lambda_end, total_steps, cfg.taid_schedule)
                     if self.needs_teacher and cfg.divergence == "taid" else None)

    def weights(self) -> dict[str, float]:
        w = {"ce": self.cfg.w_ce, "kd": self.cfg.w_kd if self.needs_teacher else 0.0}
        return {k: v for k, v in w.items() if v > 0}

    def schedule_values(self) -> dict[str, float]:
        """Scheduled quantities other than the weights, for logging."""
        return {"taid_lambda": self.taid.value} if self.taid is not None else {}

    def __call__(self, student_logits: Tensor, labels: Tensor,
                 teacher_logits: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, weights = self.cfg, self.weights()
        terms: dict[str, Tensor] = {}
        if "ce" in weights:
            terms["ce"] = cross_entropy(student_logits, labels, label_smoothing=cfg.label_smoothing)
        if "kd" in weights:
            terms["kd"] = logit_divergence(student_logits, teacher_logits, labels != IGNORE_INDEX,
                                           kind=cfg.divergence, temperature=cfg.temperature, beta=cfg.jsd_beta,
                                           alpha=cfg.skew_alpha, lam=self.taid.value if self.taid else 0.0)
        total = sum(weights[k] * terms[k] for k in terms)
        return total, terms

    @property
    def tracks_losses(self) -> bool:
        """Whether ``step_end`` needs each step's losses (adaptive state such as TAID's λ)."""
        return self.taid is not None

    def step_end(self, step: int, terms: dict[str, float]) -> None:
        """Advance per-step state (TAID's λ) with losses already reduced across ranks."""
        if self.taid is not None:
            self.taid.update(step, terms["kd"])

    def state_dict(self) -> dict:
        return {"taid": self.taid.state_dict()} if self.taid is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.taid is not None and "taid" in state:
            self.taid.load_state_dict(state["taid"])


@torch.no_grad()
def teacher_forced_sums(logits: Tensor, labels: Tensor, row_weight: Tensor) -> Tensor:
    """(summed NLL, token count, correct top-1) over real target tokens, rows weighted."""
    mask = labels != IGNORE_INDEX
    weight = row_weight[:, None].expand_as(labels)[mask].float()
    rows = logits[mask].float()
    target = labels[mask]
    nll = torch.nn.functional.cross_entropy(rows, target, reduction="none")
    correct = (rows.argmax(-1) == target).float()
    return torch.stack([(nll * weight).sum(), weight.sum(), (correct * weight).sum()])
