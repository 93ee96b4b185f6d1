"""What runs killed while starting leave behind, cleared before a run starts: a stale build lock of
DeepSpeed's JIT-compiled CPU op and shared-memory workspaces nothing uses any more."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from distill.errors import DistillError
from distill.runtime.environment import rank_env
from distill.runtime.processes import cmdline, pids, readlink

LEFTOVER_AGE = 60.0  # seconds: older than any start-up step that could still own the leftover
BUILD_WAIT = 1800.0  # seconds: longer than DeepSpeed's CPU op takes to build on a loaded machine


def clear_leftovers(op: str) -> None:
    """Clear what a run killed while starting left behind, before this one starts: a stale build lock
    of DeepSpeed's JIT-compiled op ``op`` (torch would wait on it forever, silently) and shared-memory
    workspaces nothing uses any more (RAM). Local rank 0 clears; the other local ranks wait for the lock."""
    from torch.utils import cpp_extension  # torch at call time: the command line imports this package without it

    first = rank_env().local_rank == 0
    # torch's own answer (TORCH_EXTENSIONS_DIR, else a folder per Python and accelerator): where it builds ``op``
    clear_stale_build_lock(Path(cpp_extension._get_build_directory(op, verbose=False)), remove=first)
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
    """Remove this user's DeepSpeed all-reduce workspaces in ``shm_dir`` (see ``process_group.release_shm_workspace``)
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


def _busy(directory: Path) -> bool:
    """Whether a live process works in ``directory``: ninja and the compiler run there and name it."""
    names = {str(directory), os.path.realpath(directory)}
    for pid in pids():
        cwd = readlink(f"/proc/{pid}/cwd")
        args = cmdline(pid)
        if any(cwd == n or cwd.startswith(n + "/") or n in args for n in names):
            return True
    return False


def _files_in_use() -> set[str]:
    """The files that live processes (those this user may inspect) map or hold open."""
    used: set[str] = set()
    for pid in pids():
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        # address, permissions, offset, device, inode, and the path when the mapping has one
        used.update(f[5] for f in (line.split(maxsplit=5) for line in maps) if len(f) == 6)
        used.update(readlink(f"/proc/{pid}/fd/{fd}") for fd in fds)
    return used
