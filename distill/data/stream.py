"""The order of training micro-batches (seeded, resumable, equal per rank) and evaluation shards."""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.collate import WEIGHT_KEY
from distill.errors import DistillError


def epoch_order(n: int, epoch: int, seed: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded shuffle, cut to whole global batches.

    Every rank gets the same number of micro-batches (ZeRO-3 ranks must step together), and the
    order depends only on (seed, epoch), so a resumed run can skip straight to where it stopped.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = (n // (world_size * batch_size)) * batch_size
    mine = perm[rank::world_size][:per_rank]
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def check_enough_examples(n: int, batch_size: int, world_size: int) -> None:
    """Every rank needs one micro-batch per step; the trainer asks before any model loads."""
    if n < batch_size * world_size:
        raise DistillError(f"the training split has {n} examples, fewer than one global batch "
                           f"(training.micro_batch_size {batch_size} x {world_size} ranks)")


class BatchStream:
    """An endless, resumable stream of this rank's training micro-batches.

    Its state is (epoch, micro-batches consumed in that epoch); batches prefetched by loader workers
    but not yet handed out are not counted, so a checkpoint's position is exact.
    """

    def __init__(self, dataset, collate, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0):
        check_enough_examples(len(dataset), batch_size, world_size)
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers = num_workers
        self.epoch, self.position = 0, 0
        self._it: Optional[Iterator] = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.world_size * self.batch_size)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
        if self._it is None:
            order = epoch_order(len(self.dataset), self.epoch, self.seed, self.rank, self.world_size,
                                self.batch_size)[self.position:]
            loader = DataLoader(self.dataset, batch_sampler=order, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=_private_generator(self.seed))
            self._it = iter(loader)
        batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


class _Weighted(Dataset):
    def __init__(self, dataset, indices: list[int], weights: list[float]):
        self.dataset, self.indices, self.weights = dataset, indices, weights

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[self.indices[i]], WEIGHT_KEY: self.weights[i]}


def eval_loader(dataset, collate, batch_size: int, rank: int, world_size: int) -> DataLoader:
    """This rank's share of an evaluation split. Shards are padded to equal length (ZeRO-3 ranks must
    run the same number of forwards); the padding repeats real rows with weight 0."""
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    positions = [rank + i * world_size for i in range(per_rank)]
    indices = [p % n for p in positions]
    weights = [1.0 if p < n else 0.0 for p in positions]
    return DataLoader(_Weighted(dataset, indices, weights), batch_size=batch_size, shuffle=False,
                      collate_fn=collate, generator=_private_generator(0))


def _private_generator(seed: int) -> torch.Generator:
    """A loader's own generator: starting an iterator draws a seed from it, and drawing that from the
    global RNG would shift the dropout masks of a resumed run away from the uninterrupted one."""
    return torch.Generator().manual_seed(seed)
