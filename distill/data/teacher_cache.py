"""The teacher cache on disk: the teacher's top-K logits of every target position of a split, written once
by ``distill cache-teacher`` and read by every training run (``teacher.cache``) instead of a live teacher.

Layout of a cache directory::

    fingerprint.json             what the cache depends on (``cache_fingerprint``); written first
    shards/shard-00000.safetensors   examples [s·S, (s+1)·S) of the split, S = shard_examples:
                                     offsets (n+1,) int64, ids (rows, K) uint16/int32, logits (rows, K)
                                     fp16/bf16, lse and log_tail (rows,) fp32, the rows of each example
                                     in its order
    shards/shard-00000.json      the shard's digest and counts, written after the shard: a shard without
                                 it is not done (a kill mid-write leaves only a temporary file)
    cache.json                   the index (every shard, its size and digest), written last: a cache
                                 without it is incomplete and is refused

Rows are keyed by example id (the example's index in the split as training loads it), so packing,
shuffling, any number of ranks and exact resume read the same rows. ``lse`` is the log-sum-exp of the
position's full logits at temperature 1 and ``log_tail`` the log of the mass outside the top K, from the
unrounded logits, so the kept and the tail mass are exact there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from distill.config.settings import DataConfig, RunConfig
from distill.data.objectives import IDS
from distill.errors import DistillError
from distill.files import file_digest, publish, write_atomic
from distill.paths import is_local_path

FORMAT = 1
INDEX, FINGERPRINT, SHARDS = "cache.json", "fingerprint.json", "shards"
ID_KEY = "__example_id__"  # added to each row by ``with_example_ids``
# the batch keys a cached teacher adds (``CachedTeacherCollator``), and the stored tensor and ``TopK``
# field each holds
TEACHER_KEYS = {"teacher_ids": "ids", "teacher_logits": "logits", "teacher_lse": "lse", "teacher_log_tail": "log_tail"}
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# the data settings a cache depends on (packing is not one: the cache is per example)
DATA_KEYS = ("path", "name", "source_column", "target_column", "source_prefix", "max_source_length",
             "max_target_length", "truncation", "max_train_samples", "chat_template", "loss_on_prompt",
             "skip_invalid", "objective", "block_length", "mask_rate", "mean_span_length", "whole_word_masking")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_digest(dataset, columns: list[str]) -> str:
    """A digest of the text of ``columns`` of every row, in order: the examples themselves, wherever
    the files live."""
    h = hashlib.sha256()
    for start in range(0, len(dataset), 10_000):
        batch = dataset[start:start + 10_000]
        for column in columns:
            for text in batch[column]:  # text, or a block's token ids
                h.update((text if isinstance(text, str) else json.dumps(text)).encode())
                h.update(b"\0")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer, decoder_start_token_id: Optional[int]) -> dict:
    return {"vocab": _digest(sorted(tokenizer.get_vocab().items())),
            "special_tokens": _digest(tokenizer.special_tokens_map),
            "chat_template": _digest(getattr(tokenizer, "chat_template", None)),
            "decoder_start_token_id": decoder_start_token_id}


def data_fingerprint(cfg: DataConfig, split: str, dataset, seed: int) -> dict:
    """The data a cache was made from: the settings, and the text of every example (a text objective's
    blocks: their token ids, and ``seed``, which draws their masks)."""
    values = {key: getattr(cfg, key) for key in DATA_KEYS}
    if is_local_path(cfg.path):
        values["path"] = str(Path(cfg.path).expanduser().resolve())
    if cfg.objective is not None:
        values["seed"] = seed
    columns = [IDS] if cfg.objective is not None else [c for c in (cfg.source_column, cfg.target_column) if c is not None]
    return {**values, "split": split, "examples": len(dataset), "text": split_digest(dataset, columns)}


def teacher_fingerprint(location: str, revision: Optional[str], config) -> dict:
    """The teacher by its config and its weights' names and shapes (from a model built on the meta
    device: cheap at any size), with where it came from."""
    from distill.models.loading import model_class

    cls = model_class(config)
    if cls is None:
        raise DistillError(f"no language-model class for the teacher's config ({type(config).__name__})")
    with torch.device("meta"):
        model = cls(config)
    shapes = [(name, list(p.shape)) for name, p in model.state_dict().items()]
    where = str(Path(location).resolve()) if is_local_path(location) else location
    return {"path": where, "revision": revision, "config": _digest(config.to_diff_dict()), "weights": _digest(shapes)}


def cache_fingerprint(data: dict, tokenizer: dict, teacher: dict, top_k: int, vocab: int, logit_dtype: str,
                      compute_dtype: str, shard_examples: int) -> dict:
    """Everything a cache's content depends on; ``shard_examples`` too, so that a rerun that continues a
    killed job cannot mix shards of two sizes."""
    return json.loads(json.dumps({"data": data, "tokenizer": tokenizer, "teacher": teacher, "top_k": top_k,
                                  "vocab": vocab, "logit_dtype": logit_dtype, "compute_dtype": compute_dtype,
                                  "shard_examples": shard_examples}))


def _flat(node: Any, key: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {key: node}
    return {k: v for name, child in node.items() for k, v in _flat(child, f"{key}.{name}" if key else name).items()}


def first_difference(stored: dict, current: dict) -> Optional[str]:
    """``key: X there, Y here`` for the first entry of ``current`` that ``stored`` does not hold the same, or
    None."""
    old, new = _flat(stored), _flat(current)
    key = next((k for k in new if old.get(k) != new[k]), None)
    return None if key is None else f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"


# ---- writing ------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def done_shards(out: Path) -> set[int]:
    """Shards whose record is written (their data file was complete before it)."""
    return {int(p.stem.split("-")[1]) for p in (out / SHARDS).glob("shard-*.json")}


def write_shard(out: Path, index: int, first: int, rows: list[dict[str, torch.Tensor]]) -> None:
    """Examples ``first``.. of shard ``index``, each a dict of ids, logits and lse: the data file, then
    its record, each written to a temporary name, flushed to disk and renamed."""
    from safetensors.torch import save_file

    counts = torch.tensor([0] + [r["lse"].shape[0] for r in rows], dtype=torch.int64)
    tensors = {"offsets": counts.cumsum(0), **{k: torch.cat([r[k] for r in rows]).contiguous()
                                                for k in TEACHER_KEYS.values()}}
    directory = out / SHARDS
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / f"{shard_name(index)}.safetensors", directory / f".{shard_name(index)}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"first": str(first)})
    publish(tmp, path)
    record = {"file": path.name, "first": first, "count": len(rows), "rows": int(counts.sum()),
              "bytes": path.stat().st_size, "sha256": file_digest(path)["sha256"]}
    write_atomic(directory / f"{shard_name(index)}.json", json.dumps(record) + "\n")


def write_index(out: Path, fingerprint: dict, examples: int, shard_examples: int) -> dict:
    """The index over every shard's record, written last (rank 0, after every shard is done)."""
    shards = [json.loads((out / SHARDS / f"{shard_name(i)}.json").read_text())
              for i in range(-(-examples // shard_examples))]
    rows = sum(s["rows"] for s in shards)
    index = {"format": FORMAT, "fingerprint": fingerprint, "examples": examples, "shard_examples": shard_examples,
             "target_rows": rows, "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    write_atomic(out / INDEX, json.dumps(index, indent=1) + "\n")
    return index


def reopen_damaged(out: Path) -> list[str]:
    """The shards of a complete cache that no longer match the index (size or digest): their records and
    the index go, so that the next pass computes them again. Returns their file names."""
    index = json.loads((out / INDEX).read_text())
    damaged = []
    for i, shard in enumerate(index["shards"]):
        path = out / SHARDS / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or file_digest(path)["sha256"] != shard["sha256"]:
            damaged.append(shard["file"])
            (out / SHARDS / f"{shard_name(i)}.json").unlink(missing_ok=True)
    if damaged:
        (out / INDEX).unlink()
    return damaged


# ---- reading ------------------------------------------------------------------------------------


class TeacherCache:
    """A complete cache, opened for reading: its index is checked at once (every shard present at its
    recorded size), each shard's digest the first time a row of it is read."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        index = self.dir / INDEX
        if not index.is_file():
            what = "an incomplete teacher cache (no cache.json): finish it by rerunning distill cache-teacher" \
                if (self.dir / FINGERPRINT).is_file() else "not a teacher cache (no cache.json)"
            raise DistillError(f"teacher.cache {directory}: {what}")
        try:
            self.index = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise DistillError(f"teacher.cache {directory}: cache.json is damaged ({exc})") from None
        if self.index.get("format") != FORMAT:
            raise DistillError(f"teacher.cache {directory}: format {self.index.get('format')!r}, this distill reads "
                               f"{FORMAT}")
        for shard in self.index["shards"]:
            path = self.dir / SHARDS / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes, {shard['bytes']} recorded"
                raise DistillError(f"teacher.cache {directory}: shard {shard['file']} is {found}; rebuild the "
                                   "cache with distill cache-teacher --fresh")
        fp = self.fingerprint
        self.top_k, self.vocab, self.examples = fp["top_k"], fp["vocab"], self.index["examples"]
        self.shard_examples = self.index["shard_examples"]
        self._open: dict[int, Any] = {}

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def check_run(self, cfg: RunConfig, train_data, tokenizer, student_config, teacher_config=None) -> None:
        """Refuse a run whose data, tokenizer or live teacher differ from the cache's, naming the first
        difference; and a student whose vocabulary is smaller than the cache's."""
        encoder_decoder = student_config.is_encoder_decoder
        current = {"data": data_fingerprint(cfg.data, cfg.data.train_split, train_data, cfg.training.seed),
                   "tokenizer": tokenizer_fingerprint(tokenizer, student_config.decoder_start_token_id
                                                      if encoder_decoder else None)}
        if teacher_config is not None:  # the live teacher of the feature terms: the cache's own, wherever it is now
            found = teacher_fingerprint(cfg.teacher.path, cfg.teacher.revision, teacher_config)
            current["teacher"] = {key: found[key] for key in ("config", "weights")}
        diff = first_difference(self.fingerprint, current)
        if diff is not None:
            raise DistillError(f"teacher.cache {self.dir} was made for other {diff.split('.')[0]} settings ({diff}); "
                               "rebuild it with distill cache-teacher for this run's data and tokenizer")
        if student_config.vocab_size < self.vocab:
            raise DistillError(f"the student's vocab_size ({student_config.vocab_size}) is smaller than teacher.cache's "
                               f"vocabulary ({self.vocab} tokens)")

    def _shard(self, index: int):
        if index not in self._open:
            from safetensors import safe_open

            record = self.index["shards"][index]
            path = self.dir / SHARDS / record["file"]
            if file_digest(path)["sha256"] != record["sha256"]:
                raise DistillError(f"teacher.cache {self.dir}: shard {record['file']} does not match its recorded "
                                   "digest (changed after it was written); rebuild the cache with distill cache-teacher "
                                   "--fresh")
            handle = safe_open(str(path), framework="pt")
            self._open[index] = (handle, handle.get_tensor("offsets"))
        return self._open[index]

    def rows(self, example_id: int) -> dict[str, torch.Tensor]:
        """The cached rows of one example: ids (rows, K) int64, logits (rows, K) as stored, lse and log_tail
        (rows,)."""
        if not 0 <= example_id < self.examples:
            raise DistillError(f"teacher.cache {self.dir} holds examples 0..{self.examples - 1}, not {example_id}")
        handle, offsets = self._shard(example_id // self.shard_examples)
        i = example_id % self.shard_examples
        a, b = int(offsets[i]), int(offsets[i + 1])
        rows = {part: handle.get_slice(part)[a:b] for part in TEACHER_KEYS.values()}
        rows["ids"] = rows["ids"].to(torch.int64)  # stored as uint16 when the vocabulary allows
        return rows


class _WithIds(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], ID_KEY: i}


def with_example_ids(dataset) -> _WithIds:
    """Each row with its example id (its index), for ``CachedTeacherCollator``."""
    return _WithIds(dataset)


@dataclasses.dataclass
class CachedTeacherCollator:
    """A collator's batch plus the cached teacher rows of its targets (``TEACHER_KEYS``), in the order of
    ``target_index``: the collators lay examples out in row order (packed rows too), each example's
    targets in its own order, which is the order the cache stores them in."""

    collate: Any
    cache: TeacherCache

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        ids = [int(r[ID_KEY]) for r in rows]
        cached = [self.cache.rows(i) for i in ids]
        n = sum(c["lse"].shape[0] for c in cached)
        if n != batch["target_index"].numel():
            raise DistillError(f"teacher.cache {self.cache.dir} holds {n} target rows for examples {ids}, and this "
                               f"run's collator makes {batch['target_index'].numel()}: the cache is stale; rebuild it "
                               "with distill cache-teacher for this run's data settings")
        return {**batch, **{key: torch.cat([c[part] for c in cached]) for key, part in TEACHER_KEYS.items()}}
