"""Checkpoints: the student's DeepSpeed state plus the trainer's own, checksummed, with an honest "latest".

Layout of ``<output_dir>/checkpoints``:

    step-00000200/            DeepSpeed's files (weights, optimizer, scheduler) for every rank
    step-00000200/trainer_state_rank{r}.pt   step, data position, RNG states of rank r
    step-00000200/checksums.json             size and sha256 of every file above, world size, run id
    step-00000200/universal/                 made by the first resume on another number of ranks (universal.py)
    latest                    the newest complete tag (DeepSpeed's own tools read this file too)

A save writes into ``step-N.partial``; only when every rank's files are on disk, hashed and fsynced
does rank 0 write the manifest, rename the directory to ``step-N`` and move ``latest``. So a kill or a
full disk halfway leaves at most a ``.partial`` directory, never a tag that looks complete. Resuming
verifies the checksums (each rank hashes a share of the files) and falls back to the newest intact
checkpoint when the latest is torn, whatever number of ranks wrote it. Pruning only ever removes
checkpoints of the same run (run id).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from distill.errors import DistillError
from distill.files import describe_write_error, file_digest, fsync_dir, write_atomic

LATEST = "latest"
MANIFEST = "checksums.json"
PARTIAL = ".partial"
_TAG = re.compile(r"^step-(\d{8,})$")

# gather(x) -> [x of rank 0, x of rank 1, ...]: an all-gather, or [x] in a single process.
Gather = Callable[[Any], list]


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def new_run_id() -> str:
    return uuid.uuid4().hex


def state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_state_rank{rank}.pt"


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


# ---- reading ---------------------------------------------------------------------------------------

def read_latest(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names, or None when it is missing, empty or not a tag."""
    marker = Path(ckpt_dir) / LATEST
    try:
        text = marker.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _TAG.match(text) else None


def read_manifest(tag_dir: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of finished saves (renamed from .partial), newest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted((p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and _TAG.match(p.name)), reverse=True)


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a run's checkpoints or exported student (metrics alone are
    what a run killed before its first checkpoint leaves: nothing to resume, nothing to protect)."""
    ckpt = out_dir / "checkpoints"
    return bool(complete_tags(ckpt)) or (ckpt / LATEST).exists() or (out_dir / "final").exists()


def verify(tag_dir: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """What is wrong with this rank's share (every world-th file) of a checkpoint, or None."""
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return f"{MANIFEST} is missing or unreadable"
    expected = [state_file(Path(""), r).name for r in range(int(manifest.get("world_size", 0)))]
    if rank == 0 and (not expected or any(name not in manifest["files"] for name in expected)):
        return "its manifest lists no trainer state for some rank"
    return check_files(tag_dir, manifest["files"], rank, world)


def check_files(root: Path, files: dict[str, dict[str, Any]], rank: int = 0, world: int = 1) -> Optional[str]:
    """What is wrong with this rank's share of ``files`` (name -> size and sha256) under ``root``, or None."""
    for name in sorted(files)[rank::world]:
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        want = files[name]
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if file_digest(path)["sha256"] != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def verify_all(tag_dir: Path, rank: int, world: int, gather: Gather) -> Optional[str]:
    """The first problem any rank found in its share, the same answer on every rank."""
    return next((p for p in gather(verify(tag_dir, rank, world)) if p), None)


def resolve_resume(ckpt_dir: Path, resume: str, world_size: int, rank: int = 0, gather: Gather = lambda x: [x],
                   say: Callable[[str], None] = print) -> Optional[str]:
    """The verified tag to resume from, or None to start fresh. With ``auto``, a torn or corrupted
    latest checkpoint falls back to the newest intact older one, with one line saying so. The ranks
    share the hashing; the checkpoint may have been written by any number of ranks."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "never":
        return None
    if resume != "auto":
        if not (ckpt_dir / resume).is_dir():
            raise DistillError(f"checkpoint '{resume}' not found in {ckpt_dir}")
        problem = verify_all(ckpt_dir / resume, rank, world_size, gather)
        if problem:
            raise DistillError(f"checkpoint {ckpt_dir / resume} is damaged: {problem}")
        return resume
    tags = complete_tags(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest is None and (ckpt_dir / LATEST).exists():
        say(f"distill: {ckpt_dir / LATEST} is empty or unreadable; looking for the newest intact checkpoint")
    elif latest is not None:
        tags = [t for t in tags if t <= latest]
        if latest not in tags:
            say(f"distill: {ckpt_dir / LATEST} names {latest}, which does not exist")
    damaged = []
    for tag in tags:
        problem = verify_all(ckpt_dir / tag, rank, world_size, gather)
        if problem is None:
            if damaged:
                say(f"distill: {'; '.join(damaged)}; resuming from {tag}, the newest intact checkpoint")
            return tag
        damaged.append(f"checkpoint {tag} is damaged ({problem})")
    if damaged:
        raise DistillError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(damaged)} "
                           "(training.resume=never with a new training.output_dir starts over)")
    return None


def run_id_of(tag_dir: Path) -> str:
    return read_manifest(tag_dir)["run_id"]


def world_size_of(tag_dir: Path) -> int:
    """How many ranks wrote the checkpoint."""
    return int(read_manifest(tag_dir)["world_size"])


def newer_than(ckpt_dir: Path, tag: str) -> list[str]:
    return [t for t in complete_tags(ckpt_dir) if t > tag]


# ---- writing ---------------------------------------------------------------------------------------

def save(engine, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: Optional[int], run_id: str,
         rank: int, world: int, gather: Gather, barrier: Callable[[], None],
         write_model_files: Optional[Callable[[Path], None]] = None) -> str:
    """Write a complete checkpoint from every rank, then mark it latest and prune this run's older ones.

    ``keep=None`` prunes nothing. ``write_model_files(tag_dir)`` (rank 0) adds what an offline export needs
    besides the weights. A failure on any rank (a full disk, say) removes the partial directory and raises
    one line on every rank."""
    tag = tag_for(step)
    partial, final = ckpt_dir / (tag + PARTIAL), ckpt_dir / tag
    # A NaN model never becomes latest, nor makes the pruning remove the last finite checkpoint.
    if not all(gather(all_finite(engine.module))):
        raise DistillError(f"the weights are not finite at step {step}: not saved, not exported; the last finite "
                           f"checkpoint is {read_latest(ckpt_dir) or 'none'}")

    def on_every_rank(action: Callable[[], Any]) -> list:
        try:
            result, error = action(), None
        except Exception as exc:  # noqa: BLE001 - any failure of any rank must reach every rank
            result, error = None, describe_write_error(exc, partial)
        outcomes = gather((result, error))
        failed = next((e for _, e in outcomes if e), None)
        if failed:
            barrier()
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise DistillError(f"saving checkpoint {final} failed: {failed}")
        return [r for r, _ in outcomes]

    def write() -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, save_latest=False)
        torch.save({**trainer_state, "rng": rng_state(), "world_size": world}, state_file(partial, rank))
        if rank == 0 and write_model_files is not None:
            write_model_files(partial)

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    barrier()
    on_every_rank(write)
    barrier()  # every rank's files exist before any rank lists them
    names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    shares = on_every_rank(lambda: {n: file_digest(partial / n, sync=True) for n in names[rank::world]})

    def publish() -> None:
        if rank != 0:
            return
        files = {name: digest for share in shares for name, digest in share.items()}
        manifest = {"tag": tag, "step": step, "world_size": world, "run_id": run_id, "files": files}
        write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        for d in sorted({(partial / n).parent for n in names}, reverse=True):
            fsync_dir(d)
        if final.exists():  # this run's own unmarked save of the same step (killed before "latest" moved)
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(ckpt_dir)
        write_atomic(ckpt_dir / LATEST, tag)
        if keep is not None:
            prune(ckpt_dir, keep, run_id)

    on_every_rank(publish)
    return tag


def all_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's parameters (its ZeRO-3 partitions, or whole tensors) are all finite."""
    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def prune(ckpt_dir: Path, keep: int, run_id: str) -> None:
    """Keep the ``keep`` newest checkpoints of run ``run_id`` up to latest; never touch another run's."""
    latest = read_latest(ckpt_dir)
    mine = [t for t in complete_tags(ckpt_dir)
            if latest is not None and t <= latest and (read_manifest(ckpt_dir / t) or {}).get("run_id") == run_id]
    for tag in mine[keep:]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, rank: int, world: int, universal: Optional[Path] = None) -> dict[str, Any]:
    """Restore the student's engine and the trainer state; returns the trainer state.

    ``universal``, the converted copy of a checkpoint written by another number of ranks, is what an
    engine built with ``"checkpoint": {"load_universal": true}`` loads its partition from. The trainer
    state is the same on every rank; the RNG streams continue only on as many ranks as wrote them (on
    another number the caller seeds new ones)."""
    if universal is None:
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    else:
        path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
    if path is None:
        raise DistillError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    same_world = world_size_of(ckpt_dir / tag) == world
    state = torch.load(state_file(ckpt_dir / tag, rank if same_world else 0), weights_only=False)
    rng = state.pop("rng")
    if same_world:
        set_rng_state(rng)
    return state


def apply_optimizer_settings(scheduler, learning_rate: float, weight_decay: float) -> None:
    """A resumed run's learning rate, schedule and weight decay from its first step. Loading restores
    the checkpoint's: the scheduler's ``base_lrs`` and each parameter group's lr and weight decay."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [learning_rate] * len(groups)
    lrs = [learning_rate * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, lr in zip(groups, lrs):
        group["lr"], group["weight_decay"] = lr, weight_decay
    scheduler._last_lr = lrs  # what get_last_lr() reports until the scheduler's next step


DATA_RECORD = "data.json"  # the training data's identity when the checkpoint was written


def check_data(tag_dir: Path, identity: dict[str, Any], allow_change: bool) -> Optional[str]:
    """Whether a resume trains on the data its checkpoint was written with. Other content at the same
    path is refused with one line, or, with ``training.allow_data_change``, returned as the line to say.
    A checkpoint written before the record existed is not checked."""
    record = tag_dir / DATA_RECORD
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    if saved == identity:
        return None
    what = (f"the training data is not what {tag_dir.name} was trained on ({saved['examples']} examples, text digest "
            f"{saved['text']}; now {identity['examples']}, {identity['text']})")
    if not allow_change:
        raise DistillError(f"{what}: resume on the same data, set training.allow_data_change=true to continue on "
                           "this data from the same position, or start a new output_dir")
    return f"distill: {what}; training.allow_data_change is set: continuing on it from the same position"
