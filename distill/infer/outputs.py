"""Generation outputs: a fingerprint of model, data and settings, and resumable JSONL parts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from distill.errors import DistillError
from distill.files import write_atomic
from distill.infer.inputs import Example, GenerateSettings
from distill.paths import is_local_path
from distill.runtime.process_group import on_rank0


def data_origin(path: str, split: str, source_column: str, target_column: Optional[str],
                name: Optional[str]) -> dict:
    """Where examples came from, as the fingerprint of an output records it."""
    where = str(Path(path).expanduser().resolve()) if is_local_path(path) else path
    return {"path": where, "split": split, "source_column": source_column, "target_column": target_column,
            "name": name}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def model_fingerprint(location: str) -> dict:
    """A hub id as given; a directory by its absolute path, its config and every file's name, size and
    modification time (hashing the weights themselves would take minutes for a large model)."""
    if not is_local_path(location):
        return {"path": location}
    path = Path(location).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "config": _digest((path / "config.json").read_text()),
            "files": _digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])}


def fingerprint(location: str, settings: GenerateSettings, examples: list[Example], data: dict) -> dict:
    """What the records of an output depend on, known before any weights load: the model's files (its
    generation config among them), the examples (``data``: ``data_origin``) and the settings, with
    ``settings.dtype`` resolved. Batch size, world size, ZeRO-3 partitioning, --compile and --static-cache
    are left out: they change speed and padding, not the text, and a rerun with a smaller batch after an
    out-of-memory must be able to continue."""
    return json.loads(json.dumps({  # as read back from JSON, so that it compares equal to a stored one
        "model": model_fingerprint(location),
        "data": {**data, "examples": _digest([[e.id, e.source, e.target] for e in examples])},
        "settings": {"generation": {k: v for k, v in settings.generation.items() if v is not None},
                     "max_source_length": settings.max_source_length, "source_prefix": settings.source_prefix,
                     "dtype": settings.dtype, "chat_template": settings.chat_template},
    }))


def _fingerprint_file(out: Path) -> Path:
    return out.with_name(out.name + ".fingerprint.json")


def _flat(node: Any, key: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {key: node}
    return {k: v for name, child in node.items() for k, v in _flat(child, f"{key}.{name}" if key else name).items()}


_WRITTEN = {"model": "by another model", "data": "for other data", "settings": "with other settings"}


def claim_output(out: Path, written_by: dict, fresh: bool = False) -> None:
    """Make ``out`` this run's, before any weights load: ``fresh`` drops what an earlier run wrote there;
    records of another model, data or settings are refused; else ``written_by`` (``fingerprint``) goes
    beside ``out``, before the first record. Every rank calls it: rank 0 decides, and its refusal stops
    every rank, so that none waits in a collective for one that stopped."""
    on_rank0(_claim, Path(out), written_by, fresh)


def _claim(out: Path, written_by: dict, fresh: bool) -> None:
    record, parts = _fingerprint_file(out), parts_dir(out)
    if fresh:
        out.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
        record.unlink(missing_ok=True)
    if out.is_file() or any(parts.glob("*.jsonl")):
        advice = "pass --fresh to start over, or another --out"
        if not record.is_file():
            raise DistillError(f"{out} was written by an older distill that did not record its model, data and "
                               f"settings: {advice}")
        old, new = _flat(json.loads(record.read_text())), _flat(written_by)
        key = next((k for k in new if old.get(k) != new[k]), None) or next((k for k in old if k not in new), None)
        if key is not None:
            raise DistillError(f"{out} was written {_WRITTEN[key.split('.')[0]]} ({key}: {old.get(key)!r} there, "
                               f"{new.get(key)!r} now): {advice}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(written_by, indent=2) + "\n")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_records(path: Path) -> dict[int, dict]:
    """Complete records of a JSONL file; a line cut by a kill at write time is ignored."""
    records: dict[int, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[int(record["id"])] = record
    return records


def done_records(out: Path) -> dict[int, dict]:
    """Every record already written for ``out``: the merged file and all part files."""
    records = read_records(out)
    parts = parts_dir(out)
    if parts.is_dir():
        for part in sorted(parts.glob("*.jsonl")):
            records.update(read_records(part))
    return records
