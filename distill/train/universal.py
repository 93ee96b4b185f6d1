"""Resuming on another number of ranks: DeepSpeed's universal checkpoint, made once and kept.

A ZeRO-1/2/3 checkpoint holds each rank's partition of the fp32 master weights and Adam moments, cut
for the number of ranks that wrote it. ``deepspeed.checkpoint.ds_to_universal`` (ZeRO-1/2 and, in
DeepSpeed 0.19, ZeRO-3) consolidates them into one file per parameter and state
(``universal/zero/<parameter>/{fp32,exp_avg,exp_avg_sq}.pt``, the optimizer's step and hyperparameters
beside them) and copies the files that hold the learning-rate schedule and DeepSpeed's step counter; an
engine built with ``"checkpoint": {"load_universal": true}`` then loads its own partition of each on
any number of ranks. The student's projections live in its module, so they are parameters like any
other. Frozen parameters are not in the optimizer and come, unchanged, from the student's files.

Rank 0 converts while the other ranks wait; the result is written into ``step-N/universal.partial``,
checksummed, and renamed to ``step-N/universal`` (so a kill halfway leaves no copy that looks complete),
then reused by every later resume from that checkpoint on another number of ranks. A checkpoint whose
optimizer state is not partitioned (ZeRO-0 in fp32) loads on any number of ranks as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import types
from pathlib import Path
from typing import Callable, Optional

from distill.errors import DistillError, first_line
from distill.files import describe_write_error, file_digest, fsync_dir, write_atomic
from distill.train.checkpoint import MANIFEST, PARTIAL, Gather, check_files

UNIVERSAL = "universal"


def needed(tag_dir: Path) -> bool:
    """Whether the checkpoint's optimizer state is partitioned over the ranks that wrote it."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def _source(tag_dir: Path) -> str:
    """Names the checkpoint a universal copy was made from: its manifest holds every file's checksum."""
    return file_digest(tag_dir / MANIFEST)["sha256"]


def problem(tag_dir: Path, rank: int, world: int, gather: Gather) -> Optional[str]:
    """Why the checkpoint's universal copy cannot be used (missing, made from another checkpoint, damaged),
    or None; the ranks share the hashing and all get the same answer."""
    root = Path(tag_dir) / UNIVERSAL
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        found = "missing" if not root.exists() else f"{MANIFEST} is missing or unreadable"
    elif manifest.get("source") != _source(tag_dir):
        found = "it was made from another checkpoint"
    else:
        found = check_files(root, manifest["files"], rank, world)
    return next((p for p in gather(found) if p), None)


def prepare(tag_dir: Path, written: int, world: int, found: Optional[str], say: Callable[[str], None]) -> None:
    """On rank 0: convert the checkpoint when ``found`` says its universal copy cannot be used, and say in
    one line what happened."""
    tag_dir = Path(tag_dir)
    root = tag_dir / UNIVERSAL
    what = f"checkpoint {tag_dir.name} was written by {written} ranks and this run has {world}"
    if found is None:
        say(f"distill: {what}: resuming from its universal copy made earlier ({root})")
        return
    start = time.monotonic()
    convert(tag_dir)
    again = "" if found == "missing" else f" again (the earlier copy: {found})"
    say(f"distill: {what}: converted it to a universal checkpoint{again} in {time.monotonic() - start:.1f} s ({root})")
    return root


def convert(tag_dir: Path) -> None:
    """Write ``tag_dir/universal``: DeepSpeed's conversion into a partial directory, a manifest of every
    file's checksum (fsynced), then one rename."""
    from deepspeed.checkpoint import ds_to_universal

    work = tag_dir / (UNIVERSAL + PARTIAL)
    shutil.rmtree(work, ignore_errors=True)  # left by a conversion that was killed
    out = work / UNIVERSAL  # ds_to_universal also writes a "latest_universal" beside its output: it stays in work
    # One process: worker pools would fork a rank that holds a process group and its threads.
    args = types.SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # its progress bars and step-by-step prints; the caller says one line
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
        files = {str(p.relative_to(out)): file_digest(p, sync=True) for p in sorted(out.rglob("*")) if p.is_file()}
        write_atomic(out / MANIFEST, json.dumps({"source": _source(tag_dir), "files": files}, indent=1) + "\n")
        for d in sorted({p.parent for p in out.rglob("*")}, reverse=True):
            fsync_dir(d)
        shutil.rmtree(tag_dir / UNIVERSAL, ignore_errors=True)  # an earlier copy that failed its check
        os.replace(out, tag_dir / UNIVERSAL)
        fsync_dir(tag_dir)
    except OSError as exc:
        raise DistillError(f"converting checkpoint {tag_dir} to a universal checkpoint failed: "
                           f"{describe_write_error(exc, work)}") from None
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's asserts and errors, as one line
        raise DistillError(f"converting checkpoint {tag_dir} to a universal checkpoint failed: "
                           f"{first_line(exc)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
