"""Where a rank learns who it is, under any launcher: its rank, the world's size, its local rank.

``deepspeed`` and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``srun``
with one task per rank sets SLURM_* instead; ``adopt_slurm_env`` maps those to the torch names (only when
the torch ones are absent), the master being the first host of the job's node list. A process started by
no launcher is one rank of its own (``one_rank_env``). ``rank_env`` is the one reader of the result.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Mapping, NamedTuple


class RankEnv(NamedTuple):
    """Who this process is among the launched ranks, as the launcher's environment says."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def rank_env(env: Mapping[str, str] = os.environ) -> RankEnv:
    """This process's place among the ranks; one rank of a world of one when no launcher started it."""
    world = int(env.get("WORLD_SIZE", 1))
    return RankEnv(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", world)))


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


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's master."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adopt_slurm_env() -> None:
    os.environ.update(slurm_torch_env(os.environ))


def one_rank_env() -> list[str]:
    """A process started with no launcher (plain ``python launchers/run.py``, an in-process fine-tune) is one
    rank of its own; DeepSpeed would otherwise look for MPI. Returns the variables it set, for a caller inside a
    longer-lived process to remove once its group exists: every process it starts later would inherit them
    (a Slurm job's tasks would all take rank 0 of a world of 1)."""
    if "WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ:
        return []
    added = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.update(added)
    return list(added)
