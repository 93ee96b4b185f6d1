"""The end of a diverged run: steps in a row whose loss or gradient norm was not finite, counted on the device."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from distill.errors import DistillError


class DivergenceWatch:
    """Counts steps in a row whose loss or gradient norm was not finite, on the device; a log step and a
    save (both sync points already) read the longest streak (agreed over ranks) and end the run when it
    reaches ``limit``. ``in_streak`` says whether the last step read was not finite: a checkpoint saved
    then must not prune the last one before the streak."""

    def __init__(self, limit: int, device: torch.device, all_reduce_max: Callable[[Tensor], Tensor],
                 last_checkpoint: Callable[[], Optional[str]]):
        self.limit, self.all_reduce_max, self.last_checkpoint = limit, all_reduce_max, last_checkpoint
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)
        self.in_streak = False

    def add(self, nonfinite: Tensor) -> None:
        self.streak = torch.where(nonfinite, self.streak + 1, torch.zeros_like(self.streak))
        self.longest = torch.maximum(self.longest, self.streak)
        self.bad += nonfinite

    def check(self, step: int, say: Callable[[str], None]) -> None:
        bad, longest, streak = self.all_reduce_max(torch.stack([self.bad, self.longest, self.streak])).tolist()
        self.in_streak = streak > 0
        self.bad.zero_()
        self.longest.copy_(self.streak)
        if bad:
            say(f"distill: {bad} steps up to step {step} had a loss or gradient norm that is not finite; DeepSpeed "
                f"skipped their updates (the longest run of them: {longest}, training.max_nonfinite_steps={self.limit})")
        if longest >= self.limit:
            raise DistillError(f"training diverged: the loss or gradient norm was not finite for {longest} steps in a "
                               f"row, up to step {step}; the last finite checkpoint is {self.last_checkpoint() or 'none'}"
                               " (lower training.learning_rate, or raise training.max_nonfinite_steps)")
