"""The bundle's one weight file, ``weights.safetensors`` (bundle format v2).

Every model tensor is stored once, so the bundle is as small as the sparse model it carries:

* a masked weight ``N`` is stored as ``N.values`` (float32, 1-D: its active entries in C
  order of the flattened weight) and ``N.mask`` (uint8: ``np.packbits(mask.ravel(),
  bitorder="little")``); its shape is in the metadata. At 90 % sparsity that is about
  0.1 * 4 + 1/8 bytes a weight instead of 4.
* every other tensor (dense weights, biases, BatchNorm parameters and running statistics)
  is stored as ``N`` itself, float32.

Metadata: ``{"format": "spfde-weights", "format_version": "1", "shapes": json({N: shape})}``,
``shapes`` naming exactly the masked weights. Torch-free: the device reads it with numpy and
``safetensors.numpy`` only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _serialize

from device_runner.errors import BundleError
from device_runner.files import atomic_write_bytes

STORE_FILE = "weights.safetensors"
FORMAT = "spfde-weights"
FORMAT_VERSION = "1"
VALUES_SUFFIX = ".values"
MASK_SUFFIX = ".mask"

_REEXPORT = "re-export the bundle"
_RECOPY = "copy the bundle again"


class WeightStoreError(BundleError):
    """``weights.safetensors`` is missing, damaged or not what this runner can read."""


def _bool_mask(name: str, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A mask as a flat bool array; refuses anything but 0/1 entries of the weight's shape,
    since a mask value of 2 or a transposed mask would silently keep the wrong weights."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask of {name!r} has shape {list(mask.shape)}, its weight {list(shape)}")
    if mask.dtype == np.bool_:
        return mask.ravel()
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask of {name!r} is {mask.dtype}; masks are uint8 or bool")
    flat = mask.ravel()
    active = flat == 1
    if not np.array_equal(active, flat != 0):
        raise ValueError(f"mask of {name!r} has entries other than 0 and 1")
    return active


def write_weights(path, tensors: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> int:
    """Write every tensor once to ``path`` (crash-safe: the old file or the complete new one).

    ``tensors`` holds every model tensor, dense float32; ``masks`` the masks of the masked
    weights (1 = active). A masked weight must be exactly zero where its mask is 0: the store
    keeps only the active values, so anything else would change the model on the way to the
    device. Returns the number of bytes written.
    """
    unknown = sorted(set(masks) - set(tensors))
    if unknown:
        raise ValueError(f"masks for tensors that are not in the model: {unknown}")
    stored: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}

    def put(key: str, array: np.ndarray) -> None:
        if key in stored:
            raise ValueError(f"two tensors would be stored as {key!r}; rename one of them")
        stored[key] = array

    for name, tensor in tensors.items():
        tensor = np.asarray(tensor)
        if tensor.dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {tensor.dtype}; the weight store holds float32 only")
        if name not in masks:
            put(name, np.ascontiguousarray(tensor))
            continue
        active = _bool_mask(name, masks[name], tensor.shape)
        flat = tensor.ravel()
        if np.any(flat[~active]):
            raise ValueError(f"masked weight {name!r} is non-zero where its mask is 0; "
                             "apply the mask before writing")
        put(name + VALUES_SUFFIX, np.ascontiguousarray(flat[active]))
        put(name + MASK_SUFFIX, np.packbits(active, bitorder="little"))
        shapes[name] = [int(d) for d in tensor.shape]
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "shapes": json.dumps(shapes)}
    data = _serialize(stored, metadata=metadata)
    atomic_write_bytes(Path(path), data)
    return len(data)


def _fail(path: Path, problem: str, fix: str) -> WeightStoreError:
    return WeightStoreError(f"{path}: {problem}; {fix}")


class _Store:
    """An opened store whose header and metadata have been checked; tensors are read on demand."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise _fail(self.path, "the weight store is missing", _RECOPY)
        try:
            self._handle = safe_open(str(self.path), framework="numpy")
            metadata = self._handle.metadata() or {}
            self.keys = set(self._handle.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise _fail(self.path, f"not a readable safetensors file ({error})", _RECOPY) from None
        if metadata.get("format") != FORMAT:
            raise _fail(self.path, f"format is {metadata.get('format')!r}, expected {FORMAT!r}", _REEXPORT)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise _fail(self.path, f"format_version {metadata.get('format_version')!r} is not "
                        f"{FORMAT_VERSION!r}, the one this runner reads", _REEXPORT)
        try:
            shapes = json.loads(metadata.get("shapes", ""))
            if not isinstance(shapes, dict):
                raise ValueError
            self.shapes = {name: tuple(_dim(d) for d in shape) for name, shape in shapes.items()}
        except (ValueError, TypeError):
            raise _fail(self.path, "the metadata's 'shapes' is not a JSON object of shape lists",
                        _REEXPORT) from None
        for name in self.shapes:
            for key in (name + VALUES_SUFFIX, name + MASK_SUFFIX):
                if key not in self.keys:
                    raise _fail(self.path, f"masked weight {name!r} has no {key!r}", _REEXPORT)
        packed = {n + s for n in self.shapes for s in (VALUES_SUFFIX, MASK_SUFFIX)}
        # A values/mask pair that lost its shape entry falls here and fails the float32 check.
        self.dense = sorted(self.keys - packed)

    def __enter__(self) -> "_Store":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)

    def get(self, key: str, dtype) -> np.ndarray:
        try:
            array = self._handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise _fail(self.path, f"cannot read tensor {key!r} ({error})", _RECOPY) from None
        if array.dtype != dtype:
            raise _fail(self.path, f"tensor {key!r} is {array.dtype}, expected {np.dtype(dtype)}", _REEXPORT)
        return array

    def nbytes(self, key: str) -> int:
        view = self._handle.get_slice(key)
        return int(np.prod(view.get_shape(), dtype=np.int64)) * _ITEMSIZE.get(view.get_dtype(), 1)


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _dim(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError
    return value


def read_weights(path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read a store back as (dense float32 tensors, uint8 masks of the weights' shapes).

    Masked weights come back densified (zeros where the mask is 0), so the caller sees the
    same dict it wrote. Any inconsistency raises :class:`WeightStoreError` (a BundleError)
    rather than training a silently different model.
    """
    with _Store(path) as store:
        return _read(store)


def _read(store: _Store) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    tensors = {key: store.get(key, np.float32) for key in store.dense}
    masks: dict[str, np.ndarray] = {}
    for name, shape in store.shapes.items():
        numel = int(np.prod(shape, dtype=np.int64))
        values = store.get(name + VALUES_SUFFIX, np.float32)
        packed = store.get(name + MASK_SUFFIX, np.uint8)
        if values.ndim != 1 or packed.ndim != 1:
            raise _fail(store.path, f"{name!r}: values and mask must be 1-D", _REEXPORT)
        if packed.size != (numel + 7) // 8:
            raise _fail(store.path, f"mask of {name!r} has {packed.size} bytes, its shape "
                        f"{list(shape)} needs {(numel + 7) // 8}", _REEXPORT)
        if numel % 8 and packed[-1] >> (numel % 8):
            raise _fail(store.path, f"mask of {name!r} has bits set past its {numel} entries", _REEXPORT)
        active = np.unpackbits(packed, count=numel, bitorder="little").view(np.bool_)
        count = int(np.count_nonzero(active))
        if values.size != count:
            raise _fail(store.path, f"{name!r} has {values.size} values but its mask has {count} "
                        "active entries", _REEXPORT)
        dense = np.zeros(numel, dtype=np.float32)
        dense[active] = values
        tensors[name] = dense.reshape(shape)
        masks[name] = active.view(np.uint8).reshape(shape)
    return tensors, masks


def store_bytes_per_tensor(path) -> dict[str, int]:
    """Bytes each model tensor takes in the store (values + packed mask for a masked weight),
    without reading the data: what the size budget and ``--inspect`` account per tensor."""
    with _Store(path) as store:
        sizes = {key: store.nbytes(key) for key in store.dense}
        for name in store.shapes:
            sizes[name] = store.nbytes(name + VALUES_SUFFIX) + store.nbytes(name + MASK_SUFFIX)
    return sizes
