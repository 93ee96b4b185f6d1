"""The ``distill`` command as a script, for launchers that start scripts on every rank:
``deepspeed --num_gpus 8 launchers/distill_cli.py generate --model ... --data ... --out ...``."""

from distill.cli import main
from distill.runtime.process_group import exit_rank

if __name__ == "__main__":
    exit_rank(main())
