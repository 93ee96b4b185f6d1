"""Launch a script on CPU ranks under the real ``deepspeed`` launcher, the way users run the project."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from distill.runtime.environment import free_port

ROOT = Path(__file__).parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}
# What starts ranks: launchers and Slurm by name, a launcher's module, the ``distill`` commands that call a
# launcher, and any script of launchers/ (launchers/run.py alone still starts a DeepSpeed process group).
LAUNCHERS = {"deepspeed", "torchrun", "srun", "sbatch", "salloc", "slurmctld", "slurmd"}
LAUNCHER_MODULES = {"deepspeed.launcher.runner", "torch.distributed.run", "torch.distributed.launch"}
LAUNCHING_COMMANDS = {"train", "demo"}


@functools.cache
def _build_cpu_comm_op() -> None:
    """DeepSpeed compiles its CPU all-reduce op on first use (g++, half a minute on a quiet machine, much
    longer on a loaded one). Built here once, with no time limit, so a launch's timeout never kills the
    compiler halfway: that would leave the build's lock file behind and every later launch waiting on it."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, capture_output=True, cwd=ROOT)


def launch(script: Path | str, args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus nproc script args`` on a free port. On a timeout the whole process group
    goes (launcher, ranks, anything they started), so nothing is left running into later tests."""
    _build_cpu_comm_op()
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _kill(proc)
        raise AssertionError(f"{Path(script).name} on {nproc} ranks ran past {timeout} s\n{out[-2000:]}{err[-2000:]}")
    except BaseException:  # the test itself timed out or was interrupted
        _kill(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_run(overrides: list[str], recipe: Path = ROOT / "recipes/demo/kd.yaml", nproc: int = 2):
    """A training run: ``deepspeed launchers/run.py --config recipe overrides``."""
    return launch(ROOT / "launchers/run.py", ["--config", recipe, *overrides], nproc)


def launch_jobs(jobs: list[tuple[Path | str, list]], jobs_file: Path, nproc: int = 2, timeout: float = 900):
    """Jobs one after the other in one launch (tests/scripts/run_recipes.py), for jobs that cost less than a
    launch: ``jobs`` holds (recipe, overrides) training runs and ("distill", argv) commands, written to
    ``jobs_file``. The first job that fails ends the launch."""
    import json

    jobs_file.write_text(json.dumps([[str(first), [str(a) for a in args]] for first, args in jobs]))
    return launch(ROOT / "tests/scripts/run_recipes.py", [jobs_file], nproc, timeout)


def resumed_metrics(run_dir: Path, cut: Path, tag: str) -> dict[int, dict]:
    """A copy of the finished run ``run_dir`` at ``cut``, resumed there from checkpoint ``tag``: its metrics."""
    import shutil

    shutil.copytree(run_dir, cut)
    proc = launch_run([f"training.output_dir={cut}", f"training.resume={tag}", "training.overwrite=true"],
                      recipe=cut / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return metrics(cut)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so a signal can go to its whole group), output to ``log``."""
    _build_cpu_comm_op()
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                start_new_session=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    """Training rows of a run's metrics.jsonl by step (a step logged twice fails the caller's count)."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/total" in r}


def launches_ranks(argv) -> bool:
    """Whether a command line (a list, or a string for a shell) starts ranks; what conftest.py refuses in
    a test not marked integration."""
    single = isinstance(argv, (str, bytes, os.PathLike))
    args = shlex.split(os.fsdecode(argv)) if single else [os.fsdecode(a) for a in argv]
    for i, arg in enumerate(args):
        path = Path(arg)
        if path.name in LAUNCHERS or "launchers" in path.parts[:-1]:
            return True
        module = args[i + 1] if arg == "-m" and i + 1 < len(args) else None
        if module in LAUNCHER_MODULES:
            return True
        if path.name == "distill" or module == "distill.cli":
            command = [a for a in args[i + (2 if module else 1):] if not a.startswith("-")][:1]
            return bool(command) and command[0] in LAUNCHING_COMMANDS
    return False


def _kill(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()
