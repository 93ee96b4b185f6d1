"""``distill train``: start a run's ranks under a launcher, and make every way of stopping it clean.

The ``deepspeed`` command dies of a SIGTERM, and on Ctrl-C its per-node launcher kills the ranks and
exits 1, so a stopped run there always looks failed. Here the launcher runs in a session of its own:
Ctrl-C, a SIGTERM (a job scheduler), a signal to this command's whole process group or a SIGHUP only
reach this process, which turns them into the run's stop file. Every rank then finishes its step, a
complete checkpoint is written, and the ranks, the launcher and this command all exit 0. The ranks also
watch this process (``DISTILL_WATCH_PID``): if it is killed outright, they stop the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from distill.errors import DistillError

LAUNCHERS = {
    "deepspeed": lambda nproc, port: ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "--module"],
    "torchrun": lambda nproc, port: ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(port), "-m"],
}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def launch_command(launcher: str, nproc: int, port: int, config: Optional[str], overrides: list[str]) -> list[str]:
    cmd = LAUNCHERS[launcher](nproc, port)
    exe = shutil.which(cmd[0], path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        raise DistillError(f"the {launcher} launcher is not installed (no '{cmd[0]}' on PATH)")
    return [exe, *cmd[1:], "distill.train.launch", *(["--config", config] if config else []), *overrides]


def train(launcher: str, nproc: int, port: int, config: Optional[str], overrides: list[str]) -> int:
    """Run the ranks to the end or to a clean stop; the launcher's exit status."""
    from distill.config.parsing import load_config

    load_config(config, overrides)  # a bad recipe is one line before any rank starts
    cmd = launch_command(launcher, nproc, port, config, overrides)
    stop_file = Path(tempfile.gettempdir()) / f"distill-stop-{os.getpid()}"
    stop_file.unlink(missing_ok=True)
    env = {**os.environ, "DISTILL_STOP_FILE": str(stop_file), "DISTILL_WATCH_PID": str(os.getpid())}

    def request_stop(signum, frame) -> None:
        if not stop_file.exists():
            stop_file.touch()
            print(f"distill: {signal.Signals(signum).name}: the ranks stop at the end of this step and checkpoint",
                  file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)
