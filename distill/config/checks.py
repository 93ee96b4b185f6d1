"""Checks the settings' sections share: non-empty lists without repeats, counts of at least 1."""

from __future__ import annotations

from typing import Any

from distill.errors import DistillError


def nonempty(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        values = getattr(obj, key)
        if not values:
            raise DistillError(f"{prefix}.{key} must not be empty")
        if len(set(values)) != len(values):
            raise DistillError(f"{prefix}.{key} lists a value twice: {values}")


def positive(obj: Any, prefix: str, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = getattr(obj, key)
        if optional and value is None:
            continue
        if value < 1:
            raise DistillError(f"{prefix}.{key} must be >= 1, got {value}")
