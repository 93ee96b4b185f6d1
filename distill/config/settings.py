"""Typed run configuration: every setting, its default and its checks.

Every setting has one dotted name (``training.learning_rate``) used in YAML, on the command line,
in TensorBoard hparams and in the model card.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from distill.errors import DistillError, collect_errors

Precision = Literal["fp32", "bf16", "fp16"]

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"]

TaidMode = Literal["constant", "linear", "adaptive"]

HiddenMetric = Literal["mse", "cosine"]

CrossTokenizer = Literal["uld", "hybrid", "mined"]

# Pre-training objectives on raw text (distill.data.objectives): the teacher's own, applied on the fly.
TextObjective = Literal["mlm", "span_corruption", "infilling", "causal"]


@dataclass
class ModelConfig:
    """A teacher or student: a local Hugging Face directory or a hub id, and its DeepSpeed config."""

    path: str = ""
    ds_config: str = ""
    revision: Optional[str] = None
    # SDPA keeps attention fast; feature capture never needs the whole model in eager mode.
    attn_implementation: str = "sdpa"

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise DistillError(f"{prefix}.path is required")
        if not self.ds_config:
            raise DistillError(f"{prefix}.ds_config is required")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model, and/or a cache of its top-K logits written by ``distill cache-teacher``.
    ``cache`` replaces the live teacher for the logit terms; feature terms still need the model."""

    cache: Optional[str] = None

    def validate(self, prefix: str) -> None:
        if self.cache is not None and not self.cache:
            raise DistillError(f"{prefix}.cache is empty (use null for a live teacher)")
        if self.cache is None or self.path:
            super().validate(prefix)


@dataclass
class DataConfig:
    """Where the examples come from and how they are tokenized."""

    path: str = ""  # hub dataset name, local directory, or local json/jsonl/csv/parquet file
    name: Optional[str] = None  # dataset configuration, e.g. "3.0.0" for cnn_dailymail
    train_split: str = "train"
    eval_split: Optional[str] = "validation"
    source_column: str = "document"  # the prompt, for decoder-only models
    # The response; None: plain text (task-agnostic distillation of a decoder-only model, every token a target).
    target_column: Optional[str] = "summary"
    source_prefix: str = ""  # e.g. "summarize: " for T5
    max_source_length: int = 512
    max_target_length: int = 128
    # False drops examples longer than the limits instead of cutting them.
    truncation: bool = True
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Decoder-only models only (CausalCollator):
    chat_template: bool = True  # format prompt/response with the tokenizer's chat template when it has one
    loss_on_prompt: bool = False  # labels and distillation masks cover the prompt tokens too
    packing: bool = False  # pack short examples into full rows (no padding between them)
    # Rows whose source or target is null or not a string are dropped (and counted) instead of refused.
    skip_invalid: bool = False
    # A pre-training objective on the raw text of source_column (target_column null): mlm (masked LMs),
    # span_corruption (T5) or infilling (BART) for encoder-decoders, causal (decoder-only); null: the
    # source/target pairs as they are. The text is cut into blocks of block_length tokens.
    objective: Optional[TextObjective] = None
    block_length: int = 512
    mask_rate: Optional[float] = None  # null: mlm and span_corruption 0.15, infilling 0.30
    mean_span_length: float = 3.0  # span_corruption's mean span, infilling's Poisson mean
    whole_word_masking: bool = False  # mlm: mask every token of a chosen word
    # Loader processes per rank that make the next training micro-batches while the step runs; 0: the
    # training process makes each one when the step asks for it. Either way, the same batches.
    num_workers: int = 0

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise DistillError(f"{prefix}.path is required")
        if not self.source_column:
            raise DistillError(f"{prefix}.source_column is required")
        if self.target_column == "":
            raise DistillError(f"{prefix}.target_column is empty (use null for plain text)")
        _positive(self, prefix, "max_source_length", "max_target_length")
        _positive(self, prefix, "max_train_samples", "max_eval_samples", optional=True)
        if self.num_workers < 0:
            raise DistillError(f"{prefix}.num_workers must be >= 0, got {self.num_workers}")
        if self.source_column == self.target_column:
            raise DistillError(f"{prefix}.source_column and {prefix}.target_column are both '{self.source_column}'")
        self._validate_objective(prefix)

    def _validate_objective(self, prefix: str) -> None:
        if not self.mean_span_length > 0:
            raise DistillError(f"{prefix}.mean_span_length must be > 0, got {self.mean_span_length}")
        if self.objective is None:
            changed = [k for k in ("mask_rate", "whole_word_masking") if getattr(self, k) not in (None, False)]
            if changed:
                raise DistillError(f"{prefix}.{changed[0]} applies to a pre-training objective: set {prefix}.objective")
            return
        name = f"{prefix}.objective={self.objective}"
        if self.target_column is not None:
            raise DistillError(f"{name} reads raw text from {prefix}.source_column: set {prefix}.target_column=null")
        if self.packing or self.source_prefix:
            raise DistillError(f"{name} cuts the text into full blocks itself: {prefix}.packing and "
                               f"{prefix}.source_prefix do not apply")
        _positive(self, prefix, "block_length")
        rate = self.mask_rate
        if rate is not None and (self.objective == "causal" or not 0 < rate < 1):
            raise DistillError(f"{prefix}.mask_rate must be in (0, 1) with a corrupting objective, got {rate} with "
                               f"{name}")
        if self.whole_word_masking and self.objective != "mlm":
            raise DistillError(f"{prefix}.whole_word_masking applies to {prefix}.objective=mlm, not {self.objective}")


SEED_LIMIT = 2**32 - 1024


@dataclass
class TrainingConfig:
    output_dir: str = ""
    seed: int = 42
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the decayed learning rate ends at learning_rate * min_lr_ratio
    max_grad_norm: float = 1.0
    precision: Precision = "fp32"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    # Stop once eval.best_metric has not improved for this many evaluations in a row (null: run max_steps).
    early_stopping_patience: Optional[int] = None
    save_every: int = 500
    keep_checkpoints: int = 2  # complete checkpoints kept on disk, newest first
    resume: str = "auto"  # "auto" (latest intact checkpoint if any), "never", or a checkpoint tag
    # Discard what output_dir holds of an earlier run (resume: never), or the checkpoints newer than the
    # resume tag; without it such a start is refused.
    overwrite: bool = False
    # A resume on data whose content differs from what its checkpoint was trained on (edited in place) is
    # refused; with this it continues on the new content from the same position, and says so.
    allow_data_change: bool = False
    # A run whose loss or gradient norm is not finite for this many steps in a row stops with an error.
    max_nonfinite_steps: int = 3
    export: bool = True  # write a Hugging Face directory of the student at the end
    # distilBART trained with frozen embeddings (and LM head, tied to them), and with a frozen
    # encoder when only the decoder was shrunk.
    freeze_embeddings: bool = False
    freeze_encoder: bool = False
    # Debugging: write the dataset indices each rank trains on at each step to example_ids/rank{r}.jsonl.
    record_example_ids: bool = False

    def validate(self, prefix: str) -> None:
        if not self.output_dir:
            raise DistillError(f"{prefix}.output_dir is required")
        if not 0 <= self.seed < SEED_LIMIT:  # numpy's range, less headroom for the seed + rank of every rank
            raise DistillError(f"{prefix}.seed must be in [0, {SEED_LIMIT}) (each rank seeds with seed + rank), "
                               f"got {self.seed}")
        _positive(self, prefix, "micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_every",
                  "save_every", "keep_checkpoints", "max_nonfinite_steps")
        if self.learning_rate <= 0:
            raise DistillError(f"{prefix}.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise DistillError(f"{prefix}.warmup_steps must be in [0, training.max_steps), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise DistillError(f"{prefix}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise DistillError(f"{prefix}.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.eval_every < 0:
            raise DistillError(f"{prefix}.eval_every must be >= 0, got {self.eval_every}")
        if self.weight_decay < 0:
            raise DistillError(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")


Schedule = Literal["constant", "linear", "cosine"]

Site = Literal["encoder_self", "decoder_self", "decoder_cross"]

HiddenMap = Literal["copied", "supervise_forward", "last", "uniform", "uniform_consecutive", "uniform_last", "custom"]

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
        _nonempty(self, prefix, "stacks")


@dataclass
class AttentionLossConfig:
    """MiniLM / MiniEnD attention distributions: KL(teacher ‖ student) per head at one layer per site."""

    sites: list[Site] = field(default_factory=lambda: ["encoder_self", "decoder_self", "decoder_cross"])
    student_layer: int = -1  # 0-based, negative from the end
    teacher_layer: int = -1

    def validate(self, prefix: str) -> None:
        _nonempty(self, prefix, "sites")


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
        _nonempty(self, prefix, "sites", "kinds")
        _positive(self, prefix, "heads")
        if self.projection and self.metric != "mse":
            raise DistillError(f"{prefix}.projection applies to {prefix}.metric=mse (DirectMiniLM) only")


@dataclass
class LossConfig:
    """The interpolated objective:
    L = w_ce·CE + w_kd·τ²·D(teacher ‖ student) + w_hid·L_hid + w_attn·L_attn + w_rel·L_rel
        + w_mse·‖z_S − z_T‖².

    Each weight ``w_X`` is its value at step 0; with ``w_X_schedule`` linear or cosine it moves to
    ``w_X_end`` by the last step. ``w_X`` weighs the loss term named X (``distill.losses.terms``);
    ``WEIGHTS`` is read off these fields.
    """

    w_ce: float = 1.0
    w_kd: float = 0.0
    w_hid: float = 0.0
    w_attn: float = 0.0
    w_rel: float = 0.0
    w_mse: float = 0.0
    w_ce_schedule: Schedule = "constant"
    w_kd_schedule: Schedule = "constant"
    w_hid_schedule: Schedule = "constant"
    w_attn_schedule: Schedule = "constant"
    w_rel_schedule: Schedule = "constant"
    w_mse_schedule: Schedule = "constant"
    w_ce_end: Optional[float] = None
    w_kd_end: Optional[float] = None
    w_hid_end: Optional[float] = None
    w_attn_end: Optional[float] = None
    w_rel_end: Optional[float] = None
    w_mse_end: Optional[float] = None
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
    # temperature=1.
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

    def validate(self, prefix: str) -> None:
        for key in WEIGHTS:
            kind, end = getattr(self, f"{key}_schedule"), getattr(self, f"{key}_end")
            if getattr(self, key) < 0 or (end is not None and end < 0):
                raise DistillError(f"{prefix}.{key} and {prefix}.{key}_end must be >= 0")
            if (kind == "constant") != (end is None):
                raise DistillError(f"{prefix}.{key}_end is set exactly when {prefix}.{key}_schedule is not "
                                   f"'constant' (got schedule {kind!r}, end {end})")
        if not any(self.active(key) for key in WEIGHTS):
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
        _positive(self, prefix, "on_policy_max_new_tokens")
        _positive(self, prefix, "uld_top_k", optional=True)
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

    def active(self, key: str) -> bool:
        """Whether weight ``key`` is above 0 at some step."""
        end = getattr(self, f"{key}_end")
        return max(getattr(self, key), end or 0.0) > 0

    @property
    def uses_teacher(self) -> bool:
        return any(self.active(key) for key in WEIGHTS if key != "w_ce")


# Every term's weight, in the order the fields are declared: adding a term's three fields adds it here.
WEIGHTS = tuple(f.name for f in dataclasses.fields(LossConfig)
                if f.name.startswith("w_") and not f.name.endswith(("_schedule", "_end")))
# the terms that read the teacher's features (hidden states, attention), not its logits
FEATURE_WEIGHTS = ("w_hid", "w_attn", "w_rel")


@dataclass
class EvalConfig:
    """What each evaluation (``training.eval_every`` and the end) measures besides the teacher-forced loss."""

    generate: bool = False  # the student generates for part of the eval split; ROUGE and samples are logged
    max_samples: int = 64  # examples generated per evaluation
    num_beams: int = 1
    max_new_tokens: int = 64
    text_samples: int = 3  # generated examples shown in TensorBoard
    # The student at the best value so far is exported to <output_dir>/best: eval/ce, eval/token_accuracy,
    # or with generate, eval/rouge1, eval/rouge2, eval/rougeL, eval/rougeLsum.
    best_metric: Optional[str] = None

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "max_samples", "num_beams", "max_new_tokens")
        if self.text_samples < 0:
            raise DistillError(f"{prefix}.text_samples must be >= 0, got {self.text_samples}")
        choices = ["eval/ce", "eval/token_accuracy"]
        if self.generate:
            choices += [f"eval/{r}" for r in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
        if self.best_metric is not None and self.best_metric not in choices:
            raise DistillError(f"{prefix}.best_metric must be one of {', '.join(choices)}, got {self.best_metric!r}"
                               + ("" if self.generate else f" (ROUGE needs {prefix}.generate: true)"))

    @property
    def lower_is_better(self) -> bool:
        return self.best_metric == "eval/ce"


@dataclass
class RunConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[TeacherConfig] = None  # None: plain fine-tuning (SFT), no teacher is loaded
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "RunConfig":
        # each section's errors at once; the checks across sections need valid sections
        collect_errors(functools.partial(getattr(self, name).validate, name)
                       for name in ("student", "teacher", "data", "training", "loss", "eval")
                       if getattr(self, name) is not None)
        if (self.eval.generate or self.eval.best_metric) and not self.data.eval_split:
            raise DistillError("eval.generate and eval.best_metric need an evaluation split (data.eval_split)")
        if self.training.early_stopping_patience is not None and (
                self.training.early_stopping_patience < 1 or not self.eval.best_metric or not self.training.eval_every):
            raise DistillError("training.early_stopping_patience counts evaluations without a better eval.best_metric: "
                               "it must be >= 1, with eval.best_metric set and training.eval_every > 0 (got "
                               f"{self.training.early_stopping_patience}, {self.eval.best_metric}, "
                               f"{self.training.eval_every})")
        if self.loss.on_policy_fraction > 0 and (self.data.packing or self.data.target_column is None
                                                 or not self.loss.uses_teacher):
            raise DistillError("loss.on_policy_fraction needs prompts to sample from and a teacher to score: "
                               "prompt/response data (data.target_column set), data.packing false, a logit or "
                               "feature term")
        if self.eval.generate and self.data.target_column is None:
            raise DistillError("eval.generate scores generations against references: plain text (data.target_column: "
                               "null) has none")
        if self.loss.uses_teacher and self.teacher is None:
            active = [k for k in WEIGHTS if k != "w_ce" and self.loss.active(k)]
            raise DistillError(f"loss.{active[0]} > 0 needs a teacher: set teacher.path and teacher.ds_config")
        if self.teacher_cache is not None:
            self._check_cache()
        if self.loss.cross_tokenizer is not None:
            self._check_cross_tokenizer()
        return self

    def _check_cross_tokenizer(self) -> None:
        # what needs the two models to read the same tokens
        loss, name = self.loss, f"loss.cross_tokenizer={self.loss.cross_tokenizer}"
        if self.teacher_cache is not None:
            raise DistillError(f"{name} reads the live teacher on its own tokens; teacher.cache holds logits at the "
                               "student's: drop teacher.cache")
        if loss.active("w_mse"):
            raise DistillError(f"loss.w_mse compares logits token for token, which {name} cannot: set loss.w_mse=0")
        if loss.on_policy_fraction > 0:
            raise DistillError(f"loss.on_policy_fraction with {name} would retokenize every sample for the teacher, "
                               "which is not supported: set loss.on_policy_fraction=0")
        if loss.teacher_uses_student_encoder:
            raise DistillError(f"loss.teacher_uses_student_encoder feeds the student's encoding to the teacher, which "
                               f"reads other tokens under {name}")
        if self.data.objective is not None:
            raise DistillError(f"data.objective={self.data.objective} corrupts the student's tokens, which the teacher "
                               f"does not read under {name}: use one tokenizer for both")

    def _check_cache(self) -> None:
        # what a cache of the dataset's top-K logits cannot stand in for
        if self.loss.active("w_mse"):
            raise DistillError("loss.w_mse compares the full logits, and teacher.cache holds the top-K of them: set "
                               "loss.w_mse=0, or drop teacher.cache for a live teacher")
        if self.loss.on_policy_fraction > 0:
            raise DistillError("loss.on_policy_fraction needs a live teacher to score the student's own samples; "
                               "teacher.cache holds the dataset's targets only")
        if self.loss.teacher_uses_student_encoder:
            raise DistillError("loss.teacher_uses_student_encoder runs the teacher on the student's encoding; "
                               "teacher.cache holds the teacher's own")
        features = [k for k in FEATURE_WEIGHTS if self.loss.active(k)]
        if features and not self.teacher.path:
            raise DistillError(f"loss.{features[0]} > 0 needs the live teacher's features, which teacher.cache does not "
                               "hold: set teacher.path and teacher.ds_config too")

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and self.loss.uses_teacher

    @property
    def teacher_cache(self) -> Optional[str]:
        """The cache the logit terms read, when a teacher term is on."""
        return self.teacher.cache if self.uses_teacher else None

    @property
    def live_teacher(self) -> bool:
        """Whether the teacher model is loaded: a teacher term is on and the cache does not serve them all."""
        return self.uses_teacher and (self.teacher.cache is None or any(self.loss.active(k) for k in FEATURE_WEIGHTS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted names to values, as used on the command line and in TensorBoard hparams."""
        return flatten(self.to_dict())


def _nonempty(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        values = getattr(obj, key)
        if not values:
            raise DistillError(f"{prefix}.{key} must not be empty")
        if len(set(values)) != len(values):
            raise DistillError(f"{prefix}.{key} lists a value twice: {values}")


def _positive(obj: Any, prefix: str, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = getattr(obj, key)
        if optional and value is None:
            continue
        if value < 1:
            raise DistillError(f"{prefix}.{key} must be >= 1, got {value}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
