"""Telling a local path from a hub id, by one rule for models and data alike."""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from urllib.parse import urlparse


def is_local_path(path: str) -> bool:
    """Whether ``path`` means a file or directory on this machine rather than a hub id: it exists, starts
    with '.', '/' or '~', or has more than one '/' (a hub id is "name" or "owner/name")."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's endpoint answers a connection at all. Asked once per process before
    a name that is not on this machine goes to the hub, whose client retries an unreachable host five
    times over half a minute."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


# The settings that name something that must exist before a run starts (output_dir is made by the run).
INPUT_PATHS = ("student.path", "student.ds_config", "teacher.path", "teacher.ds_config", "teacher.cache", "data.path")


def missing_inputs(flat: dict) -> list[str]:
    """One message per input setting of a flat run config that names a local path that is not there (hub
    ids are left to the loaders)."""
    return [f"{key} not found: {value}" for key in INPUT_PATHS
            if isinstance(value := flat.get(key), str) and value and is_local_path(value)
            and not Path(value).expanduser().exists()]
