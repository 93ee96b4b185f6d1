"""A ``distill`` command exits quietly: nothing on stderr but what it says itself."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("args, code", [
    (["check-config", "--config", "recipes/demo/kd.yaml"], 0),
    (["check-config", "--config", "recipes/demo/kd.yaml", "loss.w_kd=nan"], 2),
])
def test_no_tracebacks_at_exit(args, code):
    # The process-group teardown registered at exit used to import torch during shutdown, whose
    # operator libraries then failed to finalize ("Exception ignored in: <finalize object ...>").
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
