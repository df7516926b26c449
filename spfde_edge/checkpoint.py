"""Atomic checkpoint and metrics files: a crash during a write never destroys the last good one."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from device_runner.files import atomic_write, atomic_write_json, atomic_write_text

CHECKPOINT_FORMAT = "spfde-checkpoint"
CHECKPOINT_VERSION = 2  # 2: prune-and-grow draws from a saved numpy generator
READABLE_VERSIONS = (1, 2)  # 1 still exports; resuming it is refused by the trainer
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format or of another model."""


def save_checkpoint(path: Path, state: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    atomic_write(Path(path), lambda handle: torch.save(payload, handle))


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
    if state.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format_version')}, "
                              f"this spfde-edge reads {', '.join(map(str, READABLE_VERSIONS))}")
    return state


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically from the full history (one line per record)."""
    atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in records))


def write_json(path: Path, data: dict) -> None:
    atomic_write_json(Path(path), data)
