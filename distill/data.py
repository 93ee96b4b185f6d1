"""Data: load a dataset split, tokenize micro-batches on the fly, and stream them in a resumable order.

Tokenizing in the collator (rather than a ``map`` pass over the whole corpus) costs nothing up front,
needs no cache shared between ranks, and keeps padding dynamic: each micro-batch is padded to its
own longest example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import DataConfig
from distill.errors import DistillError, first_line

IGNORE_INDEX = -100
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
WEIGHT_KEY = "__weight__"


def load_split(cfg: DataConfig, split: str, role: str, need_target: bool = True):
    """One split of ``cfg.path`` as a ``datasets.Dataset``, checked for the configured columns
    (the target column only when ``need_target``: generation inputs may have none)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(cfg.path).expanduser()
    try:
        if path.is_file():
            builder = _BUILDERS.get("".join(path.suffixes[-1:]).lower())
            if builder is None:
                raise DistillError(f"data.path {path}: unsupported file type (use json, jsonl, csv or parquet)")
            # A single file is the "train" split; slices such as "train[-200:]" still work.
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split=split)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), name=cfg.name, split=split)
        elif cfg.path.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS:
            raise DistillError(f"data.path not found: {cfg.path}")
        else:
            ds = datasets.load_dataset(cfg.path, name=cfg.name, split=split)
    except DistillError:
        raise
    except Exception as exc:  # datasets raises many types; the first line says what went wrong
        if "corresponds to no data" in str(exc):
            raise DistillError(f"the {role} split '{split}' of dataset '{cfg.path}' is empty") from None
        raise DistillError(f"cannot load {role} split '{split}' of dataset '{cfg.path}': {first_line(exc)}") from None
    for key in ("source_column", "target_column") if need_target else ("source_column",):
        column = getattr(cfg, key)
        if column not in ds.column_names:
            raise DistillError(f"data.{key} '{column}' is not a column of the {role} split '{split}' "
                               f"(columns: {', '.join(ds.column_names)})")
    limit = cfg.max_train_samples if role == "train" else cfg.max_eval_samples
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    if len(ds) == 0:
        raise DistillError(f"the {role} split '{split}' of dataset '{cfg.path}' is empty")
    return ds


def drop_overlong(ds, cfg: DataConfig, tokenizer):
    """With ``data.truncation: false``, keep only the examples that fit the length limits."""
    def fits(batch: dict[str, list]) -> list[bool]:
        src = tokenizer([cfg.source_prefix + s for s in batch[cfg.source_column]])["input_ids"]
        tgt = tokenizer(text_target=batch[cfg.target_column])["input_ids"]
        return [len(s) <= cfg.max_source_length and len(t) <= cfg.max_target_length for s, t in zip(src, tgt)]

    kept = ds.filter(fits, batched=True)
    if len(kept) == 0:
        raise DistillError(f"no example fits data.max_source_length={cfg.max_source_length} and "
                           f"data.max_target_length={cfg.max_target_length} (data.truncation is false)")
    return kept


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: start token first, labels shifted by one, ignored positions as padding."""
    out = labels.new_full(labels.shape, pad_token_id)
    out[:, 0] = decoder_start_token_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill_(out == IGNORE_INDEX, pad_token_id)


@dataclass
class Seq2SeqCollator:
    """Rows of text to a padded batch: input ids, attention mask, labels and decoder inputs."""

    tokenizer: Any
    cfg: DataConfig
    decoder_start_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok, cfg = self.tokenizer, self.cfg
        enc = tok([cfg.source_prefix + r[cfg.source_column] for r in rows], max_length=cfg.max_source_length,
                  truncation=True, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                  return_tensors="pt")
        tgt = tok(text_target=[r[cfg.target_column] for r in rows], max_length=cfg.max_target_length,
                  truncation=True, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                  return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE_INDEX)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "decoder_input_ids": shift_right(labels, self.decoder_start_token_id, tok.pad_token_id),
            # Padding rows added to even out evaluation shards across ranks weigh nothing.
            "weight": torch.tensor([float(r.get(WEIGHT_KEY, 1.0)) for r in rows]),
        }


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


class BatchStream:
    """An endless, resumable stream of this rank's training micro-batches.

    Its state is (epoch, micro-batches consumed in that epoch); batches prefetched by loader workers
    but not yet handed out are not counted, so a checkpoint's position is exact.
    """

    def __init__(self, dataset, collate, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0):
        if len(dataset) < batch_size * world_size:
            raise DistillError(f"the training split has {len(dataset)} examples, fewer than one global batch "
                               f"(training.micro_batch_size {batch_size} x {world_size} ranks)")
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
