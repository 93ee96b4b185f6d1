"""Run under the deepspeed launcher: several recipes, one after the other, through the real entry point
(``distill.runtime.launch.main``) in one set of ranks, so the launch cost is paid once. Arguments: a JSON file
holding a list of [recipe, [overrides...]]. Exits non-zero at the first recipe that fails."""

import json
import sys

from distill.runtime.launch import main

jobs = json.loads(open([a for a in sys.argv[1:] if not a.startswith("--")][0]).read())
for recipe, overrides in jobs:
    code = main(["--config", recipe, *overrides])
    if code:
        print(f"recipe failed: {recipe}", file=sys.stderr, flush=True)
        sys.exit(code)
