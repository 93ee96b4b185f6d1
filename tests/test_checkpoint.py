"""Checkpoint bookkeeping: only complete checkpoints are resumed from, incomplete ones are cleaned up."""

import pytest

from distill import checkpoint
from distill.errors import DistillError


def fake_checkpoint(ckpt_dir, step, ranks=2):
    tag = checkpoint.tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    for r in range(ranks):
        (ckpt_dir / tag / f"trainer_state_rank{r}.pt").write_bytes(b"x")
    return tag


def test_resume_auto_follows_latest_only(tmp_path):
    assert checkpoint.resolve_resume(tmp_path, "auto", 2) is None
    done = fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, ranks=1)  # a save that died halfway: never marked latest
    checkpoint.write_atomic(tmp_path / "latest", done)
    assert checkpoint.resolve_resume(tmp_path, "auto", 2) == done
    assert checkpoint.resolve_resume(tmp_path, "never", 2) is None


def test_resume_refuses_other_world_size_and_missing_tag(tmp_path):
    tag = fake_checkpoint(tmp_path, 4, ranks=2)
    with pytest.raises(DistillError, match="holds trainer state for 2 ranks, this run has 4"):
        checkpoint.resolve_resume(tmp_path, tag, 4)
    with pytest.raises(DistillError, match="checkpoint 'step-00000009' not found"):
        checkpoint.resolve_resume(tmp_path, "step-00000009", 2)


def test_prune_keeps_newest_complete_and_drops_unfinished(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    checkpoint.write_atomic(tmp_path / "latest", checkpoint.tag_for(6))
    checkpoint._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-00000004", "step-00000006"]
