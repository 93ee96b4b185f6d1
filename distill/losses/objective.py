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
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config.settings import LossConfig
from distill.errors import DistillError
from distill.data.teacher_cache import TEACHER_KEYS
from distill.data.token_alignment import TEACHER_PREFIX
from distill.losses.cross_tokenizer import MappedRows, SpanRows, continuation, mapped_rows, span_rows
from distill.losses.divergences import crop_vocab
from distill.losses.fused_head import RowFn, RowSum, Side, head_pass
from distill.losses.sparse_teacher import TopK, bucket_log_probs
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
                      if cfg.active(f"w_{cls.name}") and (has_teacher or not cls.needs_teacher)]
        # the live teacher's forward: for every teacher term the cache does not serve
        self.needs_teacher = any(term.needs_teacher and not (cache_vocab is not None and term.uses_logits)
                                 for term in self.terms)
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
        no CE term. ``agreement`` (log steps, with a teacher): ``AGREEMENT``'s sums and the row count.

        Runs inside the student's forward (``FeatureModel``'s ``loss``): every logit term and the
        agreement metrics share one chunked pass over both heads (``fused_head.head_pass``)."""
        if totals.shape != (len(self.count_names),):
            raise ValueError(f"totals {tuple(totals.shape)} must hold one count per name of {self.count_names}")
        count = {name: totals[i].clamp_min(1) for i, name in enumerate(self.count_names)}  # 0 rows: a sum of 0
        weights = self.weights()
        active = [term for term in self.terms if gold or not term.gold_only]
        labels = batch["labels"].reshape(-1).index_select(0, batch["target_index"])
        spans = self._span_rows(batch, student, teacher, labels, weights, count, active)
        parts, sums = [], []
        for term in (t for t in active if t.uses_logits):
            for part, fn in term.row_values(labels, spans).items():
                parts.append((term, part))
                sums.append(RowSum(fn, weights[term.name] / count[term.parts[part]]))
        chained = isinstance(spans, SpanRows)  # a continuation term carries ∂loss/∂log c
        if spans is not None:
            logit_teacher = spans.teacher
            if chained:
                sums.append(continuation(spans, labels, self.cfg.temperature))
        elif self.cache_vocab is not None:
            logit_teacher = TopK(**{part: batch[key] for key, part in TEACHER_KEYS.items()}, vocab=self.cache_vocab)
        else:
            logit_teacher = None if teacher is None else Side(teacher.hidden, teacher.head)
        agree = agreement and logit_teacher is not None and spans is None
        if agree:
            sums += [RowSum(fn) for fn in AGREEMENT.values()]
        terms: dict[str, Tensor] = {}
        if sums:
            total, values = head_pass(Side(student.hidden, student.head), logit_teacher, sums, self.cfg.logit_chunk_mib)
            for k, (term, part) in enumerate(parts):
                terms[part] = values[k] / count[term.parts[part]]
            if chained:  # the continuation term carries a gradient, not a value
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
        sums_agree = None
        if agree:
            n = torch.full((1,), student.hidden.shape[0], dtype=torch.float64, device=values.device)
            sums_agree = torch.cat([values[len(parts):], n])
        return total, terms, sums_agree

    def _span_rows(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output], labels: Tensor,
                   weights: dict[str, float], count: dict[str, Tensor],
                   active: list) -> Optional[SpanRows | MappedRows]:
        """Across tokenizers, with the kd term on: its per-row context (``cross_tokenizer.span_rows``, or
        ``mapped_rows`` for mined)."""
        cfg = self.cfg
        if cfg.cross_tokenizer is None or teacher is None or not any(t.name == "kd" for t in active):
            return None
        if cfg.cross_tokenizer == "mined":
            return mapped_rows(batch, Side(student.hidden, student.head), Side(teacher.hidden, teacher.head),
                               self.shared_ids)
        t_labels = batch[TEACHER_PREFIX + "labels"].reshape(-1).index_select(0, batch[TEACHER_PREFIX + "target_index"])
        return span_rows(batch, Side(student.hidden, student.head), Side(teacher.hidden, teacher.head), labels,
                         t_labels, cfg.cross_tokenizer, cfg.temperature, cfg.uld_top_k, weights["kd"] / count["span"] * cfg.uld_weight,
                         self.shared_ids, cfg.logit_chunk_mib)

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


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _shared(student_logits: Tensor, teacher: Tensor | TopK) -> tuple[Tensor, Tensor]:
    """(student logits over the shared vocabulary, the teacher's (log-)probabilities' logits there; for
    a cache, over its K + 1 buckets at temperature 1)."""
    if isinstance(teacher, TopK):
        return student_logits[:, :teacher.vocab], bucket_log_probs(student_logits, teacher, 1.0)[1]
    return crop_vocab(student_logits, teacher)


def _top1(student_logits: Tensor, teacher: Tensor | TopK, rows: slice) -> Tensor:
    if isinstance(teacher, TopK):
        best = teacher.ids.gather(1, teacher.logits.argmax(-1, keepdim=True)).squeeze(1)
        return (student_logits[:, :teacher.vocab].argmax(-1) == best).to(student_logits.dtype)
    s, t = crop_vocab(student_logits, teacher)
    return (s.argmax(-1) == t.argmax(-1)).to(s.dtype)


# Teacher-student agreement over the shared vocabulary, per target row (logged as agreement/<name>); with
# a teacher cache the teacher's entropy is over its top-K and one bucket for the rest
AGREEMENT: dict[str, RowFn] = {
    "top1": _top1,
    "teacher_entropy": lambda s, t, rows: _entropy(_shared(s, t)[1]),
    "student_entropy": lambda s, t, rows: _entropy(_shared(s, t)[0]),
}


@torch.no_grad()
def teacher_forced_sums(student: Output, labels: Tensor, row_weight: Tensor, budget_mib: Optional[float]) -> Tensor:
    """(Σ weight · NLL, Σ weight, Σ weight · [top-1 correct]) over the target rows of ``student``
    (evaluation only); ``labels`` and ``row_weight``: one per row."""
    sums = [RowSum(lambda s, t, rows: F.cross_entropy(s, labels[rows], reduction="none") * row_weight[rows]),
            RowSum(lambda s, t, rows: row_weight[rows].to(s.dtype)),
            RowSum(lambda s, t, rows: (s.argmax(-1) == labels[rows]).to(s.dtype) * row_weight[rows])]
    return head_pass(Side(student.hidden, student.head), None, sums, budget_mib)[1]
