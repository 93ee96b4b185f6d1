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
    "data.skip_invalid", "training.seed", "training.micro_batch_size", "training.gradient_accumulation_steps",
    "training.precision", "training.freeze_embeddings", "training.freeze_encoder", "loss.divergence",
    "loss.taid_schedule", "loss.hidden", "loss.relation.projection", "loss.relation.sites", "loss.relation.kinds",
    "loss.relation.heads",
)

# How a run is started, not what it is.
_START_KEYS = ("training.resume", "training.overwrite")


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting a resumed run changes; a change of ``RESUME_FIXED`` is refused."""
    old, new = flatten(saved), flatten(now)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in _START_KEYS or old.get(key) == new.get(key):
            continue
        if key in RESUME_FIXED or key.startswith(tuple(f + "." for f in RESUME_FIXED)):
            raise DistillError(f"the checkpoint was trained with {key}={old.get(key)!r} and this run sets "
                               f"{new.get(key)!r}: that changes the data order or the saved state; keep it, or start "
                               "a new output_dir")
        changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed
