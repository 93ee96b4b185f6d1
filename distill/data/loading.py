"""Load a dataset split and check its columns and values before anything expensive runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from distill.config.settings import DataConfig
from distill.errors import DistillError, first_line
from distill.paths import is_local_path
from distill.runtime.environment import rank_env

# A .txt file is plain text, one row per line, in a column named "text" (pre-training corpora).
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
            raise DistillError(f"data.path {path}: unsupported file type (use json, jsonl, csv, parquet or txt)")
        # A single file is the "train" split; slices such as "train[-200:]" still work.
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split=split)
    if path.is_dir():
        return datasets.load_dataset(str(path), name=cfg.name, split=split)
    # A data file's suffix marks a path too: "data/x.jsonl" that is missing is not a hub dataset.
    if is_local_path(cfg.path) or path.suffix.lower() in _BUILDERS:
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
            if rank_env().rank == 0:  # every rank drops the same rows; one line says it
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
