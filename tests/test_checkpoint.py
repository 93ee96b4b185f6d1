"""Checkpoint bookkeeping in one process: checksums, fallback to the newest intact checkpoint, pruning
only this run's checkpoints, failed saves leaving nothing behind, the run directory's lock and policy."""

import json
import os
import subprocess
import sys
import time

import pytest

from distill.train import checkpoint, run_dir
from distill.config.resume import fit_accumulation, resume_changes
from distill.errors import DistillError

ONE = dict(rank=0, world=1, gather=lambda x: [x], barrier=lambda: None)


class FakeEngine:
    """Writes what DeepSpeed writes into a tag directory; ``fail`` raises like a full disk does."""

    def __init__(self, fail=None, weight=1.0):
        import torch

        self.fail = fail
        self.module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(self.module.weight, weight)

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
            f.write(os.urandom(4096))
        if self.fail:
            raise self.fail


def save(ckpt, step, run_id="run-a", keep=2, engine=None):
    return checkpoint.save(engine or FakeEngine(), ckpt, step, {"step": step}, keep, run_id, **ONE)


def test_save_writes_manifest_and_marks_latest(tmp_path):
    tag = save(tmp_path, 4)
    manifest = checkpoint.read_manifest(tmp_path / tag)
    assert sorted(manifest["files"]) == ["trainer_state_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert manifest["world_size"] == 1 and manifest["run_id"] == "run-a"
    assert checkpoint.read_latest(tmp_path) == tag
    assert checkpoint.verify(tmp_path / tag) is None
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_latest_falls_back_to_newest_intact(tmp_path, damage):
    save(tmp_path, 4)
    tag = save(tmp_path, 8)
    target = tmp_path / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "delete":
        (tmp_path / tag / "trainer_state_rank0.pt").unlink()
    else:
        (tmp_path / tag / checkpoint.MANIFEST).write_text("{not json")
    said = []
    assert checkpoint.resolve_resume(tmp_path, "auto", 1, say=said.append) == "step-00000004"
    assert len(said) == 1 and "step-00000008 is damaged" in said[0] and "resuming from step-00000004" in said[0]
    with pytest.raises(DistillError, match="is damaged"):  # an explicit tag is not swapped for another
        checkpoint.resolve_resume(tmp_path, tag, 1)


@pytest.mark.parametrize("latest", [b"", b"\xff\xfe garbage", b"step-00000099"])
def test_unreadable_latest_marker(tmp_path, latest):
    save(tmp_path, 4)
    (tmp_path / checkpoint.LATEST).write_bytes(latest)
    said = []
    assert checkpoint.resolve_resume(tmp_path, "auto", 1, say=said.append) == "step-00000004"
    assert len(said) == 1


def test_no_intact_checkpoint_is_one_line(tmp_path):
    tag = save(tmp_path, 4)
    (tmp_path / tag / "trainer_state_rank0.pt").write_bytes(b"")
    with pytest.raises(DistillError, match="no intact checkpoint") as info:
        checkpoint.resolve_resume(tmp_path, "auto", 1)
    assert "\n" not in str(info.value)


def test_resume_takes_any_world_size_and_refuses_a_missing_tag(tmp_path):
    tag = save(tmp_path, 4)
    assert checkpoint.resolve_resume(tmp_path, tag, 4, gather=lambda x: [x] * 4) == tag
    assert checkpoint.world_size_of(tmp_path / tag) == 1
    with pytest.raises(DistillError, match="checkpoint 'step-00000009' not found"):
        checkpoint.resolve_resume(tmp_path, "step-00000009", 1)
    assert checkpoint.resolve_resume(tmp_path, "never", 1) is None


def test_prune_removes_only_this_runs_checkpoints(tmp_path):
    save(tmp_path, 25, run_id="earlier")
    save(tmp_path, 30, run_id="earlier", keep=5)
    for step in (32, 34, 36):
        save(tmp_path, step, run_id="later")
    assert checkpoint.complete_tags(tmp_path) == ["step-00000036", "step-00000034", "step-00000030", "step-00000025"]


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_nonfinite_weights_are_never_saved_nor_prune_finite_ones(tmp_path, weight):
    save(tmp_path, 4, keep=1)
    with pytest.raises(DistillError, match="not finite at step 8: not saved.*last finite checkpoint is step-00000004"):
        save(tmp_path, 8, keep=1, engine=FakeEngine(weight=weight))
    assert checkpoint.complete_tags(tmp_path) == ["step-00000004"] and checkpoint.read_latest(tmp_path) == "step-00000004"


def test_failed_save_leaves_nothing_and_says_why(tmp_path):
    save(tmp_path, 4)
    with pytest.raises(DistillError, match="no space left on device") as info:
        save(tmp_path, 8, engine=FakeEngine(fail=OSError(28, "No space left on device")))
    assert "\n" not in str(info.value)
    assert checkpoint.complete_tags(tmp_path) == ["step-00000004"] and not list(tmp_path.glob("*.partial"))
    assert checkpoint.read_latest(tmp_path) == "step-00000004"


def test_full_disk_for_real(tmp_path):
    """A real 1 MiB tmpfs: the save fails with one line and leaves the previous checkpoint as latest."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        import torch

        class Big(FakeEngine):
            def save_checkpoint(self, save_dir, tag, save_latest):
                d = os.path.join(save_dir, tag)
                os.makedirs(d, exist_ok=True)
                torch.save(torch.zeros(400_000), os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))

        save(mount, 2)
        with pytest.raises(DistillError, match="no space left on device"):
            save(mount, 4, engine=Big())
        assert checkpoint.complete_tags(mount) == ["step-00000002"] and not list(mount.glob("*.partial"))
    finally:
        subprocess.run(["umount", str(mount)])


# ---- the run directory -----------------------------------------------------------------------------

def test_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    first = run_dir.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(DistillError, match=f"in use by pid {os.getpid()}"):
        run_dir.RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / run_dir.LOCK).exists()
    # a holder killed with SIGKILL: its pid is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / run_dir.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout),
                                                      "start": "1", "since": "earlier"}))
    said = []
    lock = run_dir.RunLock(tmp_path)
    lock.acquire(say=said.append)
    assert said and "stale lock" in said[0]
    lock.release()


def test_lock_of_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    lock_file = tmp_path / run_dir.LOCK
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "1", "since": "then"}))
    with pytest.raises(DistillError, match="in use by pid 1 on elsewhere"):
        run_dir.RunLock(tmp_path).acquire()
    old = time.time() - run_dir.STALE_AFTER - 1
    os.utime(lock_file, (old, old))
    lock = run_dir.RunLock(tmp_path)
    lock.acquire(say=lambda line: None)
    lock.release()


def test_read_only_output_dir_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; a read-only mount stops it
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    try:
        with pytest.raises(DistillError, match="is not writable: read-only file system|permission denied"):
            run_dir.RunLock(ro / "run").acquire() if os.geteuid() != 0 else run_dir.RunLock(ro).acquire()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])


def test_resume_never_on_a_run_is_refused_unless_overwrite(tmp_path):
    save(tmp_path / "checkpoints", 25, run_id="earlier")
    with pytest.raises(DistillError, match="already holds a run and training.resume is never"):
        run_dir.prepare(tmp_path, "never", None, overwrite=False)
    assert checkpoint.complete_tags(tmp_path / "checkpoints") == ["step-00000025"]
    run_dir.prepare(tmp_path, "never", None, overwrite=True)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_an_older_tag_keeps_newer_ones_unless_overwrite(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 25, keep=5)
    save(ckpt, 30, keep=5)
    with pytest.raises(DistillError, match="would overwrite the newer checkpoints step-00000030"):
        run_dir.prepare(tmp_path, "step-00000025", "step-00000025", overwrite=False)
    run_dir.prepare(tmp_path, "step-00000025", "step-00000025", overwrite=True)
    assert checkpoint.complete_tags(ckpt) == ["step-00000025"] and checkpoint.read_latest(ckpt) == "step-00000025"


def test_config_history_keeps_every_start(tmp_path):
    run_dir.record_config(tmp_path, "a: 1\n", 0)
    run_dir.record_config(tmp_path, "a: 2\n", 30)
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == ["001-step-00000000.yaml",
                                                                         "002-step-00000030.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"


def test_resume_changes_refuses_data_order_and_logs_the_rest():
    from distill.config.settings import RunConfig

    old = RunConfig().to_dict()
    new = RunConfig().to_dict()
    new["training"]["max_steps"] = 40
    new["loss"]["w_kd"] = 0.5
    new["training"]["resume"] = "step-00000030"
    new["training"]["micro_batch_size"] = 4  # how the global batch is split: fit_accumulation's business
    assert resume_changes(old, new) == ["loss.w_kd: 0.0 -> 0.5", "training.max_steps: 1000 -> 40"]
    new["training"]["seed"] = 4
    with pytest.raises(DistillError, match="training.seed=42 and this run sets 4"):
        resume_changes(old, new)
    new = RunConfig().to_dict()
    new["loss"]["hidden"]["map"] = "last"
    with pytest.raises(DistillError, match="loss.hidden.map"):
        resume_changes(old, new)


def test_accumulation_follows_the_world_size_to_keep_the_global_batch():
    assert fit_accumulation(16, 4, 2, 2, 2) == 2  # as saved
    assert fit_accumulation(16, 4, 2, 1, 2) == 4
    assert fit_accumulation(16, 4, 1, 4, 1) == 1
    assert fit_accumulation(16, 2, 2, 2, 2) == 4  # a smaller micro-batch, more accumulation
    with pytest.raises(DistillError) as info:
        fit_accumulation(16, 3, 1, 2, 1)
    assert str(info.value) == ("the checkpoint's global batch is 16 examples per step, which 2 ranks of "
                               "training.micro_batch_size 3 cannot split evenly: set training.micro_batch_size to "
                               "1, 2, 4 or 8 (training.gradient_accumulation_steps then follows)")
    with pytest.raises(DistillError, match="which 3 ranks .* resume it on 1, 2, 4, 8 or 16 ranks"):
        fit_accumulation(16, 4, 1, 3, 1)


def test_a_changed_accumulation_is_refused_not_reset():
    """The trainer's resume check: an accumulation the run asks for that would change the checkpoint's
    global batch is refused with one line (it used to be set back to the checkpoint's without a word)."""
    from distill.config.settings import RunConfig
    from distill.train.loop import Trainer

    saved = RunConfig().to_dict()
    saved["training"].update(micro_batch_size=4, gradient_accumulation_steps=2)
    cfg = RunConfig()
    cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps = 4, 4
    trainer = Trainer(cfg)
    trainer.rank, trainer.world, trainer.resume_tag = 0, 2, "step-00000004"
    with pytest.raises(DistillError, match="training.gradient_accumulation_steps=4 makes global batches of 32 .*"
                                           "the checkpoint's are 16.* set training.gradient_accumulation_steps=2"):
        trainer._keep_global_batch(saved, 2)
    with pytest.raises(DistillError, match="=3 makes global batches of 12 examples on 1 ranks"):
        fit_accumulation(16, 4, 3, 1, 2)  # on another number of ranks too


def test_a_read_only_checkpoint_folder_is_named_as_such(tmp_path):
    """DeepSpeed logs its failed makedirs and torch then reports a missing parent: the line names the
    folder that cannot be written instead."""
    class ReadOnlyFolder(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest):
            raise RuntimeError(f"Parent directory {save_dir}/{tag} does not exist.")

    ckpt = tmp_path / "checkpoints"
    save(ckpt, 2)
    ckpt.chmod(0o555)
    try:
        with pytest.raises(DistillError) as info:
            save(ckpt, 4, engine=ReadOnlyFolder())
    finally:
        ckpt.chmod(0o755)
    assert f"permission denied: {ckpt} is not writable" in str(info.value), info.value
    assert "Parent directory" not in str(info.value)


def test_a_save_killed_halfway_is_never_resumed_and_is_cleared_by_the_next(tmp_path):
    save(tmp_path, 4)
    torn = tmp_path / ("step-00000008" + checkpoint.PARTIAL)  # what kill -9 mid-save leaves
    torn.mkdir()
    (torn / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
    assert checkpoint.resolve_resume(tmp_path, "auto", 1) == "step-00000004"
    save(tmp_path, 8)
    assert not torn.exists() and checkpoint.verify(tmp_path / "step-00000008") is None
