"""Atomic checkpoint and metrics files: a crash during a write never destroys the last good one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "spfde-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format or of another model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` into ``path.tmp``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    atomic_write_bytes(Path(path), lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path) -> dict:
    """Load and check a checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a run folder written by spfde_edge.train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                              "restore it from a backup or start a new run") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an spfde-edge checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format_version')}, "
                              f"this spfde-edge reads {CHECKPOINT_VERSION}")
    return state


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically from the full history (one line per record)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write_bytes(Path(path), lambda handle: handle.write(text.encode()))


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write_bytes(Path(path), lambda handle: handle.write(text.encode()))
