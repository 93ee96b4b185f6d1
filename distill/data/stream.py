"""The order of training micro-batches (seeded, resumable, the same global batches on any number of
ranks) and evaluation shards."""

from __future__ import annotations

import math
import signal
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.collate import EPOCH_KEY, WEIGHT_KEY
from distill.errors import DistillError


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """Every example of the split in this epoch's order: a seeded shuffle of (seed, epoch) alone, so the
    order is the same on any number of ranks and a resumed run can skip straight to where it stopped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_batches(order: list[int], micro_batch: int, accumulation: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch. The order is cut into whole global batches (micro-batch x
    accumulation x ranks examples, one per optimizer step; the remainder is dropped), and each global
    batch into one contiguous share per rank, ``accumulation`` micro-batches each. A step therefore
    sees the same examples however they are split over ranks and accumulation steps, and every rank runs
    the same number of micro-batches (ZeRO-3 ranks must step together)."""
    share = micro_batch * accumulation
    global_batch = share * world_size
    batches = []
    for start in range(0, len(order) - global_batch + 1, global_batch):
        mine = order[start + rank * share:start + (rank + 1) * share]
        batches += [mine[i:i + micro_batch] for i in range(0, share, micro_batch)]
    return batches


def check_enough_examples(n: int, micro_batch: int, accumulation: int, world_size: int) -> None:
    """Every optimizer step takes one global batch; the trainer asks before any model loads."""
    if n < micro_batch * accumulation * world_size:
        raise DistillError(f"the training split has {n} examples, fewer than one global batch "
                           f"(training.micro_batch_size {micro_batch} x training.gradient_accumulation_steps "
                           f"{accumulation} x {world_size} ranks)")


def loader_workers(num_workers: Optional[int], gpu: bool) -> int:
    """``data.num_workers``, where null is 2 on a GPU (its step leaves the host idle) and 0 on CPU (workers
    would take the cores the step runs on)."""
    return num_workers if num_workers is not None else (2 if gpu else 0)


class BatchStream:
    """An endless, resumable stream of this rank's training micro-batches.

    Its state is (epoch, global samples consumed in that epoch): any number of ranks with the same
    global batch continues from the same example. ``num_workers`` loader processes collate (tokenize,
    pack, corrupt, align) the next micro-batches while the step runs; a batch depends only on its
    examples, the seed and the epoch, so it is the same made in any process. Batches prefetched but not
    yet handed out are not counted, so a checkpoint's position is exact. ``pin_memory``: batches come in
    page-locked memory, which a GPU copies from without blocking the host. ``last_ids`` are the dataset
    indices of the micro-batch handed out last (host integers: reading them costs no device sync).
    """

    def __init__(self, dataset, collate, batch_size: int, rank: int, world_size: int, seed: int,
                 accumulation: int = 1, num_workers: int = 0, pin_memory: bool = False):
        check_enough_examples(len(dataset), batch_size, accumulation, world_size)
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.accumulation, self.rank, self.world_size = batch_size, accumulation, rank, world_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.global_batch = batch_size * accumulation * world_size
        self.epoch, self.position = 0, 0  # position: micro-batches this rank has taken in the epoch
        self.last_ids: list[int] = []
        self._batches: list[list[int]] = []
        self._it: Optional[Iterator] = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch * self.accumulation

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._batches = rank_batches(epoch_order(len(self.dataset), self.epoch, self.seed), self.batch_size,
                                         self.accumulation, self.rank, self.world_size)
            loader = DataLoader(_InEpoch(self.dataset, self.epoch), batch_sampler=self._batches[self.position:],
                                collate_fn=self.collate, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                generator=_private_generator(self.seed), worker_init_fn=_leave_signals_to_the_trainer)
            self._it = iter(loader)
        batch = next(self._it)
        self.last_ids = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        # Saved between optimizer steps, where every rank has taken the same whole global batches.
        return {"epoch": self.epoch, "samples": self.position * self.batch_size * self.world_size,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "samples" not in state:  # (epoch, position): a per-rank order that this version no longer draws
            raise DistillError("the checkpoint records its data position in an older form (micro-batches per rank, "
                               "before the data order became independent of the number of ranks); resume it with "
                               "the distill version that wrote it, or start over with training.overwrite=true")
        samples, global_batch = int(state["samples"]), int(state["global_batch"])
        if global_batch != self.global_batch or samples % global_batch:
            raise DistillError(f"the saved data position ({samples} examples into epoch {state['epoch']}, global "
                               f"batch {global_batch}) does not fit this run's global batch of {self.global_batch}")
        self.epoch, self.position, self._it = int(state["epoch"]), samples // global_batch * self.accumulation, None


class _InEpoch(Dataset):
    """Each row tagged with the epoch it is read in (``EPOCH_KEY``): a pre-training objective corrupts a
    block afresh each epoch, from (seed, epoch, block) alone."""

    def __init__(self, dataset, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], EPOCH_KEY: self.epoch}


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


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C, a hangup and Slurm's warning reach every process of a run; a loader worker ignores them
    (one killed would fail the step): the training process stops the run and shuts its workers down.
    SIGTERM stays torch's (the trainer ends a worker with it)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _private_generator(seed: int) -> torch.Generator:
    """A loader's own generator: starting an iterator draws a seed from it, and drawing that from the
    global RNG would shift the dropout masks of a resumed run away from the uninterrupted one."""
    return torch.Generator().manual_seed(seed)
