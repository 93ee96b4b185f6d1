"""What a resume may change takes effect from its first step: a short 2-rank run, resumed from its middle
checkpoint with every such setting changed, logs the new values from the first resumed step. What it
may not change unannounced (the data's content at the same path) is refused with one line."""

import json
import shutil

import pytest
import torch

from distill.losses.schedules import lr_multiplier
from distill.train import checkpoint
from ranks import launch_run as launch, metrics

FAST = ["training.micro_batch_size=4", "training.max_steps=4", "training.save_every=2", "training.log_every=1",
        "training.learning_rate=3e-3", "training.warmup_steps=0", "data.max_train_samples=null",
        "training.eval_every=0", "eval.generate=false", "eval.best_metric=null", "data.max_eval_samples=8",
        "training.export=false"]

CHANGED = {"training.learning_rate": 1e-3, "training.lr_schedule": "cosine", "training.warmup_steps": 3,
           "training.weight_decay": 0.05, "training.max_grad_norm": 0.5, "loss.w_ce": 0.5, "loss.w_kd": 0.5,
           "loss.temperature": 3.0}


@pytest.fixture(scope="module")
def short_run(pair, demo_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-settings")
    out, data = root / "run", root / "data"  # a copy of the data of its own, which a test edits in place
    shutil.copytree(demo_assets["data"], data)
    proc = launch([*pair[:2], f"data.path={data}", *FAST, f"training.output_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _resume(run, cut, *overrides):
    shutil.copytree(run, cut)
    return launch([f"training.output_dir={cut}", "training.resume=step-00000002", "training.overwrite=true",
                   *overrides], recipe=cut / "config.yaml")


@pytest.mark.integration
def test_changed_settings_take_effect_from_the_first_resumed_step(short_run, tmp_path):
    proc = _resume(short_run, tmp_path / "run", *(f"{k}={v}" for k, v in CHANGED.items()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training.learning_rate: 0.003 -> 0.001" in proc.stdout
    before, after = metrics(short_run), metrics(tmp_path / "run")
    assert before[2]["train/lr"] == pytest.approx(3e-3 * lr_multiplier("linear", 2, 0, 4, 0.0))
    for step in (3, 4):
        row = after[step]
        # train/lr is the rate of the step after the logged one (the scheduler has stepped)
        assert row["train/lr"] == pytest.approx(1e-3 * lr_multiplier("cosine", step, 3, 4, 0.0)), step
        assert row["train/weight_decay"] == 0.05 and row["train/max_grad_norm"] == 0.5
        assert row["weight/ce"] == 0.5 and row["weight/kd"] == 0.5 and row["train/temperature"] == 3.0
    assert before[3]["train/weight_decay"] == 0.0 and before[3]["train/temperature"] == 2.0


def test_resumed_optimizer_takes_the_new_rate_and_decay_before_its_first_step():
    """In one process: the optimizer and scheduler states a checkpoint restores, then the run's settings."""
    def build(lr, wd, warmup):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr, weight_decay=wd)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier("linear", s, warmup, 10, 0.0))

    old = build(3e-3, 0.0, 0)
    for _ in range(4):
        old.optimizer.step()
        old.step()
    new = build(1e-3, 0.1, 6)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.load_state_dict(old.state_dict())
    checkpoint.apply_optimizer_settings(new, 1e-3, 0.1)
    group = new.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * 5 / 6) and group["weight_decay"] == 0.1
    assert new.get_last_lr() == [group["lr"]]
    new.optimizer.step()
    new.step()
    assert new.get_last_lr()[0] == pytest.approx(1e-3)  # step 5 of a 6-step warm-up: the full new rate


@pytest.mark.integration
def test_data_edited_in_place_is_refused_or_allowed_and_said(short_run, tmp_path):
    """Rows rotated and one target changed at the same path: refused with one line before any model loads;
    with training.allow_data_change the resume goes on and says why."""
    train = short_run.parent / "data" / "train.jsonl"
    original = train.read_text()
    rows = [json.loads(line) for line in original.splitlines()]
    rows = rows[1:] + rows[:1]
    rows[0]["summary"] += " edited"
    try:
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc = _resume(short_run, tmp_path / "refused")
        text = proc.stdout + proc.stderr
        errors = [line for line in text.splitlines() if "distill: error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert "the training data is not what step-00000002 was trained on" in errors[0]
        assert "training.allow_data_change=true" in errors[0]
        proc = _resume(short_run, tmp_path / "allowed", "training.allow_data_change=true")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "training.allow_data_change is set: continuing on it from the same position" in proc.stdout
        assert sorted(metrics(tmp_path / "allowed")) == [1, 2, 3, 4]
    finally:
        train.write_text(original)
