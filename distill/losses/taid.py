"""TAID's interpolation weight λ (Shing et al. 2025), kept on the device so that stepping it never
waits for the GPU."""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses.schedules import schedule_value

TaidMode = Literal["constant", "linear", "adaptive"]

TAID_MODES: tuple[str, ...] = get_args(TaidMode)


class TaidLambda:
    """The TAID interpolation weight λ, stepped once per optimizer step.

    Modes: ``constant`` (λ = start), ``linear`` (start → end over total_steps), ``adaptive``
    (Shing et al. 2025, Alg. 1): with δ_n the relative drop of the loss since the previous step and
    m_n = momentum·m_{n−1} + (1−momentum)·δ_n,
        λ ← min(end, max(linear(n), λ + adaptive_rate·sigmoid(m_n)·(1−λ))).
    A fast-falling loss means the student keeps up, so the target moves on to the teacher faster;
    the linear schedule is a floor so λ always reaches ``end`` by total_steps.

    λ and the adaptive state are float64 0-d tensors. ``update(step, loss)`` does tensor arithmetic
    only, on the device of ``loss`` (the state follows it there): no value is read back to the host,
    so the trainer need not wait for the step's loss. ``step`` = optimizer steps completed (1 after
    the first); ``loss`` the step's distillation loss, the same (reduced) value on every rank so λ
    stays identical. A non-finite loss is no evidence: it leaves the momentum's input at 0.
    """

    def __init__(
        self,
        start: float = 0.1,
        end: float = 1.0,
        total_steps: int | None = None,
        mode: str = "linear",
        momentum: float = 0.99,
        adaptive_rate: float = 5e-4,
        eps: float = 1e-8,
    ):
        if mode not in TAID_MODES:
            raise DistillError(f"unknown taid lambda mode {mode!r}; choose one of {', '.join(TAID_MODES)}")
        if not 0.0 <= start <= end <= 1.0:
            raise DistillError(f"taid lambda needs 0 <= start <= end <= 1, got start={start} end={end}")
        if mode != "constant" and (total_steps is None or total_steps <= 0):
            raise DistillError(f"taid lambda mode {mode!r} needs total_steps > 0, got {total_steps}")
        if not 0.0 <= momentum < 1.0:
            raise DistillError(f"taid momentum must be in [0, 1), got {momentum}")
        if adaptive_rate < 0:
            raise DistillError(f"taid adaptive_rate must be >= 0, got {adaptive_rate}")
        self.start, self.end, self.total_steps = float(start), float(end), total_steps
        self.mode, self.momentum, self.adaptive_rate, self.eps = mode, momentum, adaptive_rate, eps
        self._step = 0
        self._set(start, 0.0, float("nan"))

    def _set(self, value, m, prev_loss) -> None:
        """λ, the momentum of the relative loss change and the last finite loss (NaN: none yet)."""
        self._value, self._m, self._prev = (torch.as_tensor(x, dtype=torch.float64) for x in (value, m, prev_loss))

    @property
    def value(self) -> Tensor:
        """λ to use for the next forward pass (0-d float64)."""
        return self._value

    @property
    def adaptive(self) -> bool:
        """Whether ``update`` needs the step's loss."""
        return self.mode == "adaptive"

    def update(self, step: int, loss: Optional[Tensor] = None) -> Tensor:
        """Advance λ after optimizer step ``step``; returns the new value."""
        self._step = int(step)
        if self.mode == "constant":
            return self._value
        floor = schedule_value("linear", self.start, self.end, self._step, self.total_steps)
        if self.mode == "linear":
            self._value = torch.full_like(self._value, floor)
            return self._value
        if loss is None:
            raise ValueError("the adaptive TAID λ needs each step's distillation loss")
        loss = torch.as_tensor(loss, dtype=torch.float64).detach()
        # the state follows the loss (once); non_blocking: no stream sync for a CPU -> device copy
        self._set(*(x.to(loss.device, non_blocking=True) for x in (self._value, self._m, self._prev)))
        finite = torch.isfinite(loss)
        evidence = finite & torch.isfinite(self._prev)  # none on the first step, or from a non-finite loss
        delta = torch.where(evidence, (self._prev - loss) / (self._prev.abs() + self.eps), 0.0)
        self._prev = torch.where(finite, loss, self._prev)
        self._m = self.momentum * self._m + (1.0 - self.momentum) * delta
        grow = self.adaptive_rate * torch.sigmoid(self._m) * (1.0 - self._value)
        self._value = (self._value + grow).clamp(min=floor, max=self.end)
        return self._value

    def state_dict(self) -> dict:
        # on the CPU, so a checkpoint loads on any device (saving one waits for the device anyway)
        return {"value": self._value.cpu(), "step": self._step, "m": self._m.cpu(), "prev_loss": self._prev.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Also reads older checkpoints: python floats, ``prev_loss`` None before the first loss."""
        self._step = int(state["step"])
        prev = state["prev_loss"]
        self._set(state["value"], state["m"], float("nan") if prev is None else prev)
