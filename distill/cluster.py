"""Where a rank learns who it is, under any launcher, and how a run is asked to stop.

* ``deepspeed`` and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
  ``srun`` with one task per rank sets SLURM_* instead; ``adopt_slurm_env`` maps those to the torch
  names (only when the torch ones are absent), the master being the first host of the job's node list.
* Slurm warns a job before its time limit or a preemption with a signal (``--signal=USR1@120``) or
  SIGTERM. ``StopRequest`` records it, on whichever rank it arrives, or notices a stop file written
  by the batch script's trap; the trainer agrees on it across ranks once per step, saves a complete
  checkpoint and exits cleanly, and the job requeues itself and resumes from there.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Mapping, Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") as host names, in order."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        match = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def slurm_torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables an ``srun`` task lacks, derived from SLURM_* (empty when the
    launcher already set them, or outside Slurm)."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
        # one port per job, so two jobs sharing a node do not collide
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
    }
    return out


def adopt_slurm_env() -> None:
    os.environ.update(slurm_torch_env(os.environ))


def join_process_group() -> None:
    """Join the launcher's process group through DeepSpeed (gloo on CPU, NCCL on GPU)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend="gloo" if get_accelerator().device_name() == "cpu" else None)
    _release_shm_workspace(dist.get_rank(), dist.get_world_size())


def _release_shm_workspace(rank: int, world: int) -> None:
    """Unlink this rank's name of DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    DeepSpeed's CPU backend gives each rank a 66 MB POSIX shared-memory file named after the master
    address and port, and never removes it. /dev/shm is RAM: run after run (a new port each time) they
    pile up until the machine runs out of memory. The mappings stay valid after the unlink, and the
    memory goes back when the last rank exits, however it exits."""
    import torch.distributed as dist
    from deepspeed import comm

    backend = getattr(comm.comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world):
        return  # no shared-memory workspace: another accelerator, or ranks on several nodes
    dist.barrier()  # every rank has opened every other rank's file
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    Path(name).unlink(missing_ok=True)


def leave_process_group_at_exit() -> None:
    """At interpreter exit, tear the process group down. Exiting while its communication threads
    still run can abort a rank ("terminate called without an active exception") after its work is
    done, failing a job that succeeded."""
    import atexit

    atexit.unregister(_leave_process_group)  # once, however often main() runs in one process
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    import torch.distributed as dist

    # No barrier: a rank that failed alone must still be able to exit (the launcher then stops the rest).
    if dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """A request to stop at the end of the current step: a signal to this process, or a stop file."""

    def __init__(self, stop_file: Optional[Path] = None):
        self.stop_file = stop_file
        self.signal: Optional[int] = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None or (self.stop_file is not None and self.stop_file.exists())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
