"""Real runs: 2 CPU ranks under the deepspeed launcher, teacher and student both ZeRO-3 partitioned."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.demo import free_port

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.integration


def launch(overrides, recipe=ROOT / "recipes/demo/kd.yaml", nproc=2, timeout=600):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port",
           str(free_port()), str(ROOT / "launchers/run.py"), "--config", str(recipe), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/total" in r}


@pytest.fixture(scope="module")
def pair(demo_assets):
    from distill.students import make_student

    student = demo_assets["root"] / "student"
    if not student.exists():
        make_student(str(demo_assets["teacher"]), str(student), decoder_layers=1)
    return [f"teacher.path={demo_assets['teacher']}", f"student.path={student}", f"data.path={demo_assets['data']}"]


TRAIN = ["training.micro_batch_size=4", "training.max_steps=8", "training.save_every=4", "training.log_every=1",
         "training.learning_rate=3e-3", "training.warmup_steps=0", "data.max_train_samples=null",
         "data.max_eval_samples=16", "training.eval_every=4"]


@pytest.fixture(scope="module")
def kd_run(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "run"
    proc = launch([*pair, *TRAIN, f"training.output_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_each_rank_holds_half_of_each_model(kd_run):
    info = json.loads((kd_run[0] / "run_info.json").read_text())
    assert info["world_size"] == 2
    for name in ("teacher", "student"):
        total, per_rank = info[name]["params"], info[name]["params_per_rank"]
        assert len(per_rank) == 2
        for share in per_rank:
            assert 0.45 < share / total < 0.6, (name, share, total)


def test_loss_falls(kd_run):
    m = metrics(kd_run[0])
    assert sorted(m) == list(range(1, 9))
    first = sum(m[s]["loss/total"] for s in (1, 2)) / 2
    last = sum(m[s]["loss/total"] for s in (7, 8)) / 2
    assert last < 0.9 * first, (first, last)


def test_tensorboard_holds_the_scalars(kd_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(kd_run[0] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/ce", "loss/kd", "weight/ce", "weight/kd", "train/lr", "train/grad_norm",
                "perf/tokens_per_sec", "perf/teacher_sec_per_step", "perf/student_sec_per_step", "eval/ce"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("loss/total")] == list(range(1, 9))
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_sec"))


def test_checkpoints_and_export(kd_run):
    from transformers import AutoModelForSeq2SeqLM

    ckpt = kd_run[0] / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000008"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-00000004", "step-00000008"]
    model = AutoModelForSeq2SeqLM.from_pretrained(kd_run[0] / "final")
    assert model.config.decoder_layers == 1
    assert model.get_input_embeddings().weight.abs().sum() > 0  # gathered, not empty ZeRO-3 placeholders


def test_stop_and_resume_equals_uninterrupted(kd_run, tmp_path):
    """Cut the run off after the step-4 checkpoint, resume it, and compare with the run that never stopped."""
    full, _ = kd_run
    cut = tmp_path / "run"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "latest").write_text("step-00000004")
    (cut / "metrics.jsonl").unlink()
    proc = launch([f"training.output_dir={cut}", "training.resume=auto"], recipe=cut / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    before, after = metrics(full), metrics(cut)
    assert sorted(after) == [5, 6, 7, 8]
    for step in after:
        for key in ("loss/total", "loss/ce", "loss/kd", "train/lr", "train/grad_norm"):
            assert after[step][key] == pytest.approx(before[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_bad_input_is_one_line_through_the_launcher(pair, tmp_path):
    out = tmp_path / "run"
    proc = launch([*pair, *TRAIN, f"training.output_dir={out}", "data.target_column=highlights"])
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert errors == ["distill: error: data.target_column 'highlights' is not a column of the train split "
                      "'train' (columns: id, document, summary)"]
    assert "Traceback" not in text
    assert not (out / "checkpoints").exists()
