"""Files that are never found half-written: atomic replacement of a file or a directory, fsync, digests,
and one line that says why a write failed. The bottom layer: it imports nothing else of the package
but its errors."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from distill.errors import first_line


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Put the finished file ``tmp`` (written by anyone, a library included) in place of ``path``, durably:
    its data is fsynced before the rename, and the directory after it."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old or the new content, never a torn one, even
    after a power loss (file and directory are fsynced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:  # a full disk: no half-written temp file stays
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # fsync names no file: the error line will
            exc.filename = str(path)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_digest(path: Path, sync: bool = False) -> dict[str, Any]:
    """Size and sha256 of a file; with ``sync`` its data is fsynced too (it was just written)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one is removed only after the new one is complete."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A new empty directory next to ``final`` to write into: moved into its place (``replace_dir``) when
    the block ends, removed if it raises, so nothing half-written is ever found at ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_write_error(exc: BaseException, path: Path) -> str:
    """One line for a failed write. torch's C++ writer hides ENOSPC behind messages such as
    "basic_ios::clear", so a nearly full disk is named from the free space left."""
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)|code: (\d+)", str(exc))):  # safetensors' Rust I/O
        code = int(found.group(1) or found.group(2))
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}
    if code in reasons:
        return f"{reasons[code]} ({path})"
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    if free is not None and free < 16 << 20:
        return f"no space left on device ({free >> 10} KiB free at {path})"
    # DeepSpeed logs a failed makedirs and goes on; torch then says "Parent directory ... does not exist"
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    if folder is not None and folder.is_dir() and (not os.access(folder, os.W_OK) or not folder.stat().st_mode & 0o222):
        return f"permission denied: {folder} is not writable ({path})"
    return f"{first_line(exc)} ({path})"
