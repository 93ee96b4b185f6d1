"""Stopping a run on 2 CPU ranks: a second run on the same directory, the launcher killed, Ctrl-C. Each
ends with a complete checkpoint, one clear line, and nothing left running."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

import ranks
from distill.train import checkpoint, run_dir
from distill.runtime.environment import free_port

ROOT = Path(__file__).parents[1]
KD = ROOT / "recipes/demo/kd.yaml"
pytestmark = pytest.mark.integration
# Runs until stopped: no checkpoint but the one the stop writes.
ENDLESS = ["training.micro_batch_size=4", "training.max_steps=100000", "training.save_every=100000",
           "training.log_every=1", "training.eval_every=0", "eval.generate=false", "eval.best_metric=null"]


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _training(out: Path) -> bool:
    return (out / "metrics.jsonl").is_file() and bool(ranks.metrics(out))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stopped_cleanly(out: Path, log: Path) -> None:
    text = log.read_text()
    assert "distill: stopped at step" in text and "Traceback" not in text and "KeyboardInterrupt" not in text, \
        text[-3000:]
    tag = checkpoint.read_latest(out / "checkpoints")
    assert tag is not None and checkpoint.verify(out / "checkpoints" / tag) is None
    assert not (out / run_dir.LOCK).exists()


def test_second_run_is_refused_and_killing_the_launcher_stops_the_ranks(pair, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    args = ["--config", KD, *pair, *ENDLESS, f"training.output_dir={out}"]
    first = ranks.start([ranks.DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
                         ROOT / "launchers/run.py", *args], log)
    try:
        _wait_for(lambda: _training(out), 300, "the first run to train")
        second = ranks.launch(ROOT / "launchers/run.py", args)
        errors = [line for line in (second.stdout + second.stderr).splitlines() if "distill: error:" in line]
        assert second.returncode == 2 and len(errors) == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"{out} is in use by pid" in errors[0]
        os.kill(first.pid, signal.SIGTERM)  # `kill PID` of the top deepspeed command only
        first.wait(timeout=30)
        # its launcher and ranks outlive it: the ranks notice, checkpoint and exit
        _wait_for(lambda: not _group_alive(first.pid), 300, "the orphaned ranks to stop")
        _stopped_cleanly(out, log)
    finally:
        if _group_alive(first.pid):
            os.killpg(first.pid, signal.SIGKILL)


def test_ctrl_c_on_distill_train_stops_every_process_with_status_0(pair, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    distill = str(Path(sys.executable).with_name("distill"))
    proc = ranks.start([distill, "train", "--nproc", "2", "--master-port", str(free_port()), "--config", KD, *pair,
                        *ENDLESS, f"training.output_dir={out}"], log)
    try:
        _wait_for(lambda: _training(out), 300, "the run to train")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        # distill train's status is the launcher's, which is 0 only when every rank exited 0
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        _stopped_cleanly(out, log)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_run_stops_when_its_best_metric_stalls(pair, tmp_path):
    """training.early_stopping_patience: a learning rate far below the weights' float32 resolution leaves
    them unchanged, so eval/ce never improves on step 1's; with patience 2 the run stops at step 3 with a
    checkpoint there, its final evaluation is that step's, and best/ holds step 1."""
    import json

    out = tmp_path / "run"
    student_and_data = [p for p in pair if not p.startswith("teacher.")]
    proc = ranks.launch_run([*student_and_data, "data.max_train_samples=32", "data.max_eval_samples=8", "training.micro_batch_size=4",
                             "training.max_steps=50", "training.warmup_steps=0", "training.learning_rate=1e-30",
                             "training.log_every=1", "training.eval_every=1", "training.save_every=100",
                             "eval.generate=false", "eval.best_metric=eval/ce", "training.early_stopping_patience=2",
                             f"training.output_dir={out}"],
                            recipe=ROOT / "recipes/demo/baseline.yaml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "eval/ce has not improved for 2 evaluations" in proc.stdout and "stopping at step 3" in proc.stdout
    assert json.loads((out / "best.json").read_text())["step"] == 1
    assert json.loads((out / "eval_results.json").read_text())["step"] == 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert (out / "final" / "model.safetensors").exists() and (out / "best" / "model.safetensors").exists()
