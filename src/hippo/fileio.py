"""Atomic file writes: a result is written under a temporary name and renamed into place, so a
crash never leaves a half-written file (or folder) that looks complete."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    ``mode``: the file's permissions (e.g. ``0o600`` for secrets: the temporary file is created
    owner-only, so the data is never readable by others, not even briefly); default: as a new file
    under the process umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike, *, trash_prefix: str = ".trash-") -> Path:
    """Put the finished directory ``src`` at ``dst`` by renames, replacing what was there.

    An existing ``dst`` is first renamed aside (``<trash_prefix><name>-<random>`` in the same
    parent, so a crash leaves either the old or the new folder under the real name, and a hidden
    leftover a later run can delete), then ``src`` is renamed into place and the old one removed.
    ``src`` and ``dst`` must be on one file system (build ``src`` beside ``dst``).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if dst.exists() or dst.is_symlink():
        trash = dst.parent / f"{trash_prefix}{dst.name}-{uuid.uuid4().hex[:8]}"
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    return dst


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values via ``str``) atomically."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_plain(obj: Any) -> Any:
    """Plain, strict-JSON-able Python: mappings -> dicts with str keys, tuples/arrays -> lists,
    numpy scalars -> Python numbers, non-finite floats -> ``None``, paths and other objects -> str."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)
