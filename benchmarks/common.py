"""What every benchmark script shares: peak memory of this process, the machine, and BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

ROOT = Path(__file__).parents[1]


def rss_hwm() -> int:
    """Peak resident set of this process in bytes (Linux VmHWM; it cannot be reset, so callers
    measure growth above a value read before the work)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def append_section(title: str, body: str) -> None:
    """Add a dated section to BENCHMARKS.md."""
    with open(ROOT / "BENCHMARKS.md", "a") as f:
        f.write(f"\n## {title} ({datetime.date.today()})\n\n{body.rstrip()}\n")
