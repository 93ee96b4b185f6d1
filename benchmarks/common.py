"""What every benchmark script shares: peak memory of this process, the machine, BENCHMARKS.md, and the
resumable stages of the quality comparisons (quality.py, task_agnostic.py)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).parents[1]


def rss_hwm() -> int:
    """Peak resident set of this process in bytes (Linux VmHWM; it cannot be reset, so callers
    measure growth above a value read before the work)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def append_section(title: str, body: str) -> None:
    """Add a dated section to BENCHMARKS.md, in place of an older one of the same title (one current
    section per benchmark; the older figures stay in git's history)."""
    path = ROOT / "BENCHMARKS.md"
    section = f"## {title} ({datetime.date.today()})\n\n{body.rstrip()}\n"
    old = re.compile(rf"^## {re.escape(title)} \(\d{{4}}-\d{{2}}-\d{{2}}\)\n.*?(?=^## |\Z)", re.M | re.S)
    text = path.read_text()
    if old.search(text):
        text = old.sub(lambda m: section + ("\n" if m.group(0).endswith("\n\n") else ""), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


class Stages:
    """Runs the commands, skipping those whose output marks them done, and keeps the list for the table.
    ``stages.json`` in the workdir records the command behind each marker, so a finished stage is reused
    only for the same settings."""

    def __init__(self, work: Path, nproc: int, name: str):
        self.work, self.nproc, self.name, self.commands, self.markers = work, nproc, name, [], []
        self.record = work / "stages.json"
        self.lock = threading.Lock()  # stages may run from a thread pool (task_agnostic.py's fine-tunes)

    def run(self, done: Path | None, cmd: list, title: str) -> None:
        """``done`` None: the command resumes itself (``distill generate``), so it always runs."""
        shown = " ".join(str(c) for c in cmd).replace(str(ROOT) + "/", "")
        with self.lock:
            self.commands.append(shown)
            if done is not None:
                self.markers.append(done)
        if done is not None and done.exists():
            self._check(done, cmd, title)
            print(f"== {title}: done ({done})", flush=True)
            return
        print(f"== {title}\n$ {shown}", flush=True)
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
        if proc.returncode != 0 or (done is not None and not done.exists()):
            raise SystemExit(f"{self.name}: {title} failed (exit {proc.returncode}): {shown}")
        if done is not None:
            self._check(done, cmd, title)

    def _check(self, done: Path, cmd: list, title: str) -> None:
        """Records the stage's settings, or stops if the finished stage was made with others (a stage made
        before this record existed is taken as it is)."""
        key = " ".join(str(c) for k, c in enumerate(cmd) if k == 0 or cmd[k - 1] != "--master_port")
        key = key.replace(str(ROOT) + "/", "")
        with self.lock:
            self._record(done, key, title)

    def _record(self, done: Path, key: str, title: str) -> None:
        record = json.loads(self.record.read_text()) if self.record.exists() else {}
        made = record.setdefault(str(done), key)
        if made != key:
            raise SystemExit(f"{self.name}: {title} in {done.parent} was made with other settings; remove it "
                             f"or use another --workdir (then: {made}; now: {key})")
        partial = self.record.with_suffix(".partial")  # replaced whole: a kill mid-write leaves the old record
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(self.record)

    def hours(self) -> float:
        """Wall time from the first stage's completion marker to the last one's, over every run and rerun."""
        times = [m.stat().st_mtime for m in self.markers if m.exists()]
        return (max(times) - min(times)) / 3600 if times else 0.0

    def distill(self, *args, ranks: int = 1) -> list:
        if ranks == 1:
            return [sys.executable, "-m", "distill.cli", *args]
        return self.deepspeed(ROOT / "launchers/distill_cli.py", *args)

    def deepspeed(self, script, *args) -> list:
        from distill.runtime.environment import free_port

        return [Path(sys.executable).with_name("deepspeed"), "--num_gpus", self.nproc, "--master_port", free_port(),
                script, *args]

    def train(self, recipe: Path, out: Path, overrides: list, title: str) -> Path:
        self.run(out / "eval_results.json",
                 self.deepspeed(ROOT / "launchers/run.py", "--config", recipe, *overrides,
                                f"training.output_dir={out}"), title)
        return out
