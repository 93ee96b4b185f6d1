#!/usr/bin/env python
"""Launch with: deepspeed --num_gpus N launchers/run.py --config recipes/X.yaml [key=value ...]

Also runs under torchrun, and on CPU with DS_ACCELERATOR=cpu.
"""

from distill.runtime.environment import one_rank_env
from distill.runtime.process_group import exit_rank
from distill.train.launch import main

if __name__ == "__main__":
    one_rank_env()
    exit_rank(main())
