"""Generation: batched, length-sorted, sharded over ranks, written as resumable JSONL.

``run_generation`` is what ``distill generate``, ``distill evaluate`` and ``distill pseudo-label`` share:

* examples are sorted by source length (longest first, so an out-of-memory shows up at once) and cut
  into batches, which pads little and keeps the KV cache small;
* under a launcher, rank r takes every world-th batch; each rank appends its records to its own part
  file, flushed per batch, and rank 0 merges the parts in input order once every rank is done;
* a rerun skips every example already in any part file (whatever world size wrote it), so an
  interrupted job loses at most one batch per rank; it continues only output of the same model, data
  and settings: ``<out>.fingerprint.json``, written before the first record, says which wrote it, and
  anything else is refused (``fresh`` starts over);
* a model too large for one device runs partitioned under ZeRO-3 (``ds_config``); then every rank
  must take part in every forward pass, so generation is synchronized (``synced_gpus``) and ranks
  with fewer batches run a repeat of their last one and drop its output."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from distill.dtypes import torch_dtype
from distill.errors import DistillError, first_line
from distill.files import write_atomic
from distill.infer.inputs import DEFAULT_SOURCE_LENGTH, GENERATION_KEYS, Example, GenerateSettings
from distill.infer.outputs import done_records, parts_dir, read_records
from distill.models.architectures import ENCODER_ONLY, model_kind
from distill.paths import is_local_path
from distill.runtime.environment import rank_env
from distill.runtime.process_group import join_process_group


def read_examples(path: str, split: str = "train", source_column: str = "document",
                  target_column: Optional[str] = "summary", name: Optional[str] = None,
                  max_samples: Optional[int] = None) -> list[Example]:
    """Examples from a dataset (hub name, directory, json/jsonl/csv/parquet file) or a .txt file of
    one source per line. The target column is optional: present, it is kept as the reference."""
    p = Path(path).expanduser()
    if p.suffix == ".txt":
        if not p.is_file():
            raise DistillError(f"input file not found: {path}")
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        examples = [Example(i, line) for i, line in enumerate(lines)]
    else:
        from distill.config.settings import DataConfig
        from distill.data.loading import load_split

        cfg = DataConfig(path=path, name=name, source_column=source_column, target_column=target_column or "")
        ds = load_split(cfg, split, "input", need_target=False)
        targets = list(ds[target_column]) if target_column and target_column in ds.column_names else None
        examples = [Example(i, s, None if targets is None else targets[i]) for i, s in enumerate(list(ds[source_column]))]
    if max_samples is not None:
        examples = examples[:max_samples]
    if not examples:
        raise DistillError(f"no examples in {path}")
    return examples


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = rank_env().local_rank
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def model_location(path: str) -> str:
    """A local model's directory (``~`` expanded), or the hub id as given. Checked before any data or model
    loads, so a mistyped directory is not sent to the hub as a repo id."""
    if not is_local_path(path):
        return path
    location = Path(path).expanduser()
    if not location.is_dir():
        raise DistillError(f"model directory not found: {path}")
    return str(location)


def open_model(path: str):
    """(location, config, tokenizer) of a model, without its weights: the cheap part of loading."""
    from transformers import AutoConfig, AutoTokenizer

    location = model_location(path)
    try:
        config = AutoConfig.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot load a model and tokenizer from {path}: {first_line(exc)}") from None
    if model_kind(config) == ENCODER_ONLY:
        raise DistillError(f"{path} is an encoder-only masked LM ({config.model_type}), which does not generate text: "
                           "judge it with distill finetune")
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # prompts end where generation starts
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return location, config, tokenizer


def source_length(config, tokenizer, requested: Optional[int] = None) -> int:
    """The input length to truncate sources to: ``requested``, which may not run past the model's position
    table, or by default all the model takes (its position table, else its tokenizer's stated limit, which
    is only advice: T5's relative positions take longer inputs)."""
    positions = next((v for v in (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions"))
                      if isinstance(v, int) and v > 0), None)
    if requested is not None:
        if positions is not None and requested > positions:
            raise DistillError(f"--max-source-length {requested} is more than the model takes "
                               f"({positions} positions)")
        return requested
    # transformers stores int(1e30) when a tokenizer states no limit
    stated = tokenizer.model_max_length if 0 < tokenizer.model_max_length < 10**7 else None
    return positions or stated or DEFAULT_SOURCE_LENGTH


def load_for_generation(location: str, config, settings: GenerateSettings, device: torch.device,
                        ds_config: Optional[str] = None):
    """(model, engine-or-None) from ``open_model``'s location and config: whole on ``device``, or
    partitioned under ZeRO-3 with ``ds_config``."""
    from distill.models.loading import auto_class

    auto = auto_class(config)
    dtype = resolve_dtype(settings.dtype, device)
    if ds_config is None:
        model = auto.from_pretrained(location, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        engine = None
    else:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from distill.models.loading import gather_for_late_init
        from distill.runtime.dsconfig import read_ds_config

        ds = read_ds_config(ds_config, "generation model")
        ds = _inference_ds_config(ds, dtype, config)
        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers reads it while loading)
        with gather_for_late_init():
            model = auto.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model.eval(), config=ds)
        model = engine.module.eval()
        model._distill_ds_keep = keep
    if settings.static_cache:
        model.generation_config.cache_implementation = "static"
    if settings.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    return model, engine


def _inference_ds_config(ds: dict, dtype: torch.dtype, config) -> dict:
    """A ZeRO-3 config for a frozen model: no optimizer, batch sizes that DeepSpeed accepts."""
    from distill.models.loading import hidden_size

    ds = json.loads(json.dumps(ds))
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise DistillError("generation with a ds_config partitions the model: it must be ZeRO stage 3")
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds[key] = 1
    ds["train_batch_size"] = world
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": dtype == torch.float16}
    h = hidden_size(config)
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    for key in [k for k, v in ds.items() if v == "auto"]:
        ds.pop(key)
    return ds


def generation_config_for(model, overrides: dict[str, Any]):
    import copy

    gc = copy.deepcopy(model.generation_config)
    for key, value in overrides.items():
        if key not in GENERATION_KEYS:
            raise DistillError(f"unknown generation setting {key!r}; choose from {', '.join(GENERATION_KEYS)}")
        if value is not None:
            setattr(gc, key, value)
    if gc.max_new_tokens is None and gc.max_length is None:
        gc.max_new_tokens = 128
    return gc


@torch.no_grad()
def generate_batch(model, tokenizer, sources: list[str], settings: GenerateSettings, generation_config,
                   device: torch.device, synced: bool = False) -> tuple[list[str], list[int]]:
    """Texts and number of new tokens for one batch of sources."""
    enc = encode_prompts(tokenizer, sources, settings, model.config.is_encoder_decoder).to(device)
    out = model.generate(**enc, generation_config=generation_config, synced_gpus=synced)
    if not model.config.is_encoder_decoder:
        out = out[:, enc["input_ids"].shape[1]:]  # the prompt is part of a decoder-only output
    special = set(tokenizer.all_special_ids)
    counts = [sum(1 for t in row.tolist() if t not in special) for row in out]
    return tokenizer.batch_decode(out, skip_special_tokens=True), counts


def encode_prompts(tokenizer, sources: list[str], settings: GenerateSettings, encoder_decoder: bool):
    """Model inputs for a batch of sources. A decoder-only model continues its prompt, so prompts are
    padded on the left, truncated from the left (the end of a prompt leads into the answer), and
    wrapped in the chat template as a user turn when the tokenizer has one (as in training)."""
    texts = [settings.source_prefix + s for s in sources]
    if encoder_decoder:
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                         max_length=settings.max_source_length)
    chat = settings.chat_template and getattr(tokenizer, "chat_template", None)
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                         max_length=settings.max_source_length, add_special_tokens=not chat)
    finally:
        tokenizer.truncation_side = side


def run_generation(model, tokenizer, examples: list[Example], settings: GenerateSettings, out: Path,
                   device: torch.device, synced: bool = False, desc: str = "generate") -> list[dict]:
    """Generate for every example not yet in ``out`` and merge; returns all records in input order
    (on every rank). Records: id, prediction, new_tokens, ms (this example's share of its batch).
    What ``out`` holds already is taken as this run's: claim it first (``claim_output``)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = Path(out)
    done = done_records(out)
    if dist.is_initialized():
        dist.barrier()  # every rank has read what is done before any rank writes more: same batches everywhere
    if len(done) == len(examples) and out.is_file():
        return [done[e.id] for e in examples]
    todo = [e for e in examples if e.id not in done]
    lengths = [len(ids) for ids in tokenizer([settings.source_prefix + e.source for e in todo],
                                             truncation=True, max_length=settings.max_source_length)["input_ids"]
               ] if todo else []
    batches = length_sorted_batches(lengths, settings.batch_size)
    mine = batches[rank::world]
    rounds = -(-len(batches) // world) if synced else len(mine)  # synced: everyone runs the same count
    generation_config = generation_config_for(model, settings.generation)
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"rank{rank}-of{world}-{os.getpid()}.jsonl"
    bar = None
    if settings.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), initial=len(done), desc=desc, dynamic_ncols=True)
    with open(part, "a") as f:
        for r in range(rounds):
            batch = mine[min(r, len(mine) - 1)] if mine else batches[0]
            _sync(device)
            start = time.perf_counter()
            texts, counts = generate_batch(model, tokenizer, [todo[i].source for i in batch], settings,
                                           generation_config, device, synced)
            _sync(device)
            if r >= len(mine):
                continue  # a synchronized repeat; its output is not this rank's
            ms = 1000 * (time.perf_counter() - start) / len(batch)
            for i, text, n in zip(batch, texts, counts):
                f.write(json.dumps({"id": todo[i].id, "prediction": text, "new_tokens": n, "ms": ms}) + "\n")
            f.flush()
            if bar is not None:
                bar.update(len(batch) * world)
    if bar is not None:
        bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        merged = done_records(out)
        missing = [e.id for e in examples if e.id not in merged]
        if missing:
            raise DistillError(f"generation left {len(missing)} examples without output (first id {missing[0]})")
        write_atomic(out, "".join(json.dumps(merged[e.id]) + "\n" for e in examples))
        for p in parts.glob("*.jsonl"):
            p.unlink()
        parts.rmdir()
    if dist.is_initialized():
        dist.barrier()
    merged = read_records(out)
    return [merged[e.id] for e in examples]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_ranks() -> None:
    """Join the launcher's process group when there is one (deepspeed, torchrun); a lone process has none."""
    if rank_env().world > 1 and not dist.is_initialized():
        join_process_group()
