"""DeepSpeed configs: "auto" filled from the run config, conflicts and bad files refused early."""

import json
from pathlib import Path

import pytest

from distill.config.parsing import load_config
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config, with_universal_load
from distill.errors import DistillError

ROOT = Path(__file__).parents[1]


def cfg(**training):
    overrides = [f"training.{k}={v}" for k, v in training.items()]
    return load_config(None, ["student.path=s", "student.ds_config=x", "data.path=d", "training.output_dir=o",
                              *overrides])


def resolve(raw, role="student", run=None, world=2, accel="cpu"):
    return resolve_ds_config(raw, run or cfg(micro_batch_size=4, gradient_accumulation_steps=3,
                                             learning_rate=2e-4, precision="bf16", max_grad_norm=0.5),
                             role, world, 64, accel, "x.json")


def test_shipped_configs_resolve():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        role = "teacher" if path.name.startswith("teacher") else "student"
        ds = resolve(read_ds_config(path, role), role=role)
        assert ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 3
        assert ds["train_batch_size"] == 24
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        if role == "teacher":
            assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds and "scheduler" not in ds
        else:
            assert ds["gradient_clipping"] == 0.5
            params = ds["optimizer"]["params"]
            assert params["lr"] == 2e-4 and params["torch_adam"] is True and params["betas"] == [0.9, 0.999]
        assert "auto" not in json.dumps(ds)


def test_gpu_uses_fused_adam():
    ds = resolve(read_ds_config(ROOT / "ds_configs/student_zero3.json", "student"), accel="cuda")
    assert ds["optimizer"]["params"]["torch_adam"] is False


def test_teacher_must_be_stage3():
    raw = read_ds_config(ROOT / "ds_configs/teacher_zero3.json", "teacher")
    raw["zero_optimization"]["stage"] = 2
    with pytest.raises(DistillError, match="the teacher must use ZeRO stage 3"):
        resolve(raw, role="teacher")
    raw["zero_optimization"]["stage"] = 3
    raw["optimizer"] = {"type": "AdamW"}
    with pytest.raises(DistillError, match="frozen teacher takes no"):
        resolve(raw, role="teacher")


def test_explicit_value_must_agree():
    raw = read_ds_config(ROOT / "ds_configs/student_zero3.json", "student")
    raw["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(DistillError, match="train_micro_batch_size_per_gpu is 8 but training.micro_batch_size"):
        resolve(raw)
    raw["train_micro_batch_size_per_gpu"] = 4
    assert resolve(raw)["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update({"zero_optimization.stage3_param_persistence_threshold": 1}), "dotted key"),
    (lambda d: d.update({"scheduler": {"type": "WarmupLR"}}), "remove the \"scheduler\" section"),
    (lambda d: d.update({"checkpoint": {"load_universal": True}}), "remove checkpoint.load_universal"),
    (lambda d: d["zero_optimization"].update(stage=7), "zero_optimization.stage must be 0-3"),
    (lambda d: d["zero_optimization"].update(overlap_comm="sometimes"), "invalid zero_optimization"),
    (lambda d: d.update({"steps_per_print": "auto"}), "no run-config value fills \"auto\" at steps_per_print"),
    (lambda d: d.pop("optimizer"), "needs an \"optimizer\" section"),
])
def test_bad_student_configs(mutate, message):
    raw = read_ds_config(ROOT / "ds_configs/student_zero3.json", "student")
    mutate(raw)
    with pytest.raises(DistillError) as err:
        resolve(raw)
    assert message in str(err.value)


def test_universal_load_is_nested():
    """deepspeed.initialize reads only the nested form; other checkpoint settings stay."""
    raw = read_ds_config(ROOT / "ds_configs/student_zero3.json", "student")
    raw["checkpoint"] = {"tag_validation": "Warn"}
    ds = with_universal_load(resolve(raw, world=1))
    assert ds["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    from deepspeed.runtime.config import DeepSpeedConfig

    assert DeepSpeedConfig(ds).load_universal_checkpoint is True


def test_unreadable_files(tmp_path):
    with pytest.raises(DistillError, match="student.ds_config not found"):
        read_ds_config(tmp_path / "none.json", "student")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DistillError, match="is not valid JSON"):
        read_ds_config(bad, "teacher")
