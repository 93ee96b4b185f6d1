"""The interpolated distillation objective: the scheduled, weighted sum

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

from distill.config.loss import LossConfig
from distill.errors import DistillError
from distill.losses.cross_tokenizer import continuation
from distill.losses.fused_head import RowSum, Side, head_pass
from distill.losses.metrics import agreement_row_sums, agreement_sums
from distill.losses.teacher_source import LogitTeacher, logit_teacher
from distill.losses.terms import COUNTS, TERMS, Output
from distill.losses.terms.base import merge_requests
from distill.models.capture import Features, check_capturable
from distill.models.loading import hidden_size


class Objective:
    """``cache_vocab``: the logit terms read a teacher cache of that vocabulary (``teacher.cache``): the
    batches carry its top-K rows (``TEACHER_KEYS``), and only feature terms need the live teacher
    (``teacher_config``, which may then be None)."""

    def __init__(self, cfg: LossConfig, total_steps: int, student_config: Any, teacher_config: Any = None,
                 partitioned_student: bool = False, cache_vocab: Optional[int] = None):
        self.cfg = cfg
        self.partitioned_student = partitioned_student
        self.total_steps = total_steps
        self.step = 0
        self.cache_vocab = cache_vocab
        # across tokenizers (loss.cross_tokenizer), on the device: the shared tokens' (student ids, teacher ids);
        # with mined, every mapped teacher token and its student token (SharedVocab.mined_pairs)
        self.shared_ids: Optional[tuple[Tensor, Tensor]] = None
        has_teacher = teacher_config is not None or cache_vocab is not None
        self.terms = [cls(cfg, total_steps, student_config, teacher_config) for cls in TERMS.values()
                      if cfg.weights[cls.name].active and (has_teacher or not cls.needs_teacher)]
        # the live teacher's forward: for every teacher term the cache does not serve
        self.needs_teacher = any(term.live_teacher(cache_vocab is not None) for term in self.terms)
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
                 totals: Tensor, agreement: bool = False) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
        """(weighted total, every term and part, agreement sums or None), each term this micro-batch's sum
        over its rows divided by ``totals``: ``counts`` summed over every micro-batch of the optimizer step
        and every rank, a float tensor on the batch's device ordered as ``count_names``. Parts are named
        ``term/part``. ``gold`` False: the targets are the student's own samples (on-policy), so there is
        no CE term. ``agreement`` (log steps, with a teacher): ``metrics.AGREEMENT``'s sums and the row count.

        Runs inside the student's forward (``FeatureModel``'s ``loss``): every logit term and the
        agreement metrics share one chunked pass over both heads (``fused_head.head_pass``)."""
        if totals.shape != (len(self.count_names),):
            raise ValueError(f"totals {tuple(totals.shape)} must hold one count per name of {self.count_names}")
        count = {name: totals[i].clamp_min(1) for i, name in enumerate(self.count_names)}  # 0 rows: a sum of 0
        weights = self.weights()
        active = [term for term in self.terms if gold or not term.gold_only]
        labels = batch["labels"].reshape(-1).index_select(0, batch["target_index"])
        source = self._logit_teacher(batch, student, teacher, labels, weights, count, active)
        # the logit terms' parts, then (ULD's spans) the continuation term, then the agreement metrics
        parts = [(term, part, fn) for term in active if term.uses_logits
                 for part, fn in term.row_values(labels, source.spans).items()]
        sums = [RowSum(fn, weights[term.name] / count[term.parts[part]]) for term, part, fn in parts]
        if source.chained:
            sums.append(continuation(source.spans, labels, self.cfg.temperature))
        agree = agreement and source.head is not None and source.spans is None
        if agree:
            sums += agreement_row_sums()
        terms: dict[str, Tensor] = {}
        if sums:
            total, values = head_pass(Side(student.hidden, student.head), source.head, sums, self.cfg.logit_chunk_mib)
            for k, (term, part, _) in enumerate(parts):
                terms[part] = values[k] / count[term.parts[part]]
            if source.chained:  # the continuation term carries a gradient, not a value
                total = total - values[len(parts)].to(total.dtype)
        else:
            total = student.hidden.new_zeros((), dtype=torch.float32)
        for term in (t for t in active if not t.uses_logits):
            for part, value in term(batch, student, teacher).items():
                terms[part] = value / count[term.parts[part]].to(value.dtype)
            if term.name not in terms:  # a term of several parts is its parts' sum
                terms[term.name] = sum(terms[part] for part in term.parts)
            total = total + weights[term.name] * terms[term.name]
        for term in (t for t in active if t.uses_logits and t.name not in terms):
            terms[term.name] = sum(terms[part] for part in term.parts)
        if self.partitioned_student and not any(s.coef is not None for s in sums):
            # ZeRO-3 gathers a module's weights for the backward when the gradient reaches that module's
            # output. Feature terms alone enter mid-module (Q/K/V inside an attention block), so the
            # blocks around them would miss that step; the final hidden states and the head's weight (and a
            # trainable bias: BERT's) join the graph with weight 0 so that every module takes part in the backward.
            total = total + student.head.call(lambda w, b, h: 0.0 * (h.sum() + w.sum() + (0 if b is None else b.sum())),
                                              student.hidden)
        sums_agree = agreement_sums(values[len(parts):], student.hidden.shape[0]) if agree else None
        return total, terms, sums_agree

    def _logit_teacher(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output], labels: Tensor,
                       weights: dict[str, float], count: dict[str, Tensor], active: list) -> LogitTeacher:
        """The teacher the logit terms read (``teacher_source``); across tokenizers, the spans carry the
        weight of the active term that declares ``across_tokenizers``."""
        across = next((term for term in active if term.across_tokenizers), None)
        return logit_teacher(self.cfg, batch, student, teacher, labels, None if across is None else weights[across.name],
                             count.get("span"), self.shared_ids, self.cache_vocab)

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

