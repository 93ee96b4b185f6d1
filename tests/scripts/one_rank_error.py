"""Run under the deepspeed launcher: a run whose set-up finds a DistillError on rank 1 only (as a damaged
teacher-cache shard that only rank 1 reads would), while rank 0 goes on to its next collective."""

import sys

import torch.distributed as dist

from distill.errors import DistillError
from distill.runtime.process_group import exit_rank, join_process_group
from distill.train.launch import main
from distill.train import loop


def setup(self):
    join_process_group()
    if dist.get_rank() == 1:
        raise DistillError("teacher cache shard 3 is damaged (only rank 1 reads it)")
    dist.barrier()


loop.Trainer.setup = setup
exit_rank(main(sys.argv[1:]))
