"""`distill export` of students trained under ZeRO-0, 1 and 2 (ZeRO-3: test_integration.py), whose
checkpoints DeepSpeed writes under other file names: one model-states file for all ranks, and for
ZeRO-0 no optimizer shards at all."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import ranks

ROOT = Path(__file__).parents[1]
STAGES = (0, 1, 2)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(demo_assets, tmp_path_factory):
    """Two steps of plain fine-tuning per stage, all in one 2-rank launch."""
    root = tmp_path_factory.mktemp("stages")
    base = json.loads((ROOT / "ds_configs/student_zero2.json").read_text())
    jobs = []
    for stage in STAGES:
        ds = root / f"zero{stage}.json"
        ds.write_text(json.dumps({**base, "zero_optimization": {**base["zero_optimization"], "stage": stage}}))
        jobs.append([str(ROOT / "recipes/demo/teacher.yaml"), [
            f"student.path={demo_assets['teacher']}", f"student.ds_config={ds}", f"data.path={demo_assets['data']}",
            "training.micro_batch_size=4", "training.max_steps=2", "training.save_every=2", "training.warmup_steps=0",
            "training.log_every=1", "training.eval_every=0", f"training.output_dir={root / f'run{stage}'}"]])
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = ranks.launch(ROOT / "tests/scripts/run_recipes.py", [root / "jobs.json"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {stage: root / f"run{stage}" for stage in STAGES}


def deepspeed_weights(tag_dir: Path, stage: int) -> dict:
    """The student's weights as DeepSpeed saved them: the module state itself under ZeRO-0, else its own
    fp32 consolidation of the optimizer shards."""
    if stage == 0:
        full = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


@pytest.mark.parametrize("stage", STAGES)
def test_export_equals_the_saved_weights(runs, demo_assets, tmp_path, stage):
    from safetensors.torch import load_file

    from distill.cli import main

    run = runs[stage]
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    ours = load_file(tmp_path / "out" / "model.safetensors")
    saved = deepspeed_weights(run / "checkpoints" / "step-00000002", stage)
    for key, value in ours.items():
        assert value.dtype == torch.float32 and torch.equal(value, saved[key].float()), key
    in_training = load_file(run / "final" / "model.safetensors")  # gathered from the live engine at step 2
    assert set(in_training) == set(ours)
    for key in ours:
        assert torch.equal(ours[key], in_training[key]), key
    init = load_file(demo_assets["teacher"] / "model.safetensors")
    assert any(not torch.equal(ours[k], init[k]) for k in ours if k in init)  # two steps moved the weights


def test_export_refuses_a_zero2_checkpoint_without_a_rank_s_optimizer_shard(runs, tmp_path, capsys):
    from distill.cli import main

    torn = tmp_path / "torn" / "step-00000002"
    shutil.copytree(runs[2] / "checkpoints" / "step-00000002", torn)
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    capsys.readouterr()
    assert main(["export", str(torn), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distill: error: checkpoint {torn} is damaged or incomplete: "
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]
    assert not (tmp_path / "x").exists()
