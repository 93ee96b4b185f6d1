"""The run directory (``training.output_dir``): one run at a time, and nothing of an earlier run lost.

* ``RunLock``: rank 0 holds ``.distill.lock`` for the life of the run. A second run on the same
  directory is refused with one line naming the holder. The holder refreshes the file's mtime every
  ``HEARTBEAT`` seconds, so a lock whose process is gone (same host) or whose heartbeat stopped
  (another host, which cannot be asked) is stale and taken over, with one line.
* ``prepare``: what starting a run may do to what is already there. ``training.resume: never`` on a
  directory that holds a run, or resuming from a tag older than other checkpoints, is refused unless
  ``training.overwrite`` says to discard the earlier run.
* ``record_config``: one ``configs/NNN-step-S.yaml`` per start, so a resumed run's changed settings
  stay on record; ``config.yaml`` is the latest.
* ``write_json``: a record of the run (``run_info.json``, ``eval_results.json``), whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from distill.errors import DistillError
from distill.files import describe_write_error, write_atomic
from distill.train import checkpoint

LOCK = ".distill.lock"
HEARTBEAT = 30.0  # seconds between refreshes of the lock's mtime
STALE_AFTER = 300.0  # a lock not refreshed for this long belongs to a dead host
# What a run writes besides its configs; training.overwrite removes these at the start.
RUN_OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "final", "best", "best.json", "eval_results.json",
               "memory.json", "run_info.json", "example_ids")


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (tells a live holder from a reused pid), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self, say=print) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DistillError(f"training.output_dir {self.path.parent} cannot be created: "
                               f"{describe_write_error(exc, self.path.parent)}") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._stale_holder()
                say(f"distill: removed the stale lock of {holder} on {self.path.parent}")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise DistillError(f"training.output_dir {self.path.parent} is not writable: "
                                   f"{describe_write_error(exc, self.path)}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="distill-lock")
            self._thread.start()
            return
        raise DistillError(f"could not take the lock {self.path}")

    def _stale_holder(self) -> str:
        """Describe the holder of a stale lock; a live one is refused with one line."""
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return "an unreadable lock file"  # torn by a kill while it was being written
        who = f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
        if holder.get("host") == socket.gethostname():
            start = _process_start(int(holder.get("pid", 0)))
            alive = start is not None and start in (holder.get("start"), "?")
        else:
            alive = age < STALE_AFTER
        if alive:
            raise DistillError(f"training.output_dir {self.path.parent} is in use by {who}; wait for that run, "
                               f"or use another output_dir (remove {self.path} only if that run is gone)")
        return who

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        self.path.unlink(missing_ok=True)


def prepare(out_dir: Path, resume: str, resume_tag: Optional[str], overwrite: bool) -> None:
    """Refuse a start that would overwrite or prune an earlier run, unless ``training.overwrite``; with it,
    remove the earlier run's outputs (rank 0 only, after the lock is held)."""
    ckpt = out_dir / "checkpoints"
    if resume_tag is None and checkpoint.holds_run(out_dir):
        if not overwrite:
            why = "training.resume is never" if resume == "never" else "it holds no intact checkpoint to resume"
            raise DistillError(f"training.output_dir {out_dir} already holds a run and {why}: use another "
                               "output_dir, or set training.overwrite=true to discard that run")
        for name in RUN_OUTPUTS:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    # (auto resumes from an older tag only when the newer ones are damaged; a save of their step replaces them)
    elif resume != "auto" and resume_tag is not None and (newer := checkpoint.newer_than(ckpt, resume_tag)):
        if not overwrite:
            raise DistillError(f"resuming from {resume_tag} would overwrite the newer checkpoints "
                               f"{', '.join(newer)}: set training.overwrite=true to discard them")
        for tag in newer:
            shutil.rmtree(ckpt / tag)
        write_atomic(ckpt / checkpoint.LATEST, resume_tag)


def record_config(out_dir: Path, text: str, step: int) -> Path:
    """Write this start's config as ``config.yaml`` and as the next ``configs/NNN-step-S.yaml``."""
    history = out_dir / "configs"
    history.mkdir(parents=True, exist_ok=True)
    n = len(list(history.glob("*.yaml"))) + 1
    path = history / f"{n:03d}-step-{step:08d}.yaml"
    write_atomic(path, text)
    write_atomic(out_dir / "config.yaml", text)
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
