"""Atomic checkpoint and metrics files: a crash during a write never destroys the last good one.

Checkpoints are read with ``torch.load(weights_only=True)`` only, so a checkpoint can never
run code (docs/trust.md): tensors and plain data, numpy arrays as tagged tensors.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from device_runner.files import atomic_write, atomic_write_json, atomic_write_text

CHECKPOINT_FORMAT = "spfde-checkpoint"
# 2: prune-and-grow draws from a saved numpy generator
# 3: numpy arrays stored as tagged tensors, so the file loads with torch.load(weights_only=True)
CHECKPOINT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1 still exports; resuming it is refused by the trainer
CHECKPOINT_NAME = "checkpoint.pt"
NUMPY_TAG = "__numpy__"  # {NUMPY_TAG: tensor} stands for a numpy array (or scalar, 0-d)
RESAVE = ("loading it would need full unpickling, which can run code, so it is refused; if it is "
          "your own checkpoint, re-save it with the trusted spfde-edge that wrote it, or start a new run")

# Formats 1 and 2 pickled the sieve's numpy arrays. The restricted (weights_only) unpickler may
# rebuild plain numeric numpy arrays and scalars, nothing else: no object arrays, no callables.
_NUMERIC = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
            np.uint64, np.float16, np.float32, np.float64)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, of another format or of another model."""


def _legacy_numpy_globals() -> list:
    from numpy._core import multiarray  # numpy >= 2; files from numpy 1 name numpy.core
    allowed = [np.ndarray, np.dtype] + [type(np.dtype(kind)) for kind in _NUMERIC]
    for name in ("_reconstruct", "scalar"):
        function = getattr(multiarray, name)
        allowed += [function, (function, f"numpy.core.multiarray.{name}")]
    return allowed


def encode_numpy(value):
    """``value`` with every numpy array or scalar replaced by ``{NUMPY_TAG: tensor}``, so that
    ``torch.load(weights_only=True)`` can read it back (it refuses numpy objects)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return {NUMPY_TAG: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, dict):
        return {k: encode_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encode_numpy(v) for v in value)
    return value


def decode_numpy(value):
    """The inverse of :func:`encode_numpy`: tagged tensors back to numpy arrays and scalars."""
    if isinstance(value, dict):
        if set(value) == {NUMPY_TAG} and isinstance(value[NUMPY_TAG], torch.Tensor):
            array = value[NUMPY_TAG].numpy()
            return array[()] if array.ndim == 0 else array
        return {k: decode_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode_numpy(v) for v in value)
    return value


def save_checkpoint(path: Path, state: dict) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **encode_numpy(state)}
    atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def _load_safely(path: Path):
    """``torch.load`` with the restricted unpickler only: tensors and plain data (format 3),
    plus numeric numpy arrays for formats 1 and 2. Never executes code from the file."""
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(_legacy_numpy_globals()):
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \d+"
                              r"|Can only build [^\n]*", str(exc))
            with open(path, "rb") as handle:
                head = handle.read(2)
            if found is None or head not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
                # neither torch.save's zip nor a pickle: damaged or another kind of file
                raise CheckpointError(f"{path} is not a readable checkpoint (damaged, or not written by "
                                      "spfde_edge.train); restore it from a backup or start a new run") from None
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain data "
                                  f"({found.group(0)}); {RESAVE}") from None


def load_checkpoint(path: Path) -> dict:
    """Load and check a checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a run folder written by spfde_edge.train")
    try:
        state = _load_safely(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                              "restore it from a backup or start a new run") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an spfde-edge checkpoint")
    if state.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format_version')}, "
                              f"this spfde-edge reads {', '.join(map(str, READABLE_VERSIONS))}")
    return decode_numpy(state)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSON-lines file atomically from the full history (one line per record)."""
    atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in records))


def write_json(path: Path, data: dict) -> None:
    atomic_write_json(Path(path), data)
