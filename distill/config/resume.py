"""What a resumed run may change, and what it may not."""

from __future__ import annotations

from typing import Any

from distill.config.settings import flatten
from distill.errors import DistillError

# Settings a resumed run must keep: they fix the data order and position, or what the saved state means
# (optimizer precision, which parameters and projections exist, the objective's state).
RESUME_FIXED = (
    "student.path", "student.ds_config", "data.path", "data.name", "data.train_split", "data.source_column",
    "data.target_column", "data.source_prefix", "data.max_source_length", "data.max_target_length",
    "data.truncation", "data.max_train_samples", "data.chat_template", "data.loss_on_prompt", "data.packing",
    "data.skip_invalid", "training.seed", "training.precision", "training.freeze_embeddings",
    "training.freeze_encoder", "loss.divergence", "loss.taid_schedule", "loss.hidden", "loss.relation.projection",
    "loss.relation.sites", "loss.relation.kinds", "loss.relation.heads",
)

# How each optimizer step's global batch is split may change with the number of ranks; the global batch
# itself (micro-batch x accumulation x ranks) may not: fit_accumulation keeps it.
BATCH_SPLIT = ("training.micro_batch_size", "training.gradient_accumulation_steps")

# How a run is started, or how many processes make its batches: not what it is.
_START_KEYS = ("training.resume", "training.overwrite", "data.num_workers")


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting a resumed run changes; a change of ``RESUME_FIXED`` is refused."""
    old, new = flatten(saved), flatten(now)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in _START_KEYS or key in BATCH_SPLIT or old.get(key) == new.get(key):
            continue
        if key in RESUME_FIXED or key.startswith(tuple(f + "." for f in RESUME_FIXED)):
            raise DistillError(f"the checkpoint was trained with {key}={old.get(key)!r} and this run sets "
                               f"{new.get(key)!r}: that changes the data order or the saved state; keep it, or start "
                               "a new output_dir")
        changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def global_batch(run_config: dict[str, Any], world_size: int) -> int:
    """Examples per optimizer step of a run config on ``world_size`` ranks."""
    t = run_config["training"]
    return t["micro_batch_size"] * t["gradient_accumulation_steps"] * world_size


def fit_accumulation(batch: int, micro_batch: int, accumulation: int, world_size: int, saved_accumulation: int) -> int:
    """The gradient accumulation steps that keep a checkpoint's global batch of ``batch`` examples on
    ``world_size`` ranks of ``micro_batch`` examples: the run's own when they fit, else the ones that do.
    An accumulation the run changed from the checkpoint's ``saved_accumulation`` is never replaced
    silently: when it does not fit, one line refuses it. When none fit, one line says which micro-batch
    sizes (or numbers of ranks) would."""
    if micro_batch * accumulation * world_size == batch:
        return accumulation
    if accumulation != saved_accumulation:
        raise DistillError(f"training.gradient_accumulation_steps={accumulation} makes global batches of "
                           f"{micro_batch * accumulation * world_size} examples on {world_size} ranks of "
                           f"training.micro_batch_size {micro_batch}, but the checkpoint's are {batch}: a resume "
                           f"keeps its global batch (and so its data position); set "
                           f"training.gradient_accumulation_steps={saved_accumulation}, or start a new output_dir")
    if batch % (micro_batch * world_size) == 0:
        return batch // (micro_batch * world_size)
    if batch % world_size:
        fix = f"resume it on {_one_of(_divisors(batch))} ranks"
    else:
        fix = f"set training.micro_batch_size to {_one_of(_divisors(batch // world_size))}"
    raise DistillError(f"the checkpoint's global batch is {batch} examples per step, which {world_size} ranks of "
                       f"training.micro_batch_size {micro_batch} cannot split evenly: {fix} "
                       "(training.gradient_accumulation_steps then follows)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _one_of(values: list[int]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])
