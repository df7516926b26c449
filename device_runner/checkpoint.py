"""Atomic checkpoints of a run folder, safe against ``kill -9`` and power loss at any moment.

Layout::

    out/checkpoint.json           pointer to the newest complete checkpoint (replaced atomically)
    out/checkpoints/ckpt-000012/  suffix_state.npz (suffix parameters, masks, BN statistics;
                                  the same format for every backend),
                                  state.npz (sieve, momentum, frozen blocks, epoch order),
                                  state.json (progress, config, history, profiles, RNG)

    out/first-checkpoint.pending  written when a run starts, removed by its first checkpoint

A checkpoint is written into a temporary folder, every file fsynced, the folder renamed
into place, then the pointer replaced with a fsynced rename. A crash before the pointer
moves leaves the previous checkpoint in charge; older folders are removed afterwards.
A crash before the *first* pointer leaves the pending marker, which tells ``start`` that
the folder holds only an unfinished start it may clear (:func:`is_unfinished_start`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import RunError
from .files import atomic_write_text, fsync_dir, fsync_file, remove_stale_temporaries

STATE_VERSION = 3  # 2: suffix state as npz, readable by every backend; 3: MEST targets, epoch-start record
POINTER = "checkpoint.json"
PENDING = "first-checkpoint.pending"


def _serial(out: Path) -> int:
    pointer = out / POINTER
    if pointer.is_file():
        try:
            return int(json.loads(pointer.read_text())["serial"])
        except (ValueError, KeyError, json.JSONDecodeError):
            return 0
    return 0


SUFFIX_STATE = "suffix_state.npz"


def write(out: Path, meta: dict, arrays: dict[str, np.ndarray], save_suffix) -> Path:
    """Write a complete checkpoint and point at it; on any failure (a full disk) the previous
    checkpoint stays in charge and nothing half-written is left behind."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    serial = _serial(out) + 1
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", suffix=".tmp", dir=folder))
    try:
        save_suffix(tmp / SUFFIX_STATE)
        np.savez(tmp / "state.npz", **arrays)
        (tmp / "state.json").write_text(json.dumps(meta))
        for name in (SUFFIX_STATE, "state.npz", "state.json"):
            fsync_file(tmp / name)
        final = folder / f"ckpt-{serial:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder)
    atomic_write_text(out / POINTER, json.dumps({"serial": serial, "folder": str(final.relative_to(out)),
                                                  "epoch": meta["epoch"], "position": meta["position"]}))
    (out / PENDING).unlink(missing_ok=True)
    for old in folder.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def mark_pending(out: Path) -> None:
    """Mark ``out`` as a run whose first checkpoint is not written yet (see the module doc)."""
    # Only its existence counts, so a plain create: a kill leaves no file or an empty one.
    (Path(out) / PENDING).touch()
    fsync_dir(Path(out))


def is_unfinished_start(out: Path) -> bool:
    """True when ``out`` holds a run killed before its first checkpoint: nothing to resume."""
    return (Path(out) / PENDING).is_file() and not (Path(out) / POINTER).is_file()


def remove_stale(out: Path) -> list[Path]:
    """Temporaries of killed writes and checkpoint folders the pointer no longer names.
    Call only while holding the run's lock."""
    out = Path(out)
    removed = remove_stale_temporaries(out)
    folder = out / "checkpoints"
    if (out / POINTER).is_file() and folder.is_dir():
        try:
            current = out / json.loads((out / POINTER).read_text())["folder"]
        except (OSError, ValueError, KeyError):
            return removed  # read() reports the damaged pointer; keep everything for it
        for old in folder.iterdir():
            if old != current and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    return removed


def read(out: Path) -> tuple[dict, dict[str, np.ndarray], Path]:
    pointer = Path(out) / POINTER
    if is_unfinished_start(out):
        raise RunError(f"{out} holds a run stopped before its first checkpoint was complete, so nothing "
                       "was trained yet; start it again with the same --bundle/--profile/--data and "
                       f"--out {out} (it starts over in that folder)")
    if not pointer.is_file():
        raise RunError(f"{out} holds no device_runner checkpoint ({POINTER} missing); start a run "
                       "with --bundle/--profile/--data/--out instead of --resume")
    try:
        folder = Path(out) / json.loads(pointer.read_text())["folder"]
        meta = json.loads((folder / "state.json").read_text())
        with np.load(folder / "state.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        # Read every array once: a truncated or flipped file fails its zip CRC here, not in a backend.
        with np.load(folder / SUFFIX_STATE, allow_pickle=False) as data:
            for name in data.files:
                data[name]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise RunError(f"checkpoint of {out} is unreadable ({type(exc).__name__}: {exc}); the run "
                       "cannot be resumed; restore the run folder from a backup or start a new run") from None
    if meta.get("version") != STATE_VERSION:
        raise RunError(f"checkpoint of {out} has state version {meta.get('version')}, this "
                       f"device_runner reads {STATE_VERSION}; resume with the version that wrote it")
    return meta, arrays, folder / SUFFIX_STATE


def write_metrics(out: Path, history: list[dict], stages: list[dict]) -> None:
    """metrics.jsonl, rewritten from the checkpoint's history: one line per epoch, then stages."""
    lines = [json.dumps({"type": "epoch", **h}) for h in history]
    lines += [json.dumps({"type": "stage", **s}) for s in stages]
    atomic_write_text(Path(out) / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))
