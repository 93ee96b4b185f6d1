"""The settings of ``distill finetune``: one YAML recipe plus ``key=value`` overrides and flags, typed and
validated before any data or model loads. The defaults are GLUE's usual ones (Devlin et al., 2019)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from distill.config.parsing import load_typed
from distill.config.settings import Precision
from distill.errors import DistillError, collect_errors

Metric = Literal["accuracy", "macro_f1", "matthews", "pearson", "spearman"]
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "matthews")
PROJECT = Path(__file__).parents[2]  # the checkout, whose ds_configs/ hold the default


@dataclasses.dataclass
class TaskConfig:
    kind: Literal["classification", "regression"] = "classification"
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # null: single-sentence
    label_column: str = "label"
    # The validation metric that picks the best epoch; null: accuracy, or pearson for regression.
    metric: Optional[Metric] = None

    @property
    def main_metric(self) -> str:
        return self.metric or ("pearson" if self.kind == "regression" else "accuracy")


@dataclasses.dataclass
class FinetuneData:
    path: str = ""  # hub dataset, local directory, or json/jsonl/csv/parquet file
    name: Optional[str] = None  # dataset configuration, e.g. "sst2" of nyu-mll/glue
    train_split: str = "train"
    validation_split: Optional[str] = "validation"  # null: carve validation_fraction out of train
    validation_fraction: Optional[float] = None
    test_split: str = "test"  # GLUE hides its test labels: its recipes score "validation" here
    max_length: int = 128  # tokens of text (and text pair), cut beyond
    # null: every training row; N: N rows drawn at random (by training.seed, so every seed and rank count
    # trains on the same rows), for a quicker run on a large task
    max_train_samples: Optional[int] = None


@dataclasses.dataclass
class FinetuneTraining:
    seed: int = 42  # seed i of --seeds N is seed + i
    seeds: int = 1
    epochs: int = 3
    batch_size: int = 32  # global: split over the ranks, the same batches whatever their number
    eval_batch_size: int = 64  # per rank
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this share of the steps, then linear decay to 0
    max_grad_norm: float = 1.0
    precision: Precision = "fp32"
    ds_config: str = "ds_configs/student_zero2.json"  # a relative path not found here: the checkout's

    def ds_config_path(self) -> Path:
        given = Path(self.ds_config).expanduser()
        shipped = PROJECT / given
        return shipped if not given.is_absolute() and not given.exists() and shipped.is_file() else given


@dataclasses.dataclass
class FinetuneConfig:
    model: str = ""  # model directory or hub id
    output_dir: str = ""
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: FinetuneData = dataclasses.field(default_factory=FinetuneData)
    training: FinetuneTraining = dataclasses.field(default_factory=FinetuneTraining)

    def validate(self) -> "FinetuneConfig":
        collect_errors(getattr(self, f"_check_{name}") for name in ("paths", "task", "data", "training"))
        return self

    def _check_paths(self) -> None:
        for key in ("model", "output_dir"):
            if not getattr(self, key):
                raise DistillError(f"{key} is required")
        if not self.training.ds_config_path().is_file():
            raise DistillError(f"training.ds_config not found: {self.training.ds_config}")

    def _check_task(self) -> None:
        t = self.task
        if not t.text_column or not t.label_column or t.text_pair_column == "":
            raise DistillError("task.text_column and task.label_column must name columns (text_pair_column: a "
                               "column or null)")
        regression = t.kind == "regression"
        if t.metric is not None and (t.metric in CLASSIFICATION_METRICS) == regression:
            raise DistillError(f"task.metric {t.metric!r} does not score a {t.kind} task")

    def _check_data(self) -> None:
        d = self.data
        if not d.path:
            raise DistillError("data.path is required")
        if (d.validation_split is None) == (d.validation_fraction is None):
            raise DistillError("set one of data.validation_split and data.validation_fraction (the other null)")
        if d.validation_fraction is not None and not 0 < d.validation_fraction < 1:
            raise DistillError(f"data.validation_fraction must be in (0, 1), got {d.validation_fraction}")
        if d.max_length < 1:
            raise DistillError(f"data.max_length must be >= 1, got {d.max_length}")
        if d.max_train_samples is not None and d.max_train_samples < 1:
            raise DistillError(f"data.max_train_samples must be >= 1 or null, got {d.max_train_samples}")

    def _check_training(self) -> None:
        t = self.training
        for key in ("seeds", "epochs", "batch_size", "eval_batch_size"):
            if getattr(t, key) < 1:
                raise DistillError(f"training.{key} must be >= 1, got {getattr(t, key)}")
        if t.learning_rate <= 0 or t.weight_decay < 0 or t.max_grad_norm <= 0:
            raise DistillError("training.learning_rate and max_grad_norm must be > 0, weight_decay >= 0")
        if not 0 <= t.warmup_ratio < 1:
            raise DistillError(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if not 0 <= t.seed < 2**31:
            raise DistillError(f"training.seed must be in [0, 2^31), got {t.seed}")


def load_finetune_config(path: Optional[str], overrides: list[str]) -> FinetuneConfig:
    return load_typed(FinetuneConfig, path, overrides).validate()
