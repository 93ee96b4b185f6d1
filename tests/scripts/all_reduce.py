"""Run under the deepspeed launcher: join the process group the way the trainer does, all-reduce a
tensor larger and smaller than DeepSpeed's CPU shared-memory threshold, and print what came back."""

import json

import torch
import torch.distributed as dist
from deepspeed import comm

from distill.runtime.process_group import exit_rank, join_process_group

join_process_group()
rank = dist.get_rank()
sums = []
for n in (16, 1 << 20):  # below and above DeepSpeed's naive all-reduce threshold
    x = torch.full((n,), float(rank + 1))
    comm.all_reduce(x)
    sums.append(x.unique().tolist())
print(json.dumps({"rank": rank, "sums": sums, "shm": comm.comm.cdb.shm_comm_op is not None}), flush=True)
exit_rank(0)
