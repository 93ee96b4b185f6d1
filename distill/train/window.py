"""The log window: what the steps since the last log line add up to, kept on the device until a log
step reads it as scalars (reduced over ranks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from distill.losses.metrics import AGREEMENT
from distill.train.monitor import reduce_mean
from distill.train.step import StepResult
from distill.train.timing import PhaseTimer


@dataclass
class Window:
    """What the steps since the last log line add up to, kept on the device until it is read."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    on_policy: int = 0
    micro_batches: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    terms: dict[str, Tensor] = field(default_factory=dict)
    agreement: Optional[Tensor] = None

    def add(self, result: StepResult, golds: list[bool]) -> None:
        self.steps += 1
        self.micro_batches += len(golds)
        self.on_policy += golds.count(False)
        self.source_tokens += result.source_tokens
        self.target_tokens += result.target_tokens
        for name, value in result.terms.items():
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        if result.agreement is not None:
            self.agreement = result.agreement if self.agreement is None else self.agreement + result.agreement

    def scalars(self, all_reduce: Callable[[Tensor], Tensor], timer: PhaseTimer, phases: tuple[str, ...],
                device: torch.device) -> dict[str, float]:
        """The losses (the mean over the window's steps of each step's global token average), tokens and
        seconds per step, and each of ``phases``' seconds per step (averaged over ranks)."""
        keys = sorted(self.terms)
        local = torch.cat([torch.stack([self.terms[k].double() for k in keys]), torch.tensor(
            [self.source_tokens, self.target_tokens], dtype=torch.float64, device=device)])
        values = all_reduce(local).tolist()
        scalars = {f"loss/{k}": v / self.steps for k, v in zip(keys, values)}
        source, target = values[-2:]
        seconds = max(time.perf_counter() - self.start, 1e-9)
        scalars["perf/tokens_per_sec"] = (source + target) / seconds
        scalars["perf/source_tokens_per_sec"] = source / seconds
        scalars["perf/target_tokens_per_sec"] = target / seconds
        scalars["perf/sec_per_step"] = seconds / self.steps  # everything: data, teacher, student, logging
        read = timer.read()
        scalars.update(reduce_mean({f"perf/{phase}_sec_per_step": read.get(phase, 0.0) / self.steps
                                    for phase in phases}, device))
        return scalars

    def agreement_scalars(self, all_reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Teacher-student agreement over the window's log steps (``metrics.AGREEMENT``), reduced over ranks."""
        if self.agreement is None:
            return {}
        *sums, n = all_reduce(self.agreement).tolist()
        return {f"agreement/{name}": value / n for name, value in zip(AGREEMENT, sums)} if n > 0 else {}
