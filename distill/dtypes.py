"""The dtypes every command names, in one table: torch's spelling (the commands' ``--dtype``, saved model
configs) and the config's short one (``training.precision``). Names only, so the CLI builds its choices
without importing torch."""

from __future__ import annotations

from distill.errors import DistillError

DTYPE_NAMES = ("float32", "bfloat16", "float16")

SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The ``torch.dtype`` a name means, in either spelling ("bfloat16" or "bf16")."""
    import torch

    full = SHORT_NAMES.get(name, name)
    if full not in DTYPE_NAMES:
        raise DistillError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, full)
