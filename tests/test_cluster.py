"""Launcher environments and stop requests, without a cluster."""

import os
import signal
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.runtime.environment import RankEnv, expand_hostlist, rank_env, slurm_torch_env
from distill.runtime.process_group import on_rank0
from distill.runtime.stops import StopRequest


@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-11]-ib,b2", ["a8-ib", "a9-ib", "a10-ib", "a11-ib", "b2"]),
    ("node[001-002]", ["node001", "node002"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


def test_srun_task_gets_torch_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    out = slurm_torch_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "2",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # torchrun / deepspeed already set them: nothing is replaced
    assert slurm_torch_env({**env, "RANK": "0"}) == {}
    assert slurm_torch_env({}) == {}



def test_rank_env_reads_the_launcher_or_is_one_rank_alone():
    assert rank_env({}) == RankEnv(rank=0, world=1, local_rank=0, local_world=1)
    # an srun task's variables, once adopted, read the same as torchrun's
    srun = slurm_torch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"})
    assert rank_env(srun) == RankEnv(rank=5, world=8, local_rank=1, local_world=4)
    assert rank_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_world == 2  # one node


def test_on_rank0_in_one_process_returns_the_result_and_refuses_in_one_line(tmp_path):
    def refuse():
        raise DistillError("nothing here")

    assert on_rank0(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(DistillError, match="^nothing here$"):
        on_rank0(refuse)
    with pytest.raises(DistillError, match=f"{tmp_path / 'gone'}"):  # a failed file operation: one line, no traceback
        on_rank0(lambda: (tmp_path / "gone" / "f").write_text("x"))


def test_stop_request_by_signal_or_file(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(tmp_path / "stop")
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal == signal.SIGUSR1
    finally:
        stop.close()
    stop = StopRequest(tmp_path / "stop")
    try:
        (tmp_path / "stop").touch()
        assert stop.requested and stop.signal is None
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.integration
def test_ranks_leave_no_shared_memory_behind():
    """DeepSpeed's CPU backend keeps an all-reduce workspace per rank in /dev/shm (RAM) and never
    removes it; a run through ``join_process_group`` must leave nothing there, and all-reduce still works."""
    import json

    import ranks

    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    proc = ranks.launch(ranks.ROOT / "tests/scripts/all_reduce.py", [])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["sums"] == [[3.0], [3.0]] and r["shm"] for r in rows), rows  # 1 + 2 on every rank
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) <= before


def test_exit_rank_runs_exit_handlers_flushes_and_skips_finalization(tmp_path):
    """A rank ends with its status once its handlers ran, even with a thread still running (which
    interpreter finalization would wait on, and C++ teardown of one would abort the rank)."""
    import subprocess
    import sys

    marker = tmp_path / "handler-ran"
    script = f"""
import atexit, threading
from pathlib import Path
from distill.runtime.process_group import exit_rank
atexit.register(Path({str(marker)!r}).touch)
threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon
print("buffered line", end="")
exit_rank(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert (proc.returncode, proc.stdout) == (3, "buffered line"), proc.stderr
    assert marker.exists()


def test_every_script_launched_as_ranks_ends_through_exit_rank():
    """A script the deepspeed launcher runs (one that joins the process group, or runs a rank's entry point)
    and then leaves through interpreter finalization aborts now and then after its work is done, and the
    launcher fails the job: CI saw it in tests/scripts/run_recipes.py. Each must end through exit_rank."""
    root = Path(__file__).parents[1]
    entry = ("join_process_group()", "from distill.train.launch import main", "from distill.cli import main")
    scripts = [f for folder in ("launchers", "tests/scripts", "benchmarks") for f in sorted((root / folder).glob("*.py"))
               if any(e in f.read_text() for e in entry)]
    assert len(scripts) >= 8
    missing = [str(f.relative_to(root)) for f in scripts if "exit_rank(" not in f.read_text()]
    assert not missing, missing

