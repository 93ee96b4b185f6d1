"""The ``loss`` settings: each registered term's weight, the terms' own settings, and what the terms'
contracts (``distill.losses.terms.base.Term``) refuse about the teacher a run gives them.

A term's weight keys come from the registry: ``loss.w_<name>`` (its value at step 0), with
``loss.w_<name>_schedule`` linear or cosine it moves to ``loss.w_<name>_end`` by the last step. A
newly registered term has its keys with no edit here.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from distill.config.checks import nonempty, positive
from distill.errors import DistillError
from distill.losses.divergences import Divergence
from distill.losses.features import HiddenMetric
from distill.losses.schedules import Schedule
from distill.losses.taid import TaidMode
from distill.losses.terms import TERMS

CrossTokenizer = Literal["uld", "hybrid", "mined"]

Site = Literal["encoder_self", "decoder_self", "decoder_cross"]

HiddenMap = Literal["copied", "supervise_forward", "last", "uniform", "uniform_consecutive", "uniform_last", "custom"]


@dataclass
class TermWeight:
    """One term's weight: ``value`` at step 0, moved by ``schedule`` to ``end`` by the last step."""

    value: float = 0.0
    schedule: Schedule = "constant"
    end: Optional[float] = None

    @property
    def active(self) -> bool:
        """Whether the weight is above 0 at some step."""
        return max(self.value, self.end or 0.0) > 0


# a weight key's suffix -> the TermWeight field it sets, in the order the keys are listed
_PARTS = {"": "value", "_schedule": "schedule", "_end": "end"}


def weight_keys() -> dict[str, tuple[str, str]]:
    """Every registered term's weight keys -> (term name, ``TermWeight`` field): the values, then the
    schedules, then the ends, each in the registry's order."""
    return {f"w_{name}{suffix}": (name, part) for suffix, part in _PARTS.items() for name in TERMS}


def _weight_hints() -> dict[str, Any]:
    hints = typing.get_type_hints(TermWeight)
    return {key: hints[part] for key, (_, part) in weight_keys().items()}


@dataclass
class HiddenLossConfig:
    """Hidden-state matching (Shleifer & Rush 2020; Udagawa et al. 2023): which stacks, layer pairs, distance."""

    map: HiddenMap = "copied"
    teacher_layers: Optional[list[int]] = None  # map=custom: 0-based teacher layer per student layer
    stacks: list[Literal["encoder", "decoder"]] = field(default_factory=lambda: ["encoder", "decoder"])
    metric: HiddenMetric = "mse"
    normalize: bool = False  # layer-norm both hidden states (no affine) before the distance
    projection: bool = False  # learned linear map student width -> teacher width (dropped at export)

    def validate(self, prefix: str) -> None:
        if (self.map == "custom") != (self.teacher_layers is not None):
            raise DistillError(f"{prefix}.teacher_layers is set exactly when {prefix}.map is 'custom'")
        nonempty(self, prefix, "stacks")


@dataclass
class AttentionLossConfig:
    """MiniLM / MiniEnD attention distributions: KL(teacher ‖ student) per head at one layer per site."""

    sites: list[Site] = field(default_factory=lambda: ["encoder_self", "decoder_self", "decoder_cross"])
    student_layer: int = -1  # 0-based, negative from the end
    teacher_layer: int = -1

    def validate(self, prefix: str) -> None:
        nonempty(self, prefix, "sites")


@dataclass
class RelationLossConfig:
    """MiniLMv2 Q-Q/K-K/V-V self-attention relations (metric kl), or DirectMiniLM (metric mse)."""

    sites: list[Literal["encoder_self", "decoder_self"]] = field(default_factory=lambda: ["encoder_self"])
    kinds: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "k", "v"])
    heads: int = 32  # relation heads A_r; must divide both models' Q/K/V widths
    student_layer: int = -1
    teacher_layer: int = -2  # upper-middle works better than the last for large teachers
    metric: Literal["kl", "mse"] = "kl"
    projection: bool = False  # mse only: learned map of the student's Q/K/V to the teacher's width

    def validate(self, prefix: str) -> None:
        nonempty(self, prefix, "sites", "kinds")
        positive(self, prefix, "heads")
        if self.projection and self.metric != "mse":
            raise DistillError(f"{prefix}.projection applies to {prefix}.metric=mse (DirectMiniLM) only")


@dataclass(init=False)
class LossConfig:
    """The interpolated objective L = Σ_X w_X(step) · L_X over the registered terms X
    (``distill.losses.terms``: ce, kd, hid, attn, rel, mse). ``weights``: term name -> its weight, set
    by the keys of ``weight_keys`` (``w_kd=0.5``), as in YAML and on the command line."""

    weights: dict[str, TermWeight] = field(default_factory=dict)
    temperature: float = 2.0
    divergence: Divergence = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    taid_lambda_start: float = 0.1
    taid_lambda_end: float = 1.0
    taid_schedule: TaidMode = "linear"
    label_smoothing: float = 0.0
    # Memory budget (MiB) of one chunk of target rows in the logit terms' pass over both LM heads (the
    # chunk's logits and float32 intermediates): rows per chunk = budget / the bytes one row costs.
    # Unset: the device's default (distill.losses.fused_head.DEFAULT_CHUNK_MIB).
    logit_chunk_mib: Optional[float] = None
    # Teacher and student with different tokenizers: compare aligned spans of the target text by ULD, or
    # by loss.divergence over the tokens both vocabularies hold and ULD elsewhere (hybrid), or (mined) by
    # loss.divergence to the teacher's distribution read on the student's vocabulary through a minimum edit
    # distance token map, where the span's first tokens agree under it, and gold CE on the other target
    # rows (distill.losses.cross_tokenizer). Published settings: ULD as Boizard et al. 2024 is uld with
    # w_ce=1, w_kd=1.5, temperature=1, uld_top_k=null; GOLD's ULD defaults (TRL) are w_ce=0, w_kd=1,
    # temperature=1. Only the terms that declare across_tokenizers (kd) read it.
    cross_tokenizer: Optional[CrossTokenizer] = None
    # ULD compares the top uld_top_k probabilities of each side and one bucket of the rest; null: all of them.
    uld_top_k: Optional[int] = 1024
    # hybrid: the weight of the ULD spans against the shared-token ones (ULD sharpens whatever the student
    # ranks first, right or wrong, so it can pull a student that still misspells a word further off)
    uld_weight: float = 1.0
    # Run the teacher's decoder on the student's encoder output, skipping the teacher's encoder
    # (distilBART's KD with an unshrunk, frozen encoder); needs equal hidden sizes.
    teacher_uses_student_encoder: bool = False
    # On-policy distillation (GKD): this share of micro-batches trains on responses the student samples
    # itself from the batch's prompts, scored by the teacher (the CE term skips them: no gold there).
    on_policy_fraction: float = 0.0
    on_policy_max_new_tokens: int = 64
    on_policy_temperature: float = 1.0
    hidden: HiddenLossConfig = field(default_factory=HiddenLossConfig)
    attention: AttentionLossConfig = field(default_factory=AttentionLossConfig)
    relation: RelationLossConfig = field(default_factory=RelationLossConfig)

    def __init__(self, **settings: Any):
        """Each setting by its key (``temperature=1.0``, ``w_kd=0.5``, ``w_kd_schedule="linear"``); the
        rest at their defaults, each term's weight at its ``default_weight``."""
        self.weights = settings.pop("weights", None) or {name: TermWeight(term.default_weight)
                                                          for name, term in TERMS.items()}
        keys = weight_keys()
        for key in [k for k in settings if k in keys]:
            name, part = keys[key]
            setattr(self.weights[name], part, settings.pop(key))
        for f in dataclasses.fields(self)[1:]:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, settings.pop(f.name, default))
        if settings:
            raise TypeError(f"LossConfig has no setting {next(iter(settings))!r}")

    @classmethod
    def setting_hints(cls) -> dict[str, Any]:
        """Each key the section takes -> its type: the weight keys in place of ``weights``."""
        hints = typing.get_type_hints(cls)
        del hints["weights"]
        return {**_weight_hints(), **hints}

    @staticmethod
    def unknown_key(key: str, prefix: str) -> Optional[str]:
        """The line refusing an unknown weight key, naming the registered terms; None for other keys."""
        if not key.startswith("w_"):
            return None
        close = difflib.get_close_matches(key, list(weight_keys()), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        return (f"unknown config key '{prefix}{key}'{hint}: the loss terms are {', '.join(TERMS)}, each weighed by "
                f"{prefix}w_<term>, {prefix}w_<term>_schedule and {prefix}w_<term>_end")

    def to_dict(self) -> dict[str, Any]:
        """The settings by their keys, the weights first."""
        tree = {key: getattr(self.weights[name], part) for key, (name, part) in weight_keys().items()}
        return {**tree, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)[1:]}}

    def validate(self, prefix: str) -> None:
        for name, w in self.weights.items():
            key = f"w_{name}"
            if w.value < 0 or (w.end is not None and w.end < 0):
                raise DistillError(f"{prefix}.{key} and {prefix}.{key}_end must be >= 0")
            if (w.schedule == "constant") != (w.end is None):
                raise DistillError(f"{prefix}.{key}_end is set exactly when {prefix}.{key}_schedule is not "
                                   f"'constant' (got schedule {w.schedule!r}, end {w.end})")
        if not self.active_terms():
            raise DistillError(f"every loss weight of {prefix} is 0: nothing to train on")
        if self.temperature <= 0:
            raise DistillError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        # jsd_beta 0 or 1 and skew_alpha 1 make the divergence identically 0.
        if not 0 < self.jsd_beta < 1:
            raise DistillError(f"{prefix}.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if not 0 <= self.skew_alpha < 1:
            raise DistillError(f"{prefix}.skew_alpha must be in [0, 1), got {self.skew_alpha}")
        for key in ("taid_lambda_start", "taid_lambda_end"):
            if not 0 <= getattr(self, key) <= 1:
                raise DistillError(f"{prefix}.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.taid_lambda_start > self.taid_lambda_end:
            raise DistillError(f"{prefix}.taid_lambda_start must not exceed {prefix}.taid_lambda_end")
        if not 0 <= self.label_smoothing < 1:
            raise DistillError(f"{prefix}.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.logit_chunk_mib is not None and not self.logit_chunk_mib > 0:
            raise DistillError(f"{prefix}.logit_chunk_mib must be > 0, got {self.logit_chunk_mib}")
        if not 0 <= self.on_policy_fraction <= 1:
            raise DistillError(f"{prefix}.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        positive(self, prefix, "on_policy_max_new_tokens")
        positive(self, prefix, "uld_top_k", optional=True)
        if self.uld_weight < 0 or (self.uld_weight != 1.0 and self.cross_tokenizer != "hybrid"):
            raise DistillError(f"{prefix}.uld_weight weighs hybrid's ULD spans: >= 0, with {prefix}.cross_tokenizer=hybrid "
                               f"(got {self.uld_weight} with {self.cross_tokenizer})")
        if self.cross_tokenizer == "mined" and self.divergence in ("reverse_kl", "taid"):
            raise DistillError(f"{prefix}.divergence={self.divergence} takes the log of the mapped teacher, which "
                               f"{prefix}.cross_tokenizer=mined leaves at 0 on student tokens no teacher token maps "
                               "to (an infinite or undefined loss): use forward_kl, jsd, skew_kl or skew_reverse_kl")
        if self.on_policy_temperature <= 0:
            raise DistillError(f"{prefix}.on_policy_temperature must be > 0, got {self.on_policy_temperature}")
        self.hidden.validate(f"{prefix}.hidden")
        self.attention.validate(f"{prefix}.attention")
        self.relation.validate(f"{prefix}.relation")

    def active_terms(self) -> list[str]:
        """The terms whose weight is above 0 at some step, in the registry's order."""
        return [name for name, w in self.weights.items() if w.active]

    def teacher_terms(self) -> list[str]:
        """The active terms that read a teacher."""
        return [name for name in self.active_terms() if TERMS[name].needs_teacher]

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_terms())

    def live_teacher_terms(self, cache: bool) -> list[str]:
        """The active terms that read the teacher model itself, with or without a ``teacher.cache``."""
        return [name for name in self.active_terms() if TERMS[name].live_teacher(cache)]

    def feature_terms(self) -> list[str]:
        """The active terms that read the teacher's features (hidden states, attention), not its logits."""
        return [name for name in self.teacher_terms() if not TERMS[name].uses_logits]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def check_teacher_terms(run: Any) -> None:
    """What the active terms' contracts refuse about the teacher ``run`` (a ``RunConfig``) gives them."""
    terms = run.loss.teacher_terms()
    if terms and run.teacher is None:
        raise DistillError(f"loss.w_{terms[0]} > 0 needs a teacher: set teacher.path and teacher.ds_config")
    if run.teacher_cache is not None:
        _check_cache(run)
    if run.loss.cross_tokenizer is not None:
        _check_cross_tokenizer(run)


def _check_cache(run: Any) -> None:
    # what a cache of the dataset's top-K logits cannot stand in for
    loss = run.loss
    for name in loss.teacher_terms():
        if TERMS[name].uses_logits and not TERMS[name].top_k_teacher:
            raise DistillError(f"loss.w_{name} compares the full logits, and teacher.cache holds the top-K of them: "
                               f"set loss.w_{name}=0, or drop teacher.cache for a live teacher")
    if loss.on_policy_fraction > 0:
        raise DistillError("loss.on_policy_fraction needs a live teacher to score the student's own samples; "
                           "teacher.cache holds the dataset's targets only")
    if loss.teacher_uses_student_encoder:
        raise DistillError("loss.teacher_uses_student_encoder runs the teacher on the student's encoding; "
                           "teacher.cache holds the teacher's own")
    features = loss.feature_terms()
    if features and not run.teacher.path:
        raise DistillError(f"loss.w_{features[0]} > 0 needs the live teacher's features, which teacher.cache does not "
                           "hold: set teacher.path and teacher.ds_config too")


def _check_cross_tokenizer(run: Any) -> None:
    # what needs the two models to read the same tokens
    loss, name = run.loss, f"loss.cross_tokenizer={run.loss.cross_tokenizer}"
    if run.teacher_cache is not None:
        raise DistillError(f"{name} reads the live teacher on its own tokens; teacher.cache holds logits at the "
                           "student's: drop teacher.cache")
    for term in loss.teacher_terms():
        if TERMS[term].uses_logits and not TERMS[term].across_tokenizers:
            raise DistillError(f"loss.w_{term} compares logits token for token, which {name} cannot: set "
                               f"loss.w_{term}=0")
    if loss.on_policy_fraction > 0:
        raise DistillError(f"loss.on_policy_fraction with {name} would retokenize every sample for the teacher, "
                           "which is not supported: set loss.on_policy_fraction=0")
    if loss.teacher_uses_student_encoder:
        raise DistillError(f"loss.teacher_uses_student_encoder feeds the student's encoding to the teacher, which "
                           f"reads other tokens under {name}")
    if run.data.objective is not None:
        raise DistillError(f"data.objective={run.data.objective} corrupts the student's tokens, which the teacher "
                           f"does not read under {name}: use one tokenizer for both")
