"""Small file helpers shared by the results store, the teacher cache and the analysis files.

Every write is atomic (a temporary file in the same folder, fsync, ``os.replace``): a reader sees the old file or
the new one, never a partial one. A write that fails (a full disk, a read-only folder) removes its temporary file
and raises :class:`FileWriteError` naming the path and the cause, so nothing is left behind to fill the disk.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch


class FileWriteError(OSError):
    """A file could not be written; the message names the path, the cause and what to do."""


_ADVICE = {errno.ENOSPC: "free some disk space and rerun (nothing partial was left behind)",
           errno.EROFS: "the file system is read-only: point --results-dir (or $CKD_RESULTS_DIR) to a writable folder",
           errno.EACCES: "no permission: point --results-dir (or $CKD_RESULTS_DIR) to a writable folder",
           errno.EPERM: "not permitted (an immutable file or folder?): point --results-dir to a writable folder",
           errno.ENOTDIR: "a path component is a file, not a folder: point --results-dir to a folder"}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        advice = _ADVICE.get(exc.errno, "check the folder and rerun")
        raise FileWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; {advice}") from exc


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> str:
    """Save atomically; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): binds a record to the data it describes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
