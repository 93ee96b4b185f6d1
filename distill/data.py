"""Data: load a dataset split, tokenize micro-batches on the fly, and stream them in a resumable order.

Tokenizing in the collator (rather than a ``map`` pass over the whole corpus) costs nothing up front,
needs no cache shared between ranks, and keeps padding dynamic: each micro-batch is padded to its
own longest example.

``Seq2SeqCollator`` serves encoder-decoder models, ``CausalCollator`` decoder-only ones (prompt and
response in one sequence, or plain text); ``causal_model_inputs`` says what of its batch the model gets.
"""

from __future__ import annotations

import math
import os
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
    (the target column only when ``need_target``: generation inputs may have none) and their values."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(cfg.path).expanduser()
    level = datasets.logging.get_verbosity()
    # Its loaders log a failure before raising it; the error below says the same, in one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = _load(cfg, path, split)
    except DistillError:
        raise
    except Exception as exc:  # datasets raises many types
        if "corresponds to no data" in str(exc):
            raise DistillError(f"the {role} split '{split}' of dataset '{cfg.path}' is empty") from None
        bad = _failing_file(cfg, path) if path.is_dir() else None
        raise DistillError(f"cannot load {role} split '{split}' of dataset '{cfg.path}'"
                           f"{f' (file {bad})' if bad else ''}: {_reasons(exc)}") from None
    finally:
        datasets.logging.set_verbosity(level)
    keys = [k for k in (("source_column", "target_column") if need_target else ("source_column",))
            if getattr(cfg, k) is not None]  # a null target column: plain text
    for key in keys:
        if getattr(cfg, key) not in ds.column_names:
            raise DistillError(f"data.{key} '{getattr(cfg, key)}' is not a column of the {role} split '{split}' "
                               f"(columns: {', '.join(ds.column_names)})")
    limit = cfg.max_train_samples if role == "train" else cfg.max_eval_samples
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    ds = _check_values(ds, cfg, [getattr(cfg, k) for k in keys], split, role)
    if len(ds) == 0:
        raise DistillError(f"the {role} split '{split}' of dataset '{cfg.path}' is empty")
    return ds


def _load(cfg: DataConfig, path: Path, split: str):
    import datasets

    if path.is_file():
        builder = _BUILDERS.get("".join(path.suffixes[-1:]).lower())
        if builder is None:
            raise DistillError(f"data.path {path}: unsupported file type (use json, jsonl, csv or parquet)")
        # A single file is the "train" split; slices such as "train[-200:]" still work.
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split=split)
    if path.is_dir():
        return datasets.load_dataset(str(path), name=cfg.name, split=split)
    if cfg.path.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS:
        raise DistillError(f"data.path not found: {cfg.path}")
    return datasets.load_dataset(cfg.path, name=cfg.name, split=split)


def _reasons(exc: BaseException) -> str:
    """What went wrong, from the whole exception chain: datasets wraps a parser's error in a generic
    one ("An error occurred while generating the dataset"), and its JSON loader's last fallback
    raises its own error over the first reader's more precise one."""
    from datasets.exceptions import DatasetGenerationError

    lines: list[str] = []
    for e in _chain(exc):
        line = first_line(e) if str(e).strip() else ""
        if line and line not in lines and not isinstance(e, DatasetGenerationError):
            lines.append(line)
    return "; ".join(lines) or type(exc).__name__


def _chain(exc: Optional[BaseException]) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _failing_file(cfg: DataConfig, path: Path) -> Optional[str]:
    """The data file of directory ``path`` that fails to load on its own, or None when none can be
    singled out. Loading a directory prepares every split, so any of its files may be the one; this
    loads them again one by one (into a throwaway cache), which only a failed load pays for."""
    import tempfile

    import datasets

    try:
        builder = datasets.load_dataset_builder(str(path), name=cfg.name)
        files = [f for split_files in builder.config.data_files.values() for f in split_files]
    except Exception:  # only naming the file is at stake: the caller reports the load's own error
        return None
    with tempfile.TemporaryDirectory() as cache:
        for f in files:
            try:
                datasets.load_dataset(builder.name, data_files=str(f), split="train", cache_dir=cache)
            except Exception:
                return str(f)
    return None


def _check_values(ds, cfg: DataConfig, columns: list[str], split: str, role: str):
    """Refuse the rows whose text columns hold a null or a non-string (with ``data.skip_invalid``, drop
    them), in one vectorized pass over the columns: otherwise the collator fails at the batch holding
    one, mid-training, without naming it."""
    import numpy as np
    import pyarrow.compute as pc

    table = ds.with_format("arrow")  # rows as selected, not the whole file
    invalid = {column: _not_text(table[column]) for column in columns}
    if cfg.skip_invalid:
        drop = np.zeros(len(ds), dtype=bool)
        for mask in invalid.values():
            drop |= mask.to_numpy()
        if drop.any():
            if os.environ.get("RANK", "0") == "0":  # every rank drops the same rows; one line says it
                print(f"distill: dropped {int(drop.sum())} of {len(ds)} rows of the {role} split '{split}' with a null "
                      f"or non-string value in column {' or '.join(repr(c) for c in columns)} (data.skip_invalid)")
            ds = ds.select(np.flatnonzero(~drop))
        return ds
    found = [(pc.index(mask, True).as_py(), column) for column, mask in invalid.items()]
    found = [(row, column) for row, column in found if row >= 0]
    if found:
        row, column = min(found)
        value = ds[row][column]
        what = "a null" if value is None else f"a non-string value ({_short(value)})"
        raise DistillError(f"data: row {row} of the {role} split '{split}' has {what} in column '{column}' "
                           "(set data.skip_invalid: true to drop such rows)")
    return ds


def _not_text(values):
    """Per row of an Arrow column: whether its value is missing or not a string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values.type, pa.JsonType):  # a JSON column of mixed types holds each value's JSON text
        return pc.invert(pc.starts_with(values.cast(values.type.storage_type), '"')).fill_null(True)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) \
            or pa.types.is_string_view(values.type):
        return values.is_null()
    return pa.chunked_array([pa.repeat(True, len(values))])  # numbers, lists, ...: no value is text


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def drop_overlong(ds, cfg: DataConfig, tokenizer):
    """With ``data.truncation: false``, keep only the examples that fit the length limits (plain text:
    their sum, as in ``CausalCollator``)."""
    def fits(batch: dict[str, list]) -> list[bool]:
        src = tokenizer([cfg.source_prefix + s for s in batch[cfg.source_column]])["input_ids"]
        if cfg.target_column is None:
            return [len(s) <= cfg.max_source_length + cfg.max_target_length for s in src]
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

    def __post_init__(self) -> None:
        if self.cfg.target_column is None:
            raise DistillError("data.target_column is null (plain text), which only decoder-only models can train on")

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


@dataclass
class CausalCollator:
    """Rows of text to a padded batch for a decoder-only model: each example is one sequence (prompt
    then response, or plain text with ``data.target_column`` null), right-padded, optionally several
    examples to a row (``data.packing``).

    Keys: ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` (0, 1, ... from the
    start of each example; padding continues the count of the example before it), ``labels`` and
    ``weight`` (B,). Labels are aligned with the logits, not with the inputs: ``labels[:, t]`` is the
    token at t+1 when that token is a target, else IGNORE_INDEX, so the losses take logits and labels
    as they are, ``labels != IGNORE_INDEX`` is the distillation mask, and no label crosses from one
    packed example into the next. Targets are the response with what ends it (EOS, or the chat
    template's end marker); every token with ``data.loss_on_prompt`` or for plain text.

    A prompt is cut to ``max_source_length`` tokens from its end (the part next to the response
    matters; a leading BOS stays), a response to ``max_target_length`` from its start, plain text to
    their sum from its start. Give the model ``causal_model_inputs(batch)``, not the batch.
    """

    tokenizer: Any
    cfg: DataConfig
    pack_length: Optional[int] = None  # tokens per packed row; default max_source_length + max_target_length

    def __post_init__(self) -> None:
        tok, cfg = self.tokenizer, self.cfg
        if self.pack_length is None:
            self.pack_length = cfg.max_source_length + cfg.max_target_length
        if self.pack_length < 1:
            raise DistillError(f"pack_length must be >= 1, got {self.pack_length}")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise DistillError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.use_template = bool(cfg.chat_template and getattr(tok, "chat_template", None)) and \
            cfg.target_column is not None
        if not self.use_template and tok.eos_token_id is None:
            raise DistillError("the tokenizer has no EOS token to end responses and texts with")
        # The tokenizer's own BOS convention: LLaMA adds one, Qwen none.
        bos = tok.bos_token_id
        self.bos = [bos] if bos is not None and tok("")["input_ids"][:1] == [bos] else []

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _chat(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) from the chat template: the response is what the conversation
        adds to the prompt rendered with its generation prompt (the template writes any BOS itself)."""
        tok = self.tokenizer
        fulls = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False) for p, r in zip(prompts, responses)]
        heads = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        pairs = []
        for full, head, full_ids, head_ids in zip(fulls, heads, self._tokenize(fulls), self._tokenize(heads)):
            if full_ids[:len(head_ids)] == head_ids:
                pairs.append((head_ids, full_ids[len(head_ids):]))
            elif full.startswith(head):  # a token merged across the boundary: split the text instead
                pairs.append((head_ids, self._tokenize([full[len(head):]])[0]))
            else:
                raise DistillError("the tokenizer's chat template does not render the prompt as the start of the "
                                   "conversation; set data.chat_template: false")
        return pairs

    def _keep_end(self, ids: list[int], limit: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        keep = 1 if limit > 1 and ids[0] == self.tokenizer.bos_token_id else 0
        return ids[:keep] + ids[len(ids) - (limit - keep):]

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """One example's token ids and, per token, whether it is a target."""
        return self._encode([row])[0]

    def _encode(self, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[bool]]]:
        tok, cfg = self.tokenizer, self.cfg
        prompts = [cfg.source_prefix + r[cfg.source_column] for r in rows]
        if cfg.target_column is None:
            limit = cfg.max_source_length + cfg.max_target_length
            texts = [(self.bos + ids + [tok.eos_token_id])[:limit] for ids in self._tokenize(prompts)]
            return [(ids, [True] * len(ids)) for ids in texts]
        responses = [r[cfg.target_column] for r in rows]
        if self.use_template:
            pairs = self._chat(prompts, responses)
        else:
            pairs = [(self.bos + p, r + [tok.eos_token_id])
                     for p, r in zip(self._tokenize(prompts), self._tokenize(responses))]
        out = []
        for prompt, response in pairs:
            prompt, response = self._keep_end(prompt, cfg.max_source_length), response[:cfg.max_target_length]
            out.append((prompt + response, [cfg.loss_on_prompt] * len(prompt) + [True] * len(response)))
        return out

    def _pack(self, lengths: list[int], weights: list[float]) -> list[list[int]]:
        """Greedy, in order: an example joins the current row while it fits and weighs the same (a row has
        one weight); one longer than a row gets a row of its own."""
        rows: list[list[int]] = []
        size = 0
        for i, n in enumerate(lengths):
            if rows and size + n <= self.pack_length and weights[rows[-1][0]] == weights[i]:
                rows[-1].append(i)
                size += n
            else:
                rows.append([i])
                size = n
        return rows

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = self._encode(rows)
        # Padding rows added to even out evaluation shards across ranks weigh nothing.
        weights = [float(r.get(WEIGHT_KEY, 1.0)) for r in rows]
        groups = (self._pack([len(ids) for ids, _ in examples], weights) if self.cfg.packing
                  else [[i] for i in range(len(rows))])
        width = max(1, max(sum(len(examples[i][0]) for i in g) for g in groups))
        input_ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(groups), width), dtype=torch.long)
        position_ids = torch.zeros((len(groups), width), dtype=torch.long)
        labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
        for b, group in enumerate(groups):
            start = 0
            for i in group:
                ids, targets = torch.tensor(examples[i][0], dtype=torch.long), torch.tensor(examples[i][1])
                n = len(ids)
                input_ids[b, start:start + n] = ids
                attention_mask[b, start:start + n] = 1
                position_ids[b, start:start + n] = torch.arange(n)
                # Logits at t predict token t+1; an example's last position predicts nothing of its own.
                labels[b, start:start + n - 1] = torch.where(targets[1:], ids[1:], IGNORE_INDEX)
                start += n
            position_ids[b, start:] = torch.arange(width - start) + (position_ids[b, start - 1] + 1 if start else 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "weight": torch.tensor([weights[g[0]] for g in groups]),
        }


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether some row of a ``CausalCollator`` batch holds more than one example (its position ids restart)."""
    pos = batch["position_ids"]
    return bool((pos[:, 1:] != pos[:, :-1] + 1).any())


def causal_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments a decoder-only model's forward gets for a ``CausalCollator`` batch:
    ``input_ids``, ``position_ids``, ``attention_mask`` (the 2-D padding mask, or None for packed
    batches) and ``use_cache=False`` (so a caller must not pass ``use_cache`` again).

    Why None and no cache: transformers 5 keeps packed examples apart only through its own detection
    (``masking_utils._preprocess_mask_arguments``): when the 2-D mask is None *and* there is no cache,
    it reads sequence boundaries from where ``position_ids`` restart (``find_packed_sequence_indices``)
    and builds a block-causal mask. A 2-D mask, or the empty cache a model creates for the config's
    default ``use_cache=True``, turns that off and every token of a row would see the examples before
    it. Padding needs no mask in packed rows: it only follows real tokens, which cannot see it.
    """
    packed = is_packed(batch)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": None if packed else batch["attention_mask"], "use_cache": False}


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
