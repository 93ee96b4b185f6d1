"""A ``distill`` command exits quietly: nothing on stderr but what it says itself."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("args, code", [
    (["check-config", "--config", "recipes/demo/kd.yaml", "student.path=facebook/bart-base",
      "teacher.path=facebook/bart-large", "data.path=recipes"], 0),  # paths that exist (hub ids are not looked up)
    (["check-config", "--config", "recipes/demo/kd.yaml", "loss.w_kd=nan"], 2),
])
def test_no_tracebacks_at_exit(args, code):
    # The process-group teardown registered at exit used to import torch during shutdown, whose
    # operator libraries then failed to finalize ("Exception ignored in: <finalize object ...>").
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.integration
def test_an_error_only_one_rank_finds_reaches_the_user(pair, tmp_path):
    """Rank 1 refuses, rank 0 loses its peer: the user sees rank 1's line, once, and no traceback."""
    import ranks

    proc = ranks.launch(ranks.ROOT / "tests/scripts/one_rank_error.py",
                        ["--config", ranks.ROOT / "recipes/demo/kd.yaml", *pair, f"training.output_dir={tmp_path / 'run'}"])
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert errors == ["distill: error: rank 1: teacher cache shard 3 is damaged (only rank 1 reads it)"], text[-3000:]
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]


@pytest.mark.integration
def test_run_py_without_a_launcher_is_one_rank(pair, tmp_path):
    """`python launchers/run.py` with no launcher runs as one rank: a refusal made after the process group
    exists (a resume tag that is not there) is its one line, not DeepSpeed's MPI discovery traceback."""
    import ranks

    proc = subprocess.run([sys.executable, "launchers/run.py", "--config", "recipes/demo/kd.yaml", *pair,
                           f"training.output_dir={tmp_path / 'run'}", "training.resume=step-00000009"],
                          cwd=ROOT, env=ranks.ENV, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "step-00000009" in errors[0]
