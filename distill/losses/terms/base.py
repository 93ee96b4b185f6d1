"""What every loss term is: ``Term``, the normalizers it may average over (``COUNTS``), the registry
(``TERMS``, filled by ``register``) and the checks terms share against the two model configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.fused_head import RowFn
from distill.losses.schedules import schedule_value
from distill.models.architectures import attention_dims, stack_depths
from distill.models.capture import Features, Output, Request

__all__ = ["Output"]  # what a model's forward gives the terms (distill.models.capture)


@dataclass(frozen=True)
class Count:
    """A normalizer: the rows of ``index`` (a batch key holding flat indices), summed over the
    micro-batches of an optimizer step and over the ranks."""

    index: str
    gold_only: bool = False  # counted in gold micro-batches only: the terms it divides are absent on-policy


# In a fixed order: Objective.count_names lists the ones its terms use, in this order.
COUNTS: dict[str, Count] = {
    "target": Count("target_index"),  # flat indices into labels where labels != -100
    "target_gold": Count("target_index", gold_only=True),
    "source": Count("source_index"),  # flat indices into attention_mask where it is 1
    "span": Count("span_first"),  # aligned spans of a cross-tokenizer batch (distill.data.token_alignment)
}

SITE_STACK = {"encoder_self": "encoder", "decoder_self": "decoder", "decoder_cross": "decoder"}
STACK_COUNT = {"encoder": "source", "decoder": "target"}  # the tokens a stack's features are averaged over
QKV = {"q": "query", "k": "key", "v": "value"}


class Term:
    """One loss term, weighted by ``loss.w_<name>`` (with ``w_<name>_schedule`` and ``w_<name>_end``).

    Its contract is its class attributes, from which the settings derive (``distill.config.loss``) its
    weight keys, which teachers can serve it and which runs are refused before anything loads:

    * ``name``: its weight keys ``loss.w_<name>``, ``_schedule`` and ``_end``; ``default_weight``;
    * ``needs_teacher``: it reads a teacher (CE does not); ``gold_only``: skipped on-policy;
    * ``uses_logits``: a logit term (``row_values``); else a feature term (``__call__``) that reads the
      live teacher's hidden states or attention, so ``teacher.cache`` never serves it;
    * ``top_k_teacher``: a logit term whose row functions also take a ``sparse_teacher.TopK`` teacher,
      so ``teacher.cache`` can serve it; without it the term needs the teacher's dense logits and a
      cache is refused;
    * ``across_tokenizers``: a logit term that reads aligned spans (``row_values``' ``spans``), so
      ``loss.cross_tokenizer`` can serve it; without it that setting is refused. Feature terms compare
      positions and run across tokenizers only where both split every batch alike.

    A subclass sets the class attributes above and, in ``__init__`` (configs only, before any model
    loads), checks the two model configs and fills:

    * ``parts``: part name -> the ``COUNTS`` entry it is averaged over. One part named ``name``, or
      several named ``name/...`` (their sum is the term);
    * ``student_request`` / ``teacher_request``: what each model must capture;
    * ``projection_shapes``: learned maps it needs, name -> (student width, teacher width), trained
      with the student and applied by ``project`` inside the student's forward.

    A feature term's ``__call__`` returns each part's SUM over this micro-batch's rows, selected with the
    batch's flat indices (``target_index``, ``source_index``) and never read back to the host; the
    Objective divides. A logit term (``uses_logits``) instead gives ``row_values``: per part, a function
    of one chunk of both models' float32 logits at the target rows, valued per row; the Objective runs
    every logit term in one chunked pass over the two LM heads (``distill.losses.fused_head``), so no
    logits of all rows exist. The docstring says what each part averages over.
    """

    name: ClassVar[str]
    default_weight: ClassVar[float] = 0.0
    needs_teacher: ClassVar[bool] = True
    gold_only: ClassVar[bool] = False  # left out of on-policy micro-batches (no gold targets there)
    uses_logits: ClassVar[bool] = False  # a logit term: row_values, not __call__
    top_k_teacher: ClassVar[bool] = False
    across_tokenizers: ClassVar[bool] = False
    tracks_losses: bool = False  # whether step_end needs the step's losses (state such as TAID's adaptive λ)

    def __init__(self, cfg: Any, total_steps: int, student_config: Any, teacher_config: Any):
        """``cfg``: the ``loss`` settings (``distill.config.loss.LossConfig``)."""
        self.cfg, self.total_steps = cfg, total_steps
        self.parts: dict[str, str] = {}
        self.student_request = self.teacher_request = Request()
        self.projection_shapes: dict[str, tuple[int, int]] = {}

    def weight(self, step: int) -> float:
        w = self.cfg.weights[self.name]
        return schedule_value(w.schedule, w.value, w.value if w.end is None else w.end, step, self.total_steps)

    @classmethod
    def live_teacher(cls, cache: bool) -> bool:
        """Whether the term reads the teacher model itself, with or without a ``teacher.cache``."""
        return cls.needs_teacher and not (cache and cls.top_k_teacher)

    def project(self, features: Features, projections: nn.ModuleDict) -> None:
        """Apply this term's ``projection_shapes`` maps to the student's features (in place)."""

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        raise NotImplementedError

    def row_values(self, labels: Tensor, spans: Any = None) -> dict[str, RowFn]:
        """A logit term's parts, each a function (student logits, teacher logits, rows) -> value per row.
        ``labels``: the gold token of every target row; a function reads its chunk as ``labels[rows]``.
        ``spans``: across tokenizers, the ``cross_tokenizer.SpanRows`` of the batch."""
        raise NotImplementedError

    # State across steps (TAID's λ): none by default.
    def step_end(self, step: int, losses: Optional[dict[str, Tensor]]) -> None:
        pass

    def schedule_values(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


TERMS: dict[str, type[Term]] = {}


def register(cls: type[Term]) -> type[Term]:
    """Add a term class to ``TERMS`` (the order of registration is the order terms are summed and logged)."""
    if cls.name in TERMS:
        raise TypeError(f"a loss term named {cls.name!r} is registered twice")
    if not cls.name.isidentifier() or "_" in cls.name:  # w_<name>_schedule must parse back to one name
        raise TypeError(f"a loss term's name is letters and digits, got {cls.name!r}")
    TERMS[cls.name] = cls
    return cls


# ---- shared checks against the model configs ----------------------------------------------------


def stack_depths_of(student_config: Any, teacher_config: Any, stack: str, what: str) -> tuple[int, int]:
    """(student, teacher) layer counts of ``stack``; refused when either model lacks it."""
    depths = []
    for role, config in (("student", student_config), ("teacher", teacher_config)):
        found = stack_depths(config)
        if stack not in found:
            raise DistillError(f"{what} needs a {stack}, and the {role} has none")
        depths.append(found[stack])
    return depths[0], depths[1]


def qkv_width(config: Any, stack: str, kind: str) -> int:
    """Width of the concatenated queries (``q``), keys or values of ``stack``'s attention."""
    heads, kv_heads, head_dim = attention_dims(config, stack)
    return (heads if kind == "q" else kv_heads) * head_dim


def layer_request(hidden: Iterable[tuple[str, int]] = (), attention: Iterable[tuple[str, int]] = ()) -> Request:
    """A ``Request`` from (stack, hidden index) and (site, layer) pairs."""
    def group(pairs: Iterable[tuple[str, int]]) -> dict[str, tuple[int, ...]]:
        out: dict[str, set[int]] = {}
        for key, i in pairs:
            out.setdefault(key, set()).add(i)
        return {k: tuple(sorted(v)) for k, v in out.items()}
    return Request(group(hidden), group(attention))


def merge_requests(requests: Iterable[Request]) -> Request:
    """One model's request for several terms: the union of their layers."""
    requests = list(requests)
    return layer_request([(k, i) for r in requests for k, v in r.hidden.items() for i in v],
                         [(k, i) for r in requests for k, v in r.attention.items() for i in v])


def stack_index(batch: dict[str, Tensor], stack: str) -> Tensor:
    """The flat indices of the rows a stack's features are averaged over."""
    return batch[COUNTS[STACK_COUNT[stack]].index]
