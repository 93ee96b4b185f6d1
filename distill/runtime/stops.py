"""How a run is asked to stop, and how the ranks agree on it.

Slurm warns a job before its time limit or a preemption with a signal (``--signal=USR1@120``) or SIGTERM.
``StopRequest`` records it, on whichever rank it arrives, or notices a stop file written by the batch
script's trap, or the death of the launcher above the rank; ``StopVote`` agrees on it across ranks once per
step; the trainer then saves a complete checkpoint and exits cleanly, and the job requeues itself and
resumes from there.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

from distill.runtime import processes

# Ctrl-C takes the same clean path as Slurm's warning: finish the step, checkpoint, exit 0.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Command lines of the launchers whose death must stop their ranks (a shell or nohup parent must not).
LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch", "torchrun")
WATCH_SECONDS = 2.0


def launcher_pids(pid: Optional[int] = None) -> list[int]:
    """The launcher processes above rank ``pid``: deepspeed's per-node launch and the ``deepspeed``
    command above it (killing the latter leaves the former waiting for its ranks), or torchrun; and
    ``distill train`` when it started the run."""
    supervisor = [int(os.environ["DISTILL_WATCH_PID"])] if os.environ.get("DISTILL_WATCH_PID") else []  # distill train
    parent = processes.parent(pid or os.getpid())
    if not any(name in processes.cmdline(parent) for name in LAUNCHERS):
        return supervisor
    grandparent = processes.parent(parent)
    top = "deepspeed.launcher.launch" in processes.cmdline(parent) and "deepspeed" in processes.cmdline(grandparent)
    return [parent, grandparent, *supervisor] if top else [parent, *supervisor]


class StopRequest:
    """A request to stop at the end of the current step: a signal to this process (SIGUSR1, SIGTERM,
    SIGINT), a stop file, or the death of the launcher that started this rank (a watchdog thread)."""

    def __init__(self, stop_file: Optional[Path] = None, watch: Optional[list[int]] = None):
        self.stop_file = stop_file
        self.signal: Optional[int] = None
        self.orphaned = False
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._closed = threading.Event()
        self._watched = [(pid, processes.cmdline(pid)) for pid in (launcher_pids() if watch is None else watch)]
        if self._watched:
            threading.Thread(target=self._watch, daemon=True, name="distill-launcher-watch").start()

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_SECONDS):
            # A dead launcher's pid may be reused, but hardly by the same command line.
            if any(processes.cmdline(pid) != cmdline for pid, cmdline in self._watched):
                self.orphaned = True
                return

    @property
    def requested(self) -> bool:
        return self.signal is not None or self.orphaned or (self.stop_file is not None and self.stop_file.exists())

    def close(self) -> None:
        self._closed.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopVote:
    """Agree over ranks, once per step, whether any rank was asked to stop, without waiting on the
    accelerator. On a GPU the vote is a CPU tensor on a gloo group of its own, started at one step and
    read at the next, so every rank learns the same answer at the same step and no rank's host blocks
    on the others mid-step. On CPU ranks (gloo already) the vote is a plain blocking all-reduce: there
    is no device queue to keep fed, and nothing is left in flight when the run exits."""

    def __init__(self):
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self.lagged = get_accelerator().device_name() != "cpu"
        self.group = dist.new_group(backend="gloo") if self.lagged else None  # every rank, in the same order
        self.pending = None

    def poll(self, requested: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(requested)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=self.lagged)
        if not self.lagged:
            return bool(flag.numpy()[0])  # a CPU tensor: reading it waits on no device
        previous, self.pending = self.pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].numpy()[0])

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
