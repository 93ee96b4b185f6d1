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

from distill.config.checks import nonempty, positive
from distill.config.loss import LossConfig, check_teacher_terms
from distill.errors import DistillError, collect_errors
from distill.models.loading import ModelConfig

Precision = Literal["fp32", "bf16", "fp16"]

# Pre-training objectives on raw text (distill.data.objectives): the teacher's own, applied on the fly.
TextObjective = Literal["mlm", "span_corruption", "infilling", "causal"]


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
    # training process makes each one when the step asks for it. Either way, the same batches. null: 2 on a
    # GPU, whose step leaves the host idle, and 0 on CPU, where the workers would take the step's own cores.
    num_workers: Optional[int] = None

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise DistillError(f"{prefix}.path is required")
        if not self.source_column:
            raise DistillError(f"{prefix}.source_column is required")
        if self.target_column == "":
            raise DistillError(f"{prefix}.target_column is empty (use null for plain text)")
        positive(self, prefix, "max_source_length", "max_target_length")
        positive(self, prefix, "max_train_samples", "max_eval_samples", optional=True)
        if self.num_workers is not None and self.num_workers < 0:
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
        positive(self, prefix, "block_length")
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
        positive(self, prefix, "micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_every",
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
        positive(self, prefix, "max_samples", "num_beams", "max_new_tokens")
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
        check_teacher_terms(self)
        return self

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
        return self.uses_teacher and bool(self.loss.live_teacher_terms(self.teacher.cache is not None))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loss": self.loss.to_dict()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted names to values, as used on the command line and in TensorBoard hparams."""
        return flatten(self.to_dict())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
