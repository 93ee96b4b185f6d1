"""What a resumed run continues from besides the engine's own state (weights, optimizer, learning-rate
schedule): the step, the data position (global samples into the epoch, so any number of ranks continues
from the same example), the objective's schedules (TAID's λ), the best evaluation, and the run id that
keeps pruning inside the run. The RNG states go with it (``checkpoint.save``). All of it but the RNG
states is the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from distill.data.stream import BatchStream
from distill.losses.objective import Objective


@dataclass
class TrainState:
    stream: BatchStream
    objective: Objective
    run_id: str
    step: int = 0
    best: Optional[dict[str, Any]] = None  # eval.best_metric's best value so far, and its step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.stream.state_dict(), "objective": self.objective.state_dict(),
                "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.objective.load_state_dict(state["objective"])
        self.best = state.get("best")
