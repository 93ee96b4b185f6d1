"""A fine-tune of one model over N seeds under DeepSpeed (under the launcher, or a one-rank group of its own).

For each seed: a new sequence-classification head on the model's trunk (its LM head dropped), trained for
``epochs`` epochs; after each epoch the validation and the test split are scored, and the seed reports the
test scores of the epoch best on validation. That equals scoring the best epoch's weights on test, without
keeping a copy of them (which ZeRO-3 would have to gather); the choice never looks at test scores.
"""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from distill.errors import DistillError
from distill.files import write_atomic
from distill.finetune import metrics
from distill.finetune.config import FinetuneConfig
from distill.finetune.data import Split, Splits, eval_shard, load_splits, train_batches


def finetune(cfg: FinetuneConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from distill.infer.generate import model_location

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is the point of a fine-tune
    location = model_location(cfg.model)
    out = Path(cfg.output_dir)
    splits = load_splits(cfg)  # every data refusal comes before the model loads
    tokenizer = _tokenizer(location)
    _check_length(location, tokenizer, cfg.data.max_length)
    _join_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md"):  # an earlier run's, beside this run's predictions until it ends
            (out / name).unlink(missing_ok=True)
    seeds = []
    for i in range(cfg.training.seeds):
        seed = cfg.training.seed + i
        seeds.append(_one_seed(cfg, location, tokenizer, splits, seed, rank, world, say))
        if rank == 0:
            _write_predictions(out / "predictions" / f"seed-{seed}.jsonl", seeds[-1].pop("predictions"))
    results = summarize(cfg, seeds, world)
    if rank == 0:
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        write_atomic(out / "results.md", results_table(results))
    dist.barrier()
    return results


def _join_group() -> None:
    """The launcher's process group, or a one-rank group of this process (DeepSpeed needs one)."""
    from distill.infer.generate import device_for_rank
    from distill.runtime.environment import one_rank_env
    from distill.runtime.process_group import join_process_group

    device_for_rank()  # before the process group, so NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        added = one_rank_env()
        join_process_group()
        for key in added:  # the group exists; processes started later must not inherit a world of 1
            if key != "LOCAL_RANK":  # DeepSpeed's engine reads it
                del os.environ[key]


def _tokenizer(location: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:  # decoder-only models: the end-of-text token pads (right side)
        if tokenizer.eos_token is None:
            raise DistillError(f"the tokenizer of {location} has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_length(location: str, tokenizer, max_length: int) -> None:
    """Refuse a data.max_length past the model's position table (T5's relative positions take any length).
    RoBERTa-style tables start after the pad row: pad_token_id + 1 of their rows are never a position."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, k, None), int)), None)
    if positions is None:
        return
    if "roberta" in config.model_type or config.model_type == "camembert":
        positions -= (config.pad_token_id or 0) + 1
    if max_length > positions:
        raise DistillError(f"data.max_length {max_length} is more than {location} takes ({positions} positions): set "
                           f"data.max_length={positions} or less")


def _load_model(location: str, num_labels: int, pad_token_id: int, ds: dict, precision: str):
    """The model with a new sequence-classification head (seeded by the caller), partitioned under ZeRO-3
    when ``ds`` says so."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.integrations import HfDeepSpeedConfig

    from distill.dtypes import torch_dtype
    from distill.models.loading import gather_for_late_init

    config = AutoConfig.from_pretrained(location, num_labels=num_labels)
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if config.pad_token_id is None:  # decoder-only heads read the last non-pad token
        config.pad_token_id = pad_token_id
    keep_alive = HfDeepSpeedConfig(ds)
    with gather_for_late_init():
        model = AutoModelForSequenceClassification.from_pretrained(location, config=config,
                                                                   dtype=torch_dtype(precision))
    return model, keep_alive


def _ds_config(cfg: FinetuneConfig, world: int, hidden: int) -> dict:
    from deepspeed.accelerator import get_accelerator

    from distill.config.settings import TrainingConfig
    from distill.runtime.dsconfig import read_ds_config, resolve_ds_config

    t = cfg.training
    per_rank = math.ceil(t.batch_size / world)
    training = TrainingConfig(micro_batch_size=per_rank, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                              max_grad_norm=t.max_grad_norm, precision=t.precision)
    return resolve_ds_config(read_ds_config(t.ds_config_path(), "training"), types.SimpleNamespace(training=training),
                             "student", world, hidden, get_accelerator().device_name(), t.ds_config)


def _one_seed(cfg: FinetuneConfig, location: str, tokenizer, splits: Splits, seed: int, rank: int, world: int,
              say: Callable[[str], None]) -> dict[str, Any]:
    import deepspeed
    from transformers import AutoConfig

    from distill.losses.schedules import lr_multiplier
    from distill.models.loading import hidden_size

    t = cfg.training
    regression = splits.classes is None
    ds = _ds_config(cfg, world, hidden_size(AutoConfig.from_pretrained(location)))
    torch.manual_seed(seed)  # the same new head on every rank and any number of ranks
    model, keep_alive = _load_model(location, 1 if regression else len(splits.classes), tokenizer.pad_token_id,
                                    ds, t.precision)
    steps_per_epoch = math.ceil(len(splits.train.labels) / t.batch_size)
    total = steps_per_epoch * t.epochs
    warmup = round(t.warmup_ratio * total)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_multiplier("linear", s, warmup, total, 0.0))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_decay_groups(model, t.weight_decay),
                                           config=ds, lr_scheduler=schedule)
    torch.manual_seed(seed * 1000 + rank)  # dropout
    targets = _targets(splits.train, splits.classes)
    best = None
    for epoch in range(t.epochs):
        engine.train()
        loss_sum = torch.zeros((), device=engine.device)  # read once per epoch: no wait on the device per step
        for step, rows in enumerate(train_batches(len(targets), t.batch_size, seed, epoch, rank, world)):
            n_global = min(t.batch_size, len(targets) - step * t.batch_size)  # the last batch may be short
            weights = torch.tensor((rows >= 0).astype(np.float32), device=engine.device)
            logits = engine(**_encode(tokenizer, splits.train, rows, cfg.data.max_length, engine.device)).logits
            y = targets[np.maximum(rows, 0)].to(engine.device)
            per_row = (torch.nn.functional.mse_loss(logits.squeeze(-1).float(), y, reduction="none") if regression
                       else torch.nn.functional.cross_entropy(logits.float(), y, reduction="none"))
            # DeepSpeed averages gradients over ranks: times world, the step follows the global batch's mean
            engine.backward((per_row * weights).sum() * (world / n_global))
            engine.step()
            loss_sum += (per_row.detach() * weights).sum()
        dist.all_reduce(loss_sum)
        scores = {role: _score(engine, tokenizer, getattr(splits, role), splits.classes, cfg, rank, world)
                  for role in ("validation", "test")}
        main = scores["validation"][0][cfg.task.main_metric]
        say(f"seed {seed} epoch {epoch + 1}: training loss {loss_sum.item() / len(targets):.4f}, validation "
            f"{cfg.task.main_metric} {main:.4f}")
        if best is None or main > best["validation"][cfg.task.main_metric]:
            best = {"seed": seed, "best_epoch": epoch + 1, "validation": scores["validation"][0],
                    "test": scores["test"][0], "predictions": scores["test"][1]}
    engine.destroy()
    del engine, model, keep_alive
    return best


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices only: biases and normalization weights (1-D) keep theirs, as in BERT."""
    matrix = [len(getattr(p, "ds_shape", p.shape)) > 1 for p in model.parameters()]  # ZeRO-3: the full shape
    params = list(model.parameters())
    return [{"params": [p for p, m in zip(params, matrix) if m], "weight_decay": weight_decay},
            {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0}]


def _targets(split: Split, classes) -> torch.Tensor:
    if classes is None:
        return torch.tensor(split.labels, dtype=torch.float32)
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in split.labels], dtype=torch.long)


def _encode(tokenizer, split: Split, rows: np.ndarray, max_length: int, device) -> dict[str, torch.Tensor]:
    take = np.maximum(rows, 0)  # padding rows repeat example 0, with weight 0
    texts = [split.texts[i] for i in take]
    pairs = [split.pairs[i] for i in take] if split.pairs is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def _score(engine, tokenizer, split: Split, classes, cfg: FinetuneConfig, rank: int, world: int):
    """(metrics, per-example predictions) of ``split``: each rank scores its shard, rank 0 joins them."""
    engine.eval()
    shard = eval_shard(len(split.labels), rank, world)
    found: list[tuple[int, Any]] = []
    for s in range(0, len(shard), cfg.training.eval_batch_size):
        rows = shard[s:s + cfg.training.eval_batch_size]
        logits = engine(**_encode(tokenizer, split, rows, cfg.data.max_length, engine.device)).logits.float().cpu()
        if classes is None:
            values = [{"prediction": v} for v in logits.squeeze(-1).tolist()]
        else:
            values = [{"prediction": classes[i], "probabilities": p}
                      for i, p in zip(logits.argmax(-1).tolist(), logits.softmax(-1).tolist())]
        found += [(int(r), v) for r, v in zip(rows, values) if r >= 0]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, found)
    predicted = dict(p for part in gathered for p in part)
    records = [{"index": i, "label": label, **predicted[i]} for i, label in enumerate(split.labels)]
    return metrics.task_metrics(classes is None, split.labels, [r["prediction"] for r in records]), records


def _write_predictions(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def summarize(cfg: FinetuneConfig, seeds: list[dict], world: int) -> dict[str, Any]:
    """results.json's content: each seed's best epoch and scores, and each test metric over the seeds."""
    names = list(seeds[0]["test"])
    return {
        "model": cfg.model, "data": cfg.data.path, "name": cfg.data.name, "task": cfg.task.kind,
        "main_metric": cfg.task.main_metric, "ranks": world,
        "interval": "95% Student-t interval of the mean over seeds: mean ± t(0.975, n-1) · s / sqrt(n), s the "
                    "sample standard deviation (null for one seed)",
        "seeds": seeds,
        "test": {name: metrics.t_interval([s["test"][name] for s in seeds]) for name in names},
        "validation": {name: metrics.t_interval([s["validation"][name] for s in seeds]) for name in names},
    }


def results_table(results: dict[str, Any]) -> str:
    names = list(results["test"])
    lines = [f"Fine-tune of {results['model']} on {results['data']}"
             f"{' (' + results['name'] + ')' if results['name'] else ''}: test scores of each seed's best "
             f"epoch on validation ({results['main_metric']}); {results['interval']}.", "",
             "| seed | best epoch | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for s in results["seeds"]:
        lines.append(f"| {s['seed']} | {s['best_epoch']} | " + " | ".join(f"{s['test'][n]:.4f}" for n in names) + " |")

    def cell(v: dict) -> str:
        return f"{v['mean']:.4f}" + (f" [{v['low']:.4f}, {v['high']:.4f}]" if v["low"] is not None else "")

    lines.append("| mean [95% CI] | | " + " | ".join(cell(results["test"][n]) for n in names) + " |")
    return "\n".join(lines) + "\n"
