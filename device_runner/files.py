"""Crash-safe file writes and file hashing, shared by the host trainer, the exporter and the device.

One rule for every file a run or an export writes: write a temporary file beside the
target (a unique name, so two writers never share it), flush and fsync it, rename it over
the target, then fsync the folder so the rename itself survives a power cut. A failed
write removes its temporary file, so nothing half-written or stale is left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644  # mkstemp creates 0600; run files, caches and bundles are not secret


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; some filesystems refuse directory fsync."""
    try:
        fsync_file(path)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(binary file object)`` so that it is either the old
    file or the complete new one, whatever happens during the write."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries a killed writer left in ``folder`` and its direct sub-folders:
    ``.NAME.*.tmp`` files of :func:`atomic_write` and ``.ckpt-*.tmp`` checkpoint folders.

    ``kill -9`` skips the cleanup in :func:`atomic_write`, so a run removes them when it
    starts or resumes; call it only while holding the run's lock (run_lock.py), so no live
    writer's temporary is taken away. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for parent in [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())]:
        for entry in parent.glob(".*.tmp"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (bundle files reach hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
