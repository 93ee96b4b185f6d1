"""The labelled splits of a fine-tune, checked before any model loads, and their deterministic shards."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import numpy as np

from distill.config.settings import DataConfig
from distill.errors import DistillError
from distill.finetune.config import FinetuneConfig

# load_split names the columns by the training data settings; a fine-tune names them by its task's.
_KEYS = {"data.source_column": "task.text_column", "data.target_column": "task.text_pair_column"}


class Split(NamedTuple):
    texts: list[str]
    pairs: Optional[list[str]]
    labels: list[Any]  # as in the data: the predictions files write them back so


class Splits(NamedTuple):
    train: Split
    validation: Split
    test: Split
    classes: Optional[list[Any]]  # the training labels, sorted: class i is classes[i]; None for regression


def load_splits(cfg: FinetuneConfig) -> Splits:
    from distill.data.loading import load_split

    d, t = cfg.data, cfg.task
    source = DataConfig(path=d.path, name=d.name, source_column=t.text_column, target_column=t.text_pair_column)

    def load(split: str, role: str):
        try:
            ds = load_split(source, split, role, need_target=t.text_pair_column is not None)
        except DistillError as exc:
            message = str(exc)
            for old, new in _KEYS.items():
                message = message.replace(old, new)
            raise DistillError(message) from None
        if t.label_column not in ds.column_names:
            raise DistillError(f"task.label_column '{t.label_column}' is not a column of the {role} split '{split}' "
                               f"(columns: {', '.join(ds.column_names)})")
        return ds

    train = load(d.train_split, "train")
    if d.validation_fraction is not None:  # carved out of train the same way for every seed and rank count
        order = np.random.default_rng(cfg.training.seed).permutation(len(train))
        n_val = max(1, round(d.validation_fraction * len(train)))
        if n_val >= len(train):
            raise DistillError(f"data.validation_fraction {d.validation_fraction} leaves no training example")
        validation, train = train.select(np.sort(order[:n_val])), train.select(np.sort(order[n_val:]))
        val_name = f"{d.validation_fraction:g} of {d.train_split}"
    else:
        validation, val_name = load(d.validation_split, "validation"), d.validation_split
    if d.max_train_samples is not None and d.max_train_samples < len(train):  # after validation is carved out
        order = np.random.default_rng(cfg.training.seed).permutation(len(train))
        train = train.select(np.sort(order[:d.max_train_samples]))
    test = load(d.test_split, "test")
    named = {"train": (train, d.train_split), "validation": (validation, val_name), "test": (test, d.test_split)}
    splits = {role: _split(ds, cfg, role, name) for role, (ds, name) in named.items()}
    classes = None
    if t.kind == "classification":
        classes = sorted(set(splits["train"].labels), key=lambda v: (isinstance(v, str), v))
        for role in ("validation", "test"):
            unseen = set(splits[role].labels) - set(classes)
            if unseen:
                raise DistillError(f"the {role} split '{named[role][1]}' has label {sorted(unseen, key=repr)[0]!r}, "
                                   f"which the training split never has (classes: {classes})")
    return Splits(splits["train"], splits["validation"], splits["test"], classes)


def _split(ds, cfg: FinetuneConfig, role: str, name: str) -> Split:
    t = cfg.task
    labels = list(ds[t.label_column])
    for row, label in enumerate(labels):
        problem = _label_problem(label, t.kind == "regression")
        if problem:
            raise DistillError(f"row {row} of the {role} split '{name}' has {problem} in task.label_column "
                               f"'{t.label_column}'")
    if t.kind == "regression":
        labels = [float(v) for v in labels]
    pairs = list(ds[t.text_pair_column]) if t.text_pair_column else None
    return Split(list(ds[t.text_column]), pairs, labels)


def _label_problem(label: Any, regression: bool) -> Optional[str]:
    if label is None:
        return "no label"
    if isinstance(label, bool) or not isinstance(label, (int, float, str)):
        return f"a label of type {type(label).__name__} ({label!r})"
    if regression:
        return None if isinstance(label, (int, float)) and math.isfinite(label) else f"a non-numeric score ({label!r})"
    if isinstance(label, float):
        return (f"a real-valued label ({label!r}): regression labels in a classification task (task.kind: "
                f"regression scores them)") if not label.is_integer() else None
    if isinstance(label, int) and label < 0:
        return f"label {label} (a hidden label, as in GLUE's test splits: score a split with labels)"
    return None


def train_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's rows of each global batch of an epoch: a permutation drawn from (seed, epoch), cut into
    global batches of ``batch_size``, each dealt round-robin over the ranks, so the global batches are the
    same on any number of ranks. Every rank gets the same count per batch (-1: a zero-weight padding row)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [_deal(order[s:s + batch_size], rank, world) for s in range(0, n, batch_size)]


def eval_shard(n: int, rank: int, world: int) -> np.ndarray:
    """This rank's examples of an evaluation (each example on exactly one rank), -1 padding the shards to one
    length, so every rank runs as many forwards (ZeRO-3 gathers weights in every one)."""
    return _deal(np.arange(n), rank, world)


def _deal(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    per_rank = math.ceil(len(rows) / world)
    mine = rows[rank::world]
    return np.concatenate([mine, np.full(per_rank - len(mine), -1, dtype=rows.dtype)])
