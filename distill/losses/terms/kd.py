"""The logit divergence (KD), with TAID's interpolation weight λ as its state."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from distill.losses.cross_tokenizer import MappedRows, SpanRows, cross_parts, mapped_row_fns, span_row_fns
from distill.losses.divergences import scaled_divergence
from distill.losses.fused_head import RowFn
from distill.losses.taid import TaidLambda
from distill.losses.terms.base import Term, register


@register
class LogitDivergence(Term):
    """``kd``: τ² · D(teacher ‖ student) between softmax(z/τ) of both models over the shared
    vocabulary (``loss.divergence``: forward/reverse KL, generalized JSD, skew KLs, TAID), a mean
    over target tokens. With ``taid`` the target interpolates towards the teacher by λ
    (``loss.taid_*``), stepped after every optimizer step on the device. With ``loss.cross_tokenizer``
    (teacher and student tokenizers differ) it is ULD, or the divergence over the shared vocabulary plus
    ULD, over aligned spans, a mean over spans; or (``mined``) the divergence to the teacher read on the
    student's vocabulary, a mean over target tokens (``distill.losses.cross_tokenizer``)."""

    name = "kd"
    uses_logits = True
    top_k_teacher = True
    across_tokenizers = True

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        mode = cfg.cross_tokenizer
        self.parts = {"kd": "target"} if mode is None else cross_parts(mode, cfg.uld_weight)
        self.taid = (TaidLambda(cfg.taid_lambda_start, cfg.taid_lambda_end, total_steps, cfg.taid_schedule)
                     if cfg.divergence == "taid" else None)
        self.tracks_losses = self.taid is not None and self.taid.adaptive

    def row_values(self, labels: Tensor, spans: Optional[SpanRows | MappedRows] = None) -> dict[str, RowFn]:
        cfg, lam = self.cfg, 0.0 if self.taid is None else self.taid.value
        if isinstance(spans, MappedRows):
            return mapped_row_fns(spans, labels, cfg.divergence, cfg.temperature, cfg.jsd_beta, cfg.skew_alpha)
        if cfg.cross_tokenizer is not None:
            return span_row_fns(spans, cfg.cross_tokenizer, cfg.divergence, cfg.temperature, cfg.uld_top_k,
                                cfg.uld_weight, cfg.jsd_beta, cfg.skew_alpha, lam)
        return {"kd": lambda s, t, rows: scaled_divergence(s, t, cfg.divergence, cfg.temperature, beta=cfg.jsd_beta,
                                                           alpha=cfg.skew_alpha, lam=lam)}

    def step_end(self, step: int, losses: Optional[dict[str, Tensor]]) -> None:
        if self.taid is not None:
            self.taid.update(step, losses["kd"] if self.tracks_losses else None)

    def schedule_values(self) -> dict[str, Any]:
        return {} if self.taid is None else {"taid_lambda": self.taid.value}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.taid is None else {"taid": self.taid.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.taid is not None and "taid" in state:
            self.taid.load_state_dict(state["taid"])
