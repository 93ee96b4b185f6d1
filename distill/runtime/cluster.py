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
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Mapping, NoReturn, Optional

from distill.errors import DistillError

# Ctrl-C takes the same clean path as Slurm's warning: finish the step, checkpoint, exit 0.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Command lines of the launchers whose death must stop their ranks (a shell or nohup parent must not).
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch", "torchrun")
_WATCH_SECONDS = 2.0


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
    import socket

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


def join_process_group() -> None:
    """Join the launcher's process group through DeepSpeed (gloo on CPU, NCCL on GPU)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    if cpu:  # the shared-memory all-reduce op and its workspaces are DeepSpeed's CPU backend
        clear_leftovers(get_accelerator().get_op_builder("ShareMemCommBuilder").NAME)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
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


LEFTOVER_AGE = 60.0  # seconds: older than any start-up step that could still own the leftover
BUILD_WAIT = 1800.0  # seconds: longer than DeepSpeed's CPU op takes to build on a loaded machine


def clear_leftovers(op: str) -> None:
    """Clear what a run killed while starting left behind, before this one starts: a stale build lock
    of DeepSpeed's JIT-compiled op ``op`` (torch would wait on it forever, silently) and shared-memory
    workspaces nothing uses any more (RAM). Local rank 0 clears; the other local ranks wait for the lock."""
    from torch.utils.cpp_extension import _get_build_directory

    first = os.environ.get("LOCAL_RANK", "0") == "0"
    # torch's own answer (TORCH_EXTENSIONS_DIR, else a folder per Python and accelerator): where it builds ``op``
    clear_stale_build_lock(Path(_get_build_directory(op, verbose=False)), remove=first)
    if first:
        remove_orphaned_shm(Path("/dev/shm"))


def clear_stale_build_lock(build_dir: Path, remove: bool, min_age: float = LEFTOVER_AGE, poll: float = 1.0,
                           build_wait: float = BUILD_WAIT) -> None:
    """Remove (``remove``) or wait out (up to ``2 * min_age``) the ``lock`` file of torch's extension build
    in ``build_dir`` that no live process builds under: a build killed before it released its lock.

    torch's FileBaton makes every later build wait until the lock disappears, then import the op as if
    built. So the other ranks must not reach the build while the stale lock is here: they wait for
    local rank 0 to remove it, as they wait for a lock that a live build holds. While processes build
    there, every rank waits for them: a live run's build releases the lock when done, and a killed run's
    compiler (which outlives it) leaves a stale lock when done. Past ``build_wait`` one line says so."""
    lock = build_dir / "lock"
    give_up = time.monotonic() + build_wait
    quiet_deadline = time.monotonic() + 2 * min_age  # for the ranks that wait: reset while a build runs
    seen_stale = False
    while (age := _age(lock)) is not None:
        now = time.monotonic()
        if _busy(build_dir):
            seen_stale, quiet_deadline = False, now + 2 * min_age
            if now > give_up:
                raise DistillError(f"the build lock {lock} has been held for over {build_wait:.0f} s while processes "
                                   f"compile in {build_dir}: if no run builds there now, end those processes (a "
                                   "killed run's compiler outlives it) and start again")
        elif remove and age > min_age:
            if seen_stale:  # stale at two looks in a row: not a build between two of its steps
                lock.unlink(missing_ok=True)
                print(f"distill: removed {lock}, a stale build lock (no process builds in {build_dir}; "
                      f"a run was likely killed while building)", flush=True)
                return
            seen_stale = True
        elif not remove and now > quiet_deadline:
            return
        time.sleep(poll)


def remove_orphaned_shm(shm_dir: Path, min_age: float = LEFTOVER_AGE) -> list[Path]:
    """Remove this user's DeepSpeed all-reduce workspaces in ``shm_dir`` (see ``_release_shm_workspace``)
    that runs killed before unlinking them left: older than ``min_age``, and no live process maps or
    holds them open. Returns them."""
    now = time.time()
    old = [p for p in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")
           if (age := _age(p, now)) is not None and age > min_age]
    used = _files_in_use() if old else set()
    orphans = [p for p in old if str(p) not in used]
    for p in orphans:
        p.unlink(missing_ok=True)
    if orphans:
        print(f"distill: removed {len(orphans)} shared-memory workspaces that killed runs left in {shm_dir}",
              flush=True)
    return orphans


def _age(path: Path, now: Optional[float] = None) -> Optional[float]:
    """Seconds since ``path`` was last modified; None when it is gone."""
    try:
        return (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # gone meanwhile, or another user's
        return ""


def _busy(directory: Path) -> bool:
    """Whether a live process works in ``directory``: ninja and the compiler run there and name it."""
    names = {str(directory), os.path.realpath(directory)}
    for pid in _pids():
        cwd = _readlink(f"/proc/{pid}/cwd")
        args = _cmdline(pid)
        if any(cwd == n or cwd.startswith(n + "/") or n in args for n in names):
            return True
    return False


def _files_in_use() -> set[str]:
    """The files that live processes (those this user may inspect) map or hold open."""
    used: set[str] = set()
    for pid in _pids():
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        # address, permissions, offset, device, inode, and the path when the mapping has one
        used.update(f[5] for f in (line.split(maxsplit=5) for line in maps) if len(f) == 6)
        used.update(_readlink(f"/proc/{pid}/fd/{fd}") for fd in fds)
    return used


def leave_process_group_at_exit() -> None:
    """At interpreter exit, tear the process group down. Exiting while its communication threads
    still run can abort a rank ("terminate called without an active exception") after its work is
    done, failing a job that succeeded."""
    import atexit

    atexit.unregister(_leave_process_group)  # once, however often main() runs in one process
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    # A command that never imported torch has no process group; importing torch this late, during
    # interpreter shutdown, makes its operator-library finalizers fail ("Exception ignored ... _del_library").
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    # No barrier: a rank that failed alone must still be able to exit (the launcher then stops the rest).
    if dist.is_initialized():
        dist.destroy_process_group()


ERROR_KEY = "distill/error/{}"
ERROR_WAIT = 5.0  # seconds a rank waits for rank 0 to report the same error before reporting its own


def _store():
    """The process group's key-value store (hosted by rank 0), or None before the group exists."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def error_line(rank: int, message: str) -> Optional[str]:
    """What a rank prints for its ``DistillError``: rank 0 its message; another rank its message with its
    rank, unless rank 0 reports the same one (a check every rank makes). Before the process group exists
    every rank makes the same checks, so rank 0 speaks for all. A check only one rank makes (a damaged
    shard that rank reads) is reported by that rank, and its peers' lost connections stay quiet
    (``another_rank_failed``)."""
    store = _store()
    if store is None:
        return message if rank == 0 else None
    try:
        store.set(ERROR_KEY.format(rank), message)
        if rank == 0:
            return message
        store.wait([ERROR_KEY.format(0)], timedelta(seconds=ERROR_WAIT))
        same = store.get(ERROR_KEY.format(0)).decode() == message
    except Exception:  # noqa: BLE001 - rank 0 has no such error (the wait timed out) or is gone with its store
        same = False
    return None if same else f"rank {rank}: {message}"


def another_rank_failed(rank: int, world: int) -> bool:
    """Whether another rank has reported an error: this rank's failure is then the echo of it (a peer
    that closed its connection), and the other rank's line says why."""
    store = _store()
    if store is None:
        return False
    try:
        return any(store.check([ERROR_KEY.format(r)]) for r in range(world) if r != rank)
    except Exception:  # noqa: BLE001 - the store went with rank 0
        return False


def exit_rank(code: int) -> NoReturn:
    """End a launched rank's process with ``code``: the exit handlers run (the process group's teardown
    among them) and stdio is flushed, but the interpreter's finalization and the C++ static destructors
    are skipped. A communication thread still joinable there aborts a rank whose work is done, now and
    then, even after the teardown (seen with gloo on CPU), and the launcher then fails the whole job."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def launcher_pids(pid: Optional[int] = None) -> list[int]:
    """The launcher processes above rank ``pid``: deepspeed's per-node launch and the ``deepspeed``
    command above it (killing the latter leaves the former waiting for its ranks), or torchrun; and
    ``distill train`` when it started the run."""
    supervisor = [int(os.environ["DISTILL_WATCH_PID"])] if os.environ.get("DISTILL_WATCH_PID") else []  # distill train
    parent = _parent(pid or os.getpid())
    if not any(name in _cmdline(parent) for name in _LAUNCHERS):
        return supervisor
    grandparent = _parent(parent)
    top = "deepspeed.launcher.launch" in _cmdline(parent) and "deepspeed" in _cmdline(grandparent)
    return [parent, grandparent, *supervisor] if top else [parent, *supervisor]


class StopRequest:
    """A request to stop at the end of the current step: a signal to this process (SIGUSR1, SIGTERM,
    SIGINT), a stop file, or the death of the launcher that started this rank (a watchdog thread)."""

    def __init__(self, stop_file: Optional[Path] = None, watch: Optional[list[int]] = None):
        import threading

        self.stop_file = stop_file
        self.signal: Optional[int] = None
        self.orphaned = False
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._closed = threading.Event()
        self._watched = [(pid, _cmdline(pid)) for pid in (launcher_pids() if watch is None else watch)]
        if self._watched:
            threading.Thread(target=self._watch, daemon=True, name="distill-launcher-watch").start()

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def _watch(self) -> None:
        while not self._closed.wait(_WATCH_SECONDS):
            # A dead launcher's pid may be reused, but hardly by the same command line.
            if any(_cmdline(pid) != cmdline for pid, cmdline in self._watched):
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
