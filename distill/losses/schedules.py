"""Schedules over optimizer steps: loss weights, TAID's λ floor and the learning rate share one shape."""

from __future__ import annotations

import math
from typing import Literal, get_args

from distill.errors import DistillError

Schedule = Literal["constant", "linear", "cosine"]

SCHEDULES: tuple[str, ...] = get_args(Schedule)


def schedule_value(kind: str, start: float, end: float, step: int, total_steps: int) -> float:
    """Weight at ``step``: constant (= start), or linear/cosine from start to end over total_steps.

    Progress is clamped to [0, 1], so steps past the end stay at ``end``; total_steps <= 0 means
    the schedule is already over.
    """
    if kind not in SCHEDULES:
        raise DistillError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        return float(start)
    frac = 1.0 if total_steps <= 0 else min(max(step / total_steps, 0.0), 1.0)
    if kind == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(start + (end - start) * frac)


def lr_multiplier(kind: str, step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then ``kind`` decay down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return schedule_value(kind, 1.0, min_ratio, step - warmup_steps, total_steps - warmup_steps)
