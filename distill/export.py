"""Export: turn the partitioned student back into a plain Hugging Face directory.

Parameters are gathered one at a time, so no rank ever needs room for more than one full tensor
beyond its own shard; rank 0 keeps CPU copies and writes the directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


def gathered_state_dict(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[dict]:
    """Every persistent tensor of ``module`` as a full CPU tensor on rank 0 (None on other ranks)."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    keys = set(module.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=True):
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().to("cpu", dtype or param.dtype).clone()
        elif rank == 0:
            out[name] = param.detach().to("cpu", dtype or param.dtype).clone()
    if rank != 0:
        return None
    for name, buf in module.named_buffers():
        if name in keys:
            out[name] = buf.detach().cpu().clone()
    return out


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one is removed only after the new one is complete."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_student(module: torch.nn.Module, tokenizer, out_dir: Path, dtype: Optional[torch.dtype] = None) -> None:
    """Write ``out_dir`` as a Hugging Face directory (safetensors, config, tokenizer, generation config).

    All ranks must call this (the gathers are collective); rank 0 writes into a temporary directory
    that replaces ``out_dir`` only once it is complete.
    """
    state = gathered_state_dict(module, dtype)
    if state is not None:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
