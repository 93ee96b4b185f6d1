"""Seconds per phase of the training step (teacher, student, loss), measured without waiting on the device."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch


class PhaseTimer:
    """Seconds per phase, read at log steps only: CUDA events on a GPU (recording one waits for
    nothing), the wall clock on a CPU (where an op has finished when it returns). A phase entered
    inside another pauses it: each phase's time is its own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self.open: list[list[Any]] = []  # [phase, mark it (re)started at], innermost last

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, phase: str):
        mark = self._mark()
        if self.open:
            self.spans.append((self.open[-1][0], self.open[-1][1], mark))
        self.open.append([phase, mark])
        try:
            yield
        finally:
            end = self._mark()
            name, start = self.open.pop()
            self.spans.append((name, start, end))
            if self.open:
                self.open[-1][1] = end

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (synchronizes on a GPU: call it on log steps)."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        out: dict[str, float] = {}
        for phase, a, b in self.spans:
            out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1000 if self.cuda else b - a)
        self.spans = []
        return out
