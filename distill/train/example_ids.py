"""``training.record_example_ids``: which examples each rank trained on at each step, to check that a
resumed run, on any number of ranks, skips and repeats nothing.

One file per rank, ``<output_dir>/example_ids/rank{r}.jsonl``, one line per optimizer step:
``{"step": 7, "ids": [...]}``, the dataset indices of the rank's micro-batches of that step in order.
The union over the files of a step's ids is that step's global batch. The ids are host integers the
data stream already holds, so recording them costs no device sync.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.files import write_atomic

DIRECTORY = "example_ids"


class ExampleIds:
    def __init__(self, out_dir: Path, rank: int, world: int, step: int, accumulation: int):
        self.dir = Path(out_dir) / DIRECTORY
        self.path = self.dir / f"rank{rank}.jsonl"
        self.accumulation = accumulation
        self.ids: list[int] = []
        self.micro_batches = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        # A resumed run redoes the steps after its checkpoint: what an earlier start recorded for them
        # goes, from this rank's file and (rank 0) from those of ranks this run does not have.
        extra = [p for p in self.dir.glob("rank*.jsonl") if int(p.stem[len("rank"):]) >= world] if rank == 0 else []
        for path in [self.path, *extra]:
            _keep_until(path, step)

    def add(self, step: int, ids: list[int]) -> None:
        """Record one micro-batch of ``step``; its last micro-batch writes the step's line."""
        self.ids += ids
        self.micro_batches += 1
        if self.micro_batches == self.accumulation:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ids": self.ids}) + "\n")
            self.ids, self.micro_batches = [], 0


def _keep_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the last line of a start that was killed while writing it
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))

