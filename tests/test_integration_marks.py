"""The fast tier's guard (conftest.py): a test not marked integration that starts ranks fails, whichever
way it starts them, so `pytest -m "not integration"` never pays for a launch."""

import subprocess
import sys

import pytest
import torch.distributed

import ranks

DISTILL = str(ranks.ROOT / ".venv/bin/distill")


@pytest.mark.parametrize("argv", [
    [ranks.DEEPSPEED, "--num_gpus", "2", "--master_port", "29500", str(ranks.ROOT / "launchers/run.py"), "--config", "x"],
    [sys.executable, str(ranks.ROOT / "launchers/distill_cli.py"), "generate", "--model", "m"],
    [sys.executable, "launchers/run.py", "--config", "recipes/demo/kd.yaml"],
    [DISTILL, "train", "--nproc", "2", "--config", "x.yaml"],
    [DISTILL, "demo", "--workdir", "w"],
    [sys.executable, "-m", "distill.cli", "train", "--config", "x.yaml"],
    [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "x.py"],
    ["torchrun", "--nproc-per-node", "2", "x.py"],
    ["/usr/bin/sbatch", "--parsable", "job.sbatch"],
    ["srun", "python", "x.py"],
    "deepspeed --num_gpus 2 launchers/run.py --config x.yaml",
])
def test_rank_launches_are_recognised(argv):
    assert ranks.launches_ranks(argv)


@pytest.mark.parametrize("argv", [
    [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
    [sys.executable, "-m", "distill.cli", "cache-teacher", "--model", "m", "--out", "train"],
    [sys.executable, "-m", "distill.cli", "finetune", "--model", "m"],
    [DISTILL, "check-config", "--config", "x.yaml", "training.output_dir=train"],
    ["mount", "-t", "tmpfs", "tmpfs", "/tmp/x"],
    "echo deepspeed-free",
])
def test_other_commands_are_not(argv):
    assert not ranks.launches_ranks(argv)


def test_a_test_not_marked_integration_cannot_start_ranks():
    with pytest.raises(pytest.fail.Exception, match="starts ranks .* not marked integration"):
        subprocess.run([ranks.DEEPSPEED, "--num_gpus", "2", str(ranks.ROOT / "launchers/run.py")])
    with pytest.raises(pytest.fail.Exception, match="a process group of 2 ranks"):
        torch.distributed.init_process_group("gloo", rank=0, world_size=2)
    assert not torch.distributed.is_initialized()
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0  # other processes start as ever
