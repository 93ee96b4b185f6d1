"""What a run killed while starting leaves behind is cleared by the next one, and only that."""

import os
import subprocess
import sys
import threading
import time

import pytest

from distill.errors import DistillError
from distill.runtime import leftovers
from distill.runtime.leftovers import clear_leftovers, clear_stale_build_lock, remove_orphaned_shm


def _age_by(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def live():
    """Start a process that holds a file (``open``: an open descriptor; ``map``: a mapping, descriptor
    closed) or just sleeps (``sleep``), with the given arguments and working directory."""
    procs = []
    scripts = {
        "open": "f = open(sys.argv[1], 'rb')",
        "map": "import mmap\nwith open(sys.argv[1], 'r+b') as f: m = mmap.mmap(f.fileno(), 0)",
        "sleep": "",
    }

    def start(kind, *args, cwd=None):
        code = f"import sys, time\n{scripts[kind]}\nprint('ready', flush=True)\ntime.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_stale_build_lock_is_removed(tmp_path, capsys):
    lock = tmp_path / "lock"
    lock.touch()
    _age_by(lock, 120)
    clear_stale_build_lock(tmp_path, remove=True, poll=0.05)
    assert not lock.exists()
    assert f"distill: removed {lock}, a stale build lock" in capsys.readouterr().out


def test_fresh_lock_is_waited_for_then_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    start = time.monotonic()
    clear_stale_build_lock(tmp_path, remove=True, min_age=0.5, poll=0.05)
    assert not lock.exists() and time.monotonic() - start >= 0.5


@pytest.mark.parametrize("where", ["cwd", "argument"])
def test_lock_of_a_live_build_is_waited_for_then_cleared(tmp_path, live, capsys, where):
    """A build still running (a live run's, or the compiler a killed run left): wait for it, then the lock
    it left (nobody released it) is stale and goes. It used to be looked at once, then waited on forever."""
    lock = tmp_path / "lock"
    lock.touch()
    _age_by(lock, 120)
    if where == "cwd":  # ninja and the compiler run in the build directory
        build = live("sleep", cwd=tmp_path)
    else:
        build = live("sleep", tmp_path / "shm.o")
    threading.Timer(0.5, build.kill).start()
    start = time.monotonic()
    clear_stale_build_lock(tmp_path, remove=True, poll=0.05)
    assert not lock.exists() and 0.5 <= time.monotonic() - start < 5
    assert f"distill: removed {lock}, a stale build lock" in capsys.readouterr().out


def test_a_live_build_released_lock_is_left_to_torch(tmp_path, live, capsys):
    lock = tmp_path / "lock"
    lock.touch()
    build = live("sleep", cwd=tmp_path)
    threading.Timer(0.3, lambda: (lock.unlink(), build.kill())).start()  # the build finishes: its lock goes
    clear_stale_build_lock(tmp_path, remove=True, poll=0.05)
    assert capsys.readouterr().out == ""


def test_a_build_that_never_ends_is_one_line_not_a_hang(tmp_path, live):
    lock = tmp_path / "lock"
    lock.touch()
    live("sleep", cwd=tmp_path)
    start = time.monotonic()
    with pytest.raises(DistillError, match=f"the build lock {lock} has been held for over 0 s while processes compile"):
        clear_stale_build_lock(tmp_path, remove=False, poll=0.05, build_wait=0.3)
    assert lock.exists() and time.monotonic() - start < 5


def test_other_local_ranks_wait_for_rank_0(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _age_by(lock, 120)
    threading.Timer(0.5, lock.unlink).start()  # local rank 0
    start = time.monotonic()
    clear_stale_build_lock(tmp_path, remove=False, poll=0.05)
    assert 0.5 <= time.monotonic() - start < 5
    lock.touch()
    _age_by(lock, 120)
    start = time.monotonic()
    clear_stale_build_lock(tmp_path, remove=False, min_age=0.3, poll=0.05)  # nobody removes it: give up
    assert lock.exists() and 0.6 <= time.monotonic() - start < 5


def test_orphaned_workspaces_are_removed(tmp_path, live, capsys):
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_"
    paths = {name: tmp_path / f"{prefix}{name}" for name in ("orphan_0", "orphan_1", "young_0", "open_0", "mapped_0")}
    paths["other_user"] = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid() + 1}_127.0.0.1_29500_0"
    paths["unrelated"] = tmp_path / "something_else"
    for name, path in paths.items():
        path.write_bytes(b"\0" * 4096)
        if name != "young_0":
            _age_by(path, 120)
    live("open", paths["open_0"])
    live("map", paths["mapped_0"])
    removed = remove_orphaned_shm(tmp_path)
    assert sorted(removed) == [paths["orphan_0"], paths["orphan_1"]]
    assert sorted(tmp_path.iterdir()) == sorted(p for n, p in paths.items() if not n.startswith("orphan"))
    assert f"distill: removed 2 shared-memory workspaces that killed runs left in {tmp_path}" in capsys.readouterr().out
    assert remove_orphaned_shm(tmp_path) == [] and capsys.readouterr().out == ""


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_only_local_rank_0_clears(tmp_path, monkeypatch, local_rank):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    calls = []
    monkeypatch.setattr(leftovers, "remove_orphaned_shm", calls.append)
    (tmp_path / "op").mkdir()
    lock = tmp_path / "op" / "lock"
    lock.touch()
    _age_by(lock, 120)
    if local_rank == "1":
        threading.Timer(0.5, lock.unlink).start()  # local rank 0
    clear_leftovers("op")
    assert not lock.exists()
    assert calls == ([leftovers.Path("/dev/shm")] if local_rank == "0" else [])
