"""Frozen-prefix feature cache: a frozen block's output for a given input never changes.

Features are stored per sample index for the current stage, in memory or in a
memory-mapped file on disk, within ``max_mb``. The device does not augment its data, so
the prefix output of a sample is fixed until the next stage change; then cached features
are carried forward through the newly frozen blocks (:meth:`FeatureCache.transform`).

Features are stored in ``dtype`` (``CACHE_DTYPES``) and always handed back as float32:

* ``float32``: exact.
* ``float16``: a plain cast, relative error at most 2^-11 (≈ 4.9e-4) of the value in the
  normal range (|x| ≥ 2^-14 ≈ 6.1e-5), absolute error at most 2^-25 below it; values beyond
  float16's largest finite value (65504) are clipped to ±65504, NaN stays NaN.
* ``int8``: symmetric, with one float32 scale per sample and channel (the first feature
  axis; per sample for 1-D features) stored beside the values: ``scale = max|x| / 127``
  over that channel, absolute error at most ``scale / 2``.

:func:`encode`/:func:`decode` and :func:`bytes_per_sample` are the pure rules; docs/device.md
gives the measured errors and the capacity each dtype buys.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE_DTYPES = ("float32", "float16", "int8")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def scale_groups(feature_shape: tuple[int, ...]) -> int:
    """Number of int8 scales per sample: one per channel, or one for 1-D features."""
    return int(feature_shape[0]) if len(feature_shape) > 1 else 1


def bytes_per_sample(feature_shape: tuple[int, ...], dtype: str) -> int:
    """Bytes one cached sample takes in ``dtype`` (int8 counts its float32 scales)."""
    values = int(np.prod(feature_shape))
    if dtype == "float32":
        return 4 * values
    if dtype == "float16":
        return 2 * values
    if dtype == "int8":
        return values + 4 * scale_groups(feature_shape)
    raise ValueError(f"cache dtype {dtype!r} is not one of {', '.join(CACHE_DTYPES)}")


def capacity_samples(feature_shape: tuple[int, ...], dtype: str, max_mb: float) -> int:
    """How many samples of ``feature_shape`` fit in ``max_mb`` when stored in ``dtype``."""
    return int(max_mb * 2**20 // bytes_per_sample(feature_shape, dtype))


def encode(features: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored values, int8 scales or None) for float32 ``features`` of shape (n, *feature_shape)."""
    features = np.asarray(features, dtype=np.float32)
    if dtype == "float32":
        return features, None
    if dtype == "float16":
        return np.clip(features, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), None
    n = features.shape[0]
    grouped = features.reshape(n, scale_groups(features.shape[1:]), -1)
    scales = np.abs(grouped).max(axis=2) / 127.0
    safe = np.where(scales > 0, scales, 1.0)  # an all-zero channel stores zeros
    values = np.clip(np.rint(grouped / safe[:, :, None]), -127, 127).astype(np.int8)
    return values.reshape(features.shape), scales.astype(np.float32)


def decode(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """float32 features back from :func:`encode`'s output."""
    if scales is None:
        return np.asarray(values, dtype=np.float32)
    n = values.shape[0]
    grouped = np.asarray(values).reshape(n, scales.shape[1], -1).astype(np.float32)
    return (grouped * np.asarray(scales)[:, :, None]).reshape(values.shape)


def round_trip(features: np.ndarray, dtype: str) -> np.ndarray:
    """``features`` at the cache's precision. The prefix chain rounds every output this way,
    cached or not, so a run computes the same numbers whether a sample came from the cache,
    was recomputed after a resume, or the cache was dropped (bit-exact for float16)."""
    return np.asarray(features, dtype=np.float32) if dtype == "float32" else decode(*encode(features, dtype))


class FeatureCache:
    _serial = 0

    def __init__(self, num_samples: int, feature_shape: tuple[int, ...], location: str,
                 max_mb: float, directory: Path | None = None, dtype: str = "float32"):
        self.feature_shape = tuple(feature_shape)
        self.num_samples = num_samples
        self.dtype = dtype
        self.bytes_per_sample = bytes_per_sample(self.feature_shape, dtype)
        self.location = location
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self._store = None
        self._scales = None
        self._paths: list[Path] = []
        self._have = np.zeros(num_samples, dtype=bool)
        need_mb = num_samples * self.bytes_per_sample / 2**20
        if location == "none" or need_mb > max_mb:
            self.location = "none" if location == "none" else (
                f"none ({need_mb:.0f} MB in {dtype} > max_mb {max_mb:g})")
            return
        shape = (num_samples, *self.feature_shape)
        scales_shape = (num_samples, scale_groups(self.feature_shape)) if dtype == "int8" else None
        if location == "memory":
            self._store = np.zeros(shape, dtype=dtype)
            if scales_shape:
                self._scales = np.zeros(scales_shape, dtype=np.float32)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            FeatureCache._serial += 1
            stem = f"features-{os.getpid()}-{FeatureCache._serial}"
            self._paths = [directory / f"{stem}.{dtype}.npy"]
            self._store = np.lib.format.open_memmap(self._paths[0], mode="w+", dtype=dtype, shape=shape)
            if scales_shape:
                self._paths.append(directory / f"{stem}.scales.npy")
                self._scales = np.lib.format.open_memmap(self._paths[1], mode="w+", dtype=np.float32,
                                                         shape=scales_shape)

    @property
    def enabled(self) -> bool:
        return self._store is not None

    @property
    def samples_cached(self) -> int:
        return int(self._have.sum())

    @property
    def size_mb(self) -> float:
        return self.samples_cached * self.bytes_per_sample / 2**20

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """Bool per index: cached?"""
        if not self.enabled:
            return np.zeros(len(indices), dtype=bool)
        return self._have[indices]

    def get(self, indices: np.ndarray) -> np.ndarray:
        """float32 features of cached ``indices`` (within the dtype's documented error)."""
        return decode(self._store[indices], None if self._scales is None else self._scales[indices])

    def put(self, indices: np.ndarray, features: np.ndarray) -> None:
        if self.enabled:
            values, scales = encode(features, self.dtype)
            self._store[indices] = values
            if scales is not None:
                self._scales[indices] = scales
            self._have[indices] = True

    def transform(self, fn, batch: int = 256, feature_shape: tuple[int, ...] | None = None) -> None:
        """Carry cached features through ``fn`` (newly frozen blocks) after a stage change."""
        if not self.enabled:
            return
        cached = np.flatnonzero(self._have)
        new_shape = tuple(feature_shape or self.feature_shape)
        if new_shape != self.feature_shape:
            old_store, old_scales, location, old_paths = self._store, self._scales, self.location, self._paths
            self.__init__(self.num_samples, new_shape, location, float("inf"), self.directory, self.dtype)
            for start in range(0, cached.size, batch):
                idx = cached[start:start + batch]
                self.put(idx, fn(decode(old_store[idx], None if old_scales is None else old_scales[idx])))
            del old_store, old_scales
            for path in old_paths:
                path.unlink(missing_ok=True)
        else:
            for start in range(0, cached.size, batch):
                idx = cached[start:start + batch]
                self.put(idx, fn(self.get(idx)))

    def drop(self) -> None:
        """Free the cache (memory pressure); later batches run the prefix again."""
        self._store = None
        self._scales = None
        self._have[:] = False
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths = []
        self.location = "dropped"
