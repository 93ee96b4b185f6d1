"""The ranks' process group: joining it, leaving it at exit, one error line per failure over the ranks,
a decision rank 0 makes for all, and how a launched rank's process ends."""

from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, Optional

from distill.errors import DistillError
from distill.files import describe_write_error
from distill.runtime.leftovers import clear_leftovers


def join_process_group() -> None:
    """Join the launcher's process group through DeepSpeed (gloo on CPU, NCCL on GPU)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    if cpu:  # the shared-memory all-reduce op and its workspaces are DeepSpeed's CPU backend
        clear_leftovers(get_accelerator().get_op_builder("ShareMemCommBuilder").NAME)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
    release_shm_workspace(dist.get_rank(), dist.get_world_size())


def release_shm_workspace(rank: int, world: int) -> None:
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


def on_rank0(action, *args):
    """``action(*args)`` run on rank 0 only, its result shared with every rank; its refusal (or a failed
    file operation) is raised on every rank, so that none waits in a collective for one that stopped."""
    import torch.distributed as dist

    box = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box[0] = action(*args)
        except DistillError as exc:
            box[1] = str(exc)
        except OSError as exc:  # a full disk, a read-only directory: one line, on every rank
            box[1] = describe_write_error(exc, Path(exc.filename or "."))
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise DistillError(box[1])
    return box[0]


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
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code)
