"""Telling a local path from a hub id, by one rule for models and data alike."""

from __future__ import annotations

from pathlib import Path


def is_local_path(path: str) -> bool:
    """Whether ``path`` means a file or directory on this machine rather than a hub id: it exists, starts
    with '.', '/' or '~', or has more than one '/' (a hub id is "name" or "owner/name")."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()
