"""The ``distill`` command as a script, for launchers that start scripts on every rank:
``deepspeed --num_gpus 8 launchers/distill_cli.py generate --model ... --data ... --out ...``."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
