"""The sbatch scripts on a real Slurm (Debian's slurm-wlm on localhost, one node with 2 CPUs): training
with 2 ranks under each launcher, and a job warned before its time limit that checkpoints, requeues
itself and resumes at the saved step."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import slurm_cluster  # noqa: E402

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not slurm_cluster.available(), reason="Slurm (slurm-wlm, munge) is not installed; "
                                                                       ".ci/run installs it")]
# The scripts ask for GPUs; this node has none, so the tests submit without them.
NO_GPU = ["--gpus-per-node=0", "--nodes=1", "--time=20"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def assets(demo_assets):
    from distill.models.make_student import make_student

    student = demo_assets["root"] / "slurm-student"
    if not student.exists():
        make_student(str(demo_assets["teacher"]), str(student), decoder_layers=1)
    return [f"teacher.path={demo_assets['teacher']}", f"student.path={student}", f"data.path={demo_assets['data']}",
            "training.micro_batch_size=4", "training.warmup_steps=0", "training.log_every=1",
            "data.max_eval_samples=8", "data.max_train_samples=null"]


def submit(slurm, tmp_path, launcher, overrides, *options):
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    env = {"RECIPE": "recipes/demo/kd.yaml", "OVERRIDES": " ".join(overrides), "GPUS_PER_NODE": "2",
           "LAUNCHER": launcher, "PYTHON": sys.executable, "LOG_DIR": str(logs), "DISTILL_HOME": str(ROOT),
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    job = slurm.sbatch(str(ROOT / "launchers/slurm/train.sbatch"), *NO_GPU, *options,
                       f"--output={logs}/%x-%j.log", env=env, cwd=ROOT)
    return job, logs / f"distill-train-{job}.log"


def steps_logged(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss/total"' in line]


def warn_once_running(slurm, job, run, log, steps: int) -> None:
    """Wait until the job has logged ``steps`` steps, then warn it as Slurm's --signal=B:USR1@120 does
    before a time limit (USR1 to the batch script), and wait until it has requeued itself."""
    slurm.wait_state(job, ("RUNNING",))
    deadline = time.time() + 300
    while len(steps_logged(run)) < steps:
        assert time.time() < deadline and slurm.job(job)["JobState"] == "RUNNING", log.read_text()[-3000:]
        time.sleep(0.3)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))
    deadline = time.time() + 300
    while slurm.job(job).get("Restarts", "0") == "0":
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


@pytest.mark.parametrize("launcher, options", [
    ("torchrun", ["--ntasks-per-node=1", "--cpus-per-task=2"]),
    ("srun", ["--ntasks-per-node=2", "--cpus-per-task=1"]),  # one task per rank, SLURM_* -> torch variables
])
def test_training_job_succeeds(slurm, assets, tmp_path, launcher, options):
    run = tmp_path / "run"
    job, log = submit(slurm, tmp_path, launcher, [*assets, "training.max_steps=6", "training.save_every=3",
                                                  f"training.output_dir={run}"], *options)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"{launcher} launcher" in text and "distill: done at step 6" in text
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2


def test_warned_job_checkpoints_requeues_and_resumes(slurm, assets, tmp_path):
    run = tmp_path / "run"
    total = 40
    job, log = submit(slurm, tmp_path, "deepspeed", [*assets, f"training.max_steps={total}", "training.save_every=100",
                                                     f"training.output_dir={run}"],
                      "--ntasks-per-node=1", "--cpus-per-task=2")
    warn_once_running(slurm, job, run, log, steps=4)  # well into training
    # A requeued job waits until its old job credential expires (slurm.conf cred_expire, 10 s here).
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]

    stopped = int(text.split("distill: stopped at step ")[1].split()[0])
    assert 4 <= stopped < total
    assert "requeueing job" in text
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped:08d}'} at step {stopped}" in text
    assert f"distill: done at step {total}" in text
    # no step lost, none done twice
    assert steps_logged(run) == list(range(1, total + 1))
    import torch

    state = torch.load(run / "checkpoints" / f"step-{total:08d}" / "trainer_state_rank0.pt", weights_only=False)
    assert state["step"] == total
    assert (run / "final" / "model.safetensors").exists()


def test_job_preempted_on_2_tasks_resumes_on_1(slurm, assets, tmp_path):
    """A job warned on 2 tasks (srun, one task per rank) checkpoints and requeues itself; while it waits it
    is cut to 1 task, as a requeue onto a smaller allocation would be. It converts the checkpoint, takes
    the same global batch as 1 rank x 2 accumulation steps, and resumes at the saved step and example."""
    run = tmp_path / "run"
    total = 30
    job, log = submit(slurm, tmp_path, "srun", [*assets, f"training.max_steps={total}", "training.save_every=100",
                                                "data.max_train_samples=24", "training.record_example_ids=true",
                                                "training.eval_every=0", "eval.best_metric=null",
                                                f"training.output_dir={run}"],
                      "--ntasks-per-node=2", "--cpus-per-task=1")
    warn_once_running(slurm, job, run, log, steps=3)
    # the requeued job waits for its old credential to expire (10 s): time to change its size
    slurm.run("scontrol", "hold", str(job))
    slurm.run("scontrol", "update", f"JobId={job}", "TasksPerNode=1")
    slurm.run("scontrol", "update", f"JobId={job}", "NumTasks=1")
    slurm.run("scontrol", "release", str(job))
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NumTasks"] == "1", text[-3000:]

    stopped = int(text.split("distill: stopped at step ")[1].split()[0])
    assert 3 <= stopped < total
    tag = f"step-{stopped:08d}"
    assert f"checkpoint {tag} was written by 2 ranks and this run has 1: converted it to a universal checkpoint" \
        in text
    assert "this run takes them as 1 ranks x training.micro_batch_size 4 x training.gradient_accumulation_steps 2" \
        in text
    assert f"resumed from {run / 'checkpoints' / tag} at step {stopped}" in text
    assert f"distill: done at step {total}" in text
    assert steps_logged(run) == list(range(1, total + 1))
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 1
    # every step took 8 examples; within each epoch (3 steps of the 24) none twice
    ids: dict[int, list[int]] = {}
    for path in (run / "example_ids").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            ids.setdefault(row["step"], []).extend(row["ids"])
    assert sorted(ids) == list(range(1, total + 1))
    for epoch in range(total // 3):
        seen = [i for step in range(3 * epoch + 1, 3 * epoch + 4) for i in ids[step]]
        assert sorted(seen) == list(range(24))
