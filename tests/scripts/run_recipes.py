"""Run under the deepspeed launcher: several jobs, one after the other, in one set of ranks, so the launch
cost is paid once. Argument: a JSON file holding a list of jobs, each [recipe, [overrides...]] for a
training run through the real entry point (``distill.train.launch.main``) or ["distill", [argv...]] for
a ``distill`` command (``distill.cli.main``, as launchers/distill_cli.py runs it). Exits non-zero at the
first job that fails, and ends through ``exit_rank`` as the launchers do."""

import json
import sys

from distill.cli import main as distill
from distill.runtime.process_group import exit_rank
from distill.train.launch import main as train

jobs = json.loads(open([a for a in sys.argv[1:] if not a.startswith("--")][0]).read())
for first, args in jobs:
    code = distill(args) if first == "distill" else train(["--config", first, *args])
    if code:
        print(f"job failed: {f'distill {args[0]}' if first == 'distill' else first}", file=sys.stderr, flush=True)
        exit_rank(code)
exit_rank(0)
