"""``distill cache-teacher``: one teacher forward over a split, its top-K logits kept for every target
position (``distill.data.teacher_cache`` says what is stored and where).

* Examples are tokenized by the training collator with the training data settings (unpacked: a cache
  is per example), so the targets are the ones a training run sees.
* Shards of ``shard_examples`` consecutive examples are the unit of work: under a launcher the shards
  not yet done are dealt out over the ranks; a shard's content depends on its examples alone (its
  micro-batches are fixed by length within it), so any number of ranks writes the same cache, and a
  rerun after a kill redoes only the shards that were not finished.
* With ``ds_config`` the teacher is partitioned under ZeRO-3: every rank takes part in every forward,
  so ranks with fewer micro-batches repeat one and drop its output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from distill.config.settings import DataConfig, ModelConfig
from distill.data import teacher_cache as tc
from distill.data.objectives import IDS
from distill.errors import DistillError
from distill.files import write_atomic
from distill.losses.fused_head import VOCAB_BLOCK, chunk_budget, rows_per_chunk
from distill.runtime.process_group import on_rank0

DEFAULT_SHARD_EXAMPLES = 1024


@dataclasses.dataclass
class CacheSettings:
    top_k: int = 64
    batch_size: int = 16
    logit_dtype: str = "float16"
    shard_examples: int = DEFAULT_SHARD_EXAMPLES
    dtype: str = "auto"  # the teacher's compute dtype: float32 on CPU, bfloat16 on GPU
    chunk_mib: Optional[float] = None  # rows of the head's logits at a time (loss.logit_chunk_mib's default)

    def validate(self) -> None:
        for key in ("top_k", "batch_size", "shard_examples"):
            if getattr(self, key) < 1:
                raise DistillError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.logit_dtype not in tc.LOGIT_DTYPES:
            raise DistillError(f"--logit-dtype must be one of {', '.join(tc.LOGIT_DTYPES)}, got {self.logit_dtype!r}")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _claim(out: Path, fingerprint: dict, fresh: bool) -> bool:
    """Make ``out`` this cache's; True when it is complete already. A directory holding another cache,
    or anything else, is refused (``fresh`` empties it first)."""
    record = out / tc.FINGERPRINT
    if fresh and out.exists():
        shutil.rmtree(out)
    if record.is_file():
        diff = tc.first_difference(json.loads(record.read_text()), fingerprint)
        if diff is not None:
            raise DistillError(f"{out} holds a teacher cache of other settings ({diff}): pass --fresh to start over, "
                               "or another --out")
        return (out / tc.INDEX).is_file()
    if out.exists() and any(out.iterdir()):
        raise DistillError(f"{out} is not empty and holds no teacher cache: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(fingerprint, indent=2) + "\n")
    return False


def _shard_batches(dataset, cfg: DataConfig, first: int, count: int, batch_size: int) -> list[list[int]]:
    """The micro-batches of one shard: its examples by text length, longest first (little padding), a
    fixed order so that a shard is the same whichever rank computes it."""
    columns = [IDS] if cfg.objective is not None else [c for c in (cfg.source_column, cfg.target_column) if c is not None]
    rows = dataset[first:first + count]
    lengths = [sum(len(rows[c][i]) for c in columns) for i in range(count)]
    order = sorted(range(count), key=lambda i: (-lengths[i], i))
    return [[first + i for i in order[s:s + batch_size]] for s in range(0, count, batch_size)]


@torch.no_grad()
def _top_k(model, head, batch: dict, settings: CacheSettings, vocab: int, kind: str,
           device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's target rows: top-K ids and logits (as stored), the log-sum-exp of all logits and the log
    of the mass outside the top K (from the unrounded logits)."""
    from distill.data.collate import causal_model_inputs
    from distill.models.lm_head import trunk

    batch = {k: v.to(device) for k, v in batch.items()}
    from distill.models.architectures import ENCODER_DECODER, ENCODER_ONLY

    if kind == ENCODER_DECODER:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")} | {"use_cache": False}
    elif kind == ENCODER_ONLY:  # a masked LM reads the whole (corrupted) row
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    else:
        inputs = causal_model_inputs(batch, packed=False)
    hidden, _ = trunk(model, **inputs)
    rows = head.prepare(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"]))
    chunk = rows_per_chunk(chunk_budget(settings.chunk_mib, device), [vocab], device)
    ids_dtype = torch.int32 if vocab > 2**16 else torch.uint16
    out: dict[str, list[torch.Tensor]] = {part: [] for part in tc.TEACHER_KEYS.values()}
    with head.weights() as (weight, bias):
        for start in range(0, rows.shape[0], chunk):
            z = head.cap(head.linear(rows[start:start + chunk], weight, bias, VOCAB_BLOCK.get(device.type)).float())
            z = z[:, :vocab]  # rows past the tokenizer are vocabulary padding, never a token
            values, ids = z.topk(min(settings.top_k, vocab), dim=-1)
            out["ids"].append(ids.to(torch.int32).to(ids_dtype).cpu())
            out["logits"].append(values.to(tc.LOGIT_DTYPES[settings.logit_dtype]).cpu())
            lse = torch.logsumexp(z, dim=-1)
            out["lse"].append(lse.cpu())
            out["log_tail"].append((torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1) - lse).cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def _split_examples(found: dict[str, torch.Tensor], batch: dict, ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per example of an unpacked batch (one example per row), its rows of ``found``, in order."""
    counts = (batch["labels"] != -100).sum(1).tolist()
    out, start = {}, 0
    for example, n in zip(ids, counts):
        out[example] = {k: v[start:start + n] for k, v in found.items()}
        start += n
    return out


def cache_teacher(model_path: str, revision: Optional[str], data: DataConfig, split: str, out: Path,
                  settings: CacheSettings, device: torch.device, ds_config: Optional[str] = None,
                  fresh: bool = False, say=print, seed: int = 42) -> dict:
    """Write (or finish) the cache of ``model_path`` on ``split``; returns its index's summary. With a text
    objective (``data.objective``) the examples are its blocks, corrupted as the first epoch of a run with
    ``training.seed`` = ``seed`` corrupts them."""
    from distill.data.collate import CausalCollator, Seq2SeqCollator
    from distill.data.objectives import TextObjectiveCollator, text_blocks
    from distill.models.architectures import ENCODER_DECODER, model_kind
    from distill.data.loading import drop_overlong, load_split
    from distill.infer.generate import load_for_generation, model_location, resolve_dtype
    from distill.infer.inputs import GenerateSettings
    from distill.models.lm_head import head_of
    from distill.models.loading import load_model_config, load_tokenizer

    settings.validate()
    rank, world = _rank_world()
    mc = ModelConfig(path=model_path, revision=revision)
    config, tokenizer = load_model_config(mc, "teacher"), load_tokenizer(mc, "teacher")
    data = dataclasses.replace(data, packing=False)
    dataset = load_split(data, split, "train")
    if not data.truncation:
        dataset = drop_overlong(dataset, data, tokenizer)
    kind = model_kind(config)
    encoder_decoder = kind == ENCODER_DECODER
    if data.objective is not None:
        dataset = text_blocks(dataset, tokenizer, data, data.objective == "causal")
        collate = TextObjectiveCollator(tokenizer, data, seed, getattr(config, "decoder_start_token_id", None))
    else:
        collate = (Seq2SeqCollator(tokenizer, data, config.decoder_start_token_id) if encoder_decoder
                   else CausalCollator(tokenizer, data))
    vocab = len(tokenizer)
    fingerprint = tc.cache_fingerprint(
        tc.data_fingerprint(data, split, dataset, seed),
        tc.tokenizer_fingerprint(tokenizer, config.decoder_start_token_id if encoder_decoder else None),
        tc.teacher_fingerprint(model_path, revision, config), settings.top_k, vocab, settings.logit_dtype,
        str(resolve_dtype(settings.dtype, device)).removeprefix("torch."), settings.shard_examples)
    out = Path(out).expanduser()
    if on_rank0(_claim, out, fingerprint, fresh):
        damaged = on_rank0(tc.reopen_damaged, out)  # every shard read back against its digest
        if not damaged:
            say(f"{out} is complete already (every shard matches its digest)")
            return json.loads((out / tc.INDEX).read_text())
        say(f"{out}: {', '.join(damaged)} changed after it was written: computing it again")

    n, size = len(dataset), settings.shard_examples
    todo = on_rank0(lambda: sorted(set(range(-(-n // size))) - tc.done_shards(out)))
    mine = todo[rank::world]
    units = [(s, b, i == len(batches) - 1) for s in mine
             for batches in [_shard_batches(dataset, data, s * size, min(size, n - s * size), settings.batch_size)]
             for i, b in enumerate(batches)]
    # ZeRO-3: every rank runs as many forwards as the busiest one
    per_shard = [-(-min(size, n - s * size) // settings.batch_size) for s in todo]
    rounds = max(sum(per_shard[r::world]) for r in range(world)) if ds_config and todo else len(units)

    model, _ = load_for_generation(model_location(model_path), config,
                                   GenerateSettings(dtype=settings.dtype), device, ds_config)
    head = head_of(model)
    start, forwards, pending = time.perf_counter(), 0, {}
    for r in range(rounds):
        shard, ids, last = units[min(r, len(units) - 1)] if units else (None, [0], False)
        batch = collate([dataset[i] for i in ids])
        found = _top_k(model, head, batch, settings, vocab, kind, device)
        if r >= len(units):
            continue  # a synchronized repeat: not this rank's
        forwards += len(ids)
        pending.update(_split_examples(found, batch, ids))
        if last:
            first = shard * size
            tc.write_shard(out, shard, first, [pending.pop(i) for i in range(first, min(first + size, n))])
    seconds = time.perf_counter() - start
    if dist.is_initialized():
        dist.barrier()
    index = on_rank0(tc.write_index, out, fingerprint, n, size)
    rate = forwards / seconds if seconds > 0 else float("nan")
    say(f"teacher cache {out}: {index['examples']} examples, {index['target_rows']} target tokens, top-{settings.top_k}, "
        f"{index['bytes'] / max(index['target_rows'], 1):.1f} bytes per target token; this run: {len(mine)} shards on "
        f"rank 0, {rate:.1f} examples/s per rank")
    return {k: v for k, v in index.items() if k != "shards"} | {"examples_per_second_per_rank": rate,
                                                                 "shards_written": len(todo)}
