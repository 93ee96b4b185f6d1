"""What a run reports: TensorBoard scalars, a metrics.jsonl file and a progress bar, from rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from distill.files import write_atomic


def reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """Average scalars over ranks (every rank must call with the same keys)."""
    if not values or not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def reduce_max(values: dict[str, float], device) -> dict[str, float]:
    """Maximum over ranks (peak memory: the rank closest to running out is the one that matters)."""
    if not values or not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank since the last call: allocated GPU memory, or on CPU the process' peak
    resident set (Linux resets it through /proc/self/clear_refs; where that is refused, it stays the
    peak since the start)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20  # KiB
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak


class Monitor:
    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int, flat_config: dict[str, Any]):
        self.rank = rank
        self.writer = None
        self.bar = None
        self.metrics_file: Optional[Any] = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step or None)
        _drop_rows_after(out_dir / "metrics.jsonl", start_step)
        self.metrics_file = open(out_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="distill", dynamic_ncols=True)
        table = "\n".join(f"| `{k}` | `{v}` |" for k, v in flat_config.items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, global_step=start_step)
        self._hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_config.items()}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.metrics_file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics_file.flush()
        shown = {k.split("/")[-1]: v for k, v in scalars.items()  # groups only, not their parts
                 if k.count("/") == 1 and (k.startswith("loss/") or k.startswith("eval/"))}
        if shown:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.rank == 0:
            self.writer.add_text(tag, markdown, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, final_metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        finite = {k: v for k, v in final_metrics.items() if isinstance(v, float) and math.isfinite(v)}
        self.writer.add_hparams(self._hparams, {f"hparam/{k}": v for k, v in finite.items()}, run_name=".")
        self.writer.close()
        self.metrics_file.close()
        self.bar.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep one row per step across a resume: the rows a killed run wrote after its checkpoint are
    replayed by the resumed run (as TensorBoard's purge_step does for the event files)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a row torn by a kill
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def memory_report(path: Path, teacher, student, device: torch.device, precision: str, peak_gb: float) -> None:
    """Bytes each rank holds for the teacher, the student and its optimizer (``memory.json``): what
    ZeRO-3 partitioned, to check the per-rank arithmetic of BENCHMARKS.md against a real run; and the
    rank's peak since training started (``peak_gb``: loading excluded)."""
    mine = {"teacher_param_bytes": _param_bytes(teacher.module) if teacher is not None else 0,
            "student_param_bytes": _param_bytes(student.module),
            "optimizer_bytes": _tensor_bytes(student.optimizer.state_dict()),
            "peak_memory_gb": peak_gb}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        write_atomic(path, json.dumps({"world_size": len(ranks), "precision": precision, "per_rank": ranks}, indent=2)
                     + "\n")


def _param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its ZeRO-3 partitions, or whole tensors."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in module.parameters())


def _tensor_bytes(tree: Any) -> int:
    """Bytes of every distinct tensor in a nested state dict."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr() if x.numel() else id(x)] = x.nbytes
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(tree)
    return sum(seen.values())
