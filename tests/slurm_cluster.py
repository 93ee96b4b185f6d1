"""A real Slurm on localhost for the tests: munged, slurmctld and slurmd from Debian's packages, with
their configuration, state, spool and logs in a temporary directory; stopped by their process ids."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from distill.runtime.environment import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def available() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """``with SlurmCluster(tmp) as slurm:`` then ``slurm.sbatch(...)``, ``slurm.wait(job)``."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname()
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "slurm.conf").write_text(f"""\
ClusterName=distilltest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=30
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def start(self) -> "SlurmCluster":
        self._write_config()
        r = self.root
        munge = subprocess.Popen([_exe("munged"), "--foreground", "--force", f"--socket={r}/munge/munge.socket",
                                  f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                                  f"--seed-file={r}/munge/munge.seed", "--key-file=/etc/munge/munge.key"],
                                 env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(munge)
        self._until(lambda: (r / "munge" / "munge.socket").exists(), "munged")
        for daemon in ("slurmctld", "slurmd"):
            args = [_exe(daemon), "-D", "-f", str(r / "slurm.conf")]
            if daemon == "slurmctld":
                args.append("-c")  # a clean state
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=open(r / "log" / f"{daemon}.stderr", "w")))
        self._until(self._node_ready, "slurm node")
        return self

    def _node_ready(self) -> bool:
        out = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _until(self, check, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: a daemon exited ({p.args[0]}); logs in {self.root / 'log'}")
            time.sleep(0.3)
        raise RuntimeError(f"{what} not ready after {timeout} s; logs in {self.root / 'log'}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- jobs --------------------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([_exe(args[0]), *args[1:]], env=self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def sbatch(self, script: str, *options: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        full = {**self.env, **(env or {})}
        out = subprocess.run([_exe("sbatch"), "--parsable", *options, script], env=full, capture_output=True,
                             text=True, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", str(job_id), "-o", check=False)
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")
