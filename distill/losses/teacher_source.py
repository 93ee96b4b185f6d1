"""Which teacher the logit terms read in a micro-batch: the live teacher's head, the top-K rows of a
teacher cache that the batch carries (``teacher.cache``), or, across tokenizers (``loss.cross_tokenizer``),
the aligned-span context of the term that declares ``across_tokenizers``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from distill.data.teacher_cache import TEACHER_KEYS
from distill.losses.cross_tokenizer import TEACHER_PREFIX, MappedRows, SpanRows, mapped_rows, span_rows
from distill.losses.fused_head import Side
from distill.losses.sparse_teacher import TopK
from distill.models.capture import Output


@dataclass
class LogitTeacher:
    """``head``: what the fused head pass reads as the teacher (None: no teacher); ``spans``: across
    tokenizers, the per-row context (``SpanRows``, or ``MappedRows`` for mined) the term reads."""

    head: Optional[Side | TopK]
    spans: Optional[SpanRows | MappedRows] = None

    @property
    def chained(self) -> bool:
        """Whether a continuation term carries ∂loss/∂log c (ULD's aligned spans)."""
        return isinstance(self.spans, SpanRows) and self.spans.chained


def logit_teacher(cfg: Any, batch: dict[str, Tensor], student: Output, teacher: Optional[Output], labels: Tensor,
                  across_weight: Optional[float], span_count: Optional[Tensor],
                  shared_ids: Optional[tuple[Tensor, Tensor]], cache_vocab: Optional[int]) -> LogitTeacher:
    """``cfg``: the loss settings; ``across_weight``: across tokenizers, the weight of the term that reads
    the spans (None: no such term is on), ``span_count`` the spans of the step; ``shared_ids``: the
    shared (or mined) token ids; ``cache_vocab``: the vocabulary of a teacher cache."""
    if cfg.cross_tokenizer is not None and teacher is not None and across_weight is not None:
        s_side, t_side = Side(student.hidden, student.head), Side(teacher.hidden, teacher.head)
        if cfg.cross_tokenizer == "mined":
            spans = mapped_rows(batch, s_side, t_side, shared_ids)
        else:
            t_labels = batch[TEACHER_PREFIX + "labels"].reshape(-1).index_select(0, batch[TEACHER_PREFIX + "target_index"])
            spans = span_rows(batch, s_side, t_side, labels, t_labels, cfg.cross_tokenizer, cfg.temperature,
                              cfg.uld_top_k, across_weight / span_count * cfg.uld_weight, shared_ids, cfg.logit_chunk_mib,
                              uld_spans=cfg.cross_tokenizer == "uld" or cfg.uld_weight > 0)
        return LogitTeacher(spans.teacher, spans)
    if cache_vocab is not None:
        return LogitTeacher(TopK(**{part: batch[key] for key, part in TEACHER_KEYS.items()}, vocab=cache_vocab))
    return LogitTeacher(None if teacher is None else Side(teacher.hidden, teacher.head))
