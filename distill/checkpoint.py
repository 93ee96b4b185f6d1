"""Checkpoints: the student's DeepSpeed state plus the trainer's own, and an honest "latest" marker.

Layout of ``<output_dir>/checkpoints``:

    step-00000200/            DeepSpeed's files (weights, optimizer, scheduler) for every rank
    step-00000200/trainer_state_rank{r}.pt   step, data position, RNG states of rank r
    latest                    the newest *complete* tag (DeepSpeed's own tools read this file too)

"latest" is rewritten atomically by rank 0 only after every rank has finished writing, so a run
killed halfway through a save still resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from distill.errors import DistillError

LATEST = "latest"
_TAG = re.compile(r"^step-(\d+)$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _state_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"trainer_state_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_latest(ckpt_dir: Path) -> Optional[str]:
    marker = ckpt_dir / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: int,
         write_model_files: Optional[Callable[[Path], None]] = None) -> str:
    """Write a complete checkpoint on every rank, then mark it latest and prune older ones.

    ``write_model_files(tag_dir)`` (rank 0) adds what an offline export needs besides the weights."""
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state(), "world_size": world}, _state_file(ckpt_dir, tag, rank))
    if rank == 0 and write_model_files is not None:
        write_model_files(ckpt_dir / tag)
    dist.barrier()  # every rank's files are on disk before the tag becomes "latest"
    if rank == 0:
        write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    latest = read_latest(ckpt_dir)
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)), reverse=True)
    complete = [t for t in tags if latest is not None and t <= latest]
    for tag in complete[keep:]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    # Anything newer than "latest" is a save that never finished: it would never be resumed from.
    for tag in tags:
        if latest is not None and tag > latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def resolve_resume(ckpt_dir: Path, resume: str, world_size: int) -> Optional[str]:
    """The tag to resume from, or None to start fresh. Checked on every rank before any model loads."""
    if resume == "never":
        return None
    tag = read_latest(ckpt_dir) if resume == "auto" else resume
    if tag is None:
        return None
    if not (ckpt_dir / tag).is_dir():
        raise DistillError(f"checkpoint '{tag}' not found in {ckpt_dir}")
    missing = [r for r in range(world_size) if not _state_file(ckpt_dir, tag, r).is_file()]
    if missing:
        found = len(list((ckpt_dir / tag).glob("trainer_state_rank*.pt")))
        raise DistillError(f"checkpoint {ckpt_dir / tag} holds trainer state for {found} ranks, this run has "
                           f"{world_size}; resume with the world size that wrote it")
    return tag


def load(engine, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore the student's engine and this rank's trainer state; returns the trainer state."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise DistillError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    state = torch.load(_state_file(ckpt_dir, tag, dist.get_rank()), weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
