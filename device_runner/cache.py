"""Frozen-prefix feature cache: a frozen block's output for a given input never changes.

Features are stored per sample index for the current stage, in memory or in a
memory-mapped file on disk, within ``max_mb``. The device does not augment its data, so
the prefix output of a sample is fixed until the next stage change; then cached features
are carried forward through the newly frozen blocks (:meth:`FeatureCache.transform`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class FeatureCache:
    _serial = 0

    def __init__(self, num_samples: int, feature_shape: tuple[int, ...], location: str,
                 max_mb: float, directory: Path | None = None):
        self.feature_shape = tuple(feature_shape)
        self.num_samples = num_samples
        self.bytes_per_sample = 4 * int(np.prod(self.feature_shape))
        self.location = location
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self._store = None
        self._have = np.zeros(num_samples, dtype=bool)
        need_mb = num_samples * self.bytes_per_sample / 2**20
        if location == "none" or need_mb > max_mb:
            self.location = "none" if location == "none" else f"none ({need_mb:.0f} MB > max_mb {max_mb:g})"
            return
        shape = (num_samples, *self.feature_shape)
        if location == "memory":
            self._store = np.zeros(shape, dtype=np.float32)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            FeatureCache._serial += 1
            self._path = directory / f"features-{os.getpid()}-{FeatureCache._serial}.f32"
            self._store = np.lib.format.open_memmap(self._path, mode="w+", dtype=np.float32, shape=shape)

    @property
    def enabled(self) -> bool:
        return self._store is not None

    @property
    def size_mb(self) -> float:
        return int(self._have.sum()) * self.bytes_per_sample / 2**20

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """Bool per index: cached?"""
        if not self.enabled:
            return np.zeros(len(indices), dtype=bool)
        return self._have[indices]

    def get(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._store[indices])

    def put(self, indices: np.ndarray, features: np.ndarray) -> None:
        if self.enabled:
            self._store[indices] = features
            self._have[indices] = True

    def transform(self, fn, batch: int = 256, feature_shape: tuple[int, ...] | None = None) -> None:
        """Carry cached features through ``fn`` (newly frozen blocks) after a stage change."""
        if not self.enabled:
            return
        cached = np.flatnonzero(self._have)
        new_shape = tuple(feature_shape or self.feature_shape)
        if new_shape != self.feature_shape:
            old, location, old_path = self._store, self.location, getattr(self, "_path", None)
            self.__init__(self.num_samples, new_shape, location, float("inf"), self.directory)
            for start in range(0, cached.size, batch):
                idx = cached[start:start + batch]
                self.put(idx, fn(np.asarray(old[idx])))
            del old
            if old_path is not None and old_path.exists():
                old_path.unlink()
        else:
            for start in range(0, cached.size, batch):
                idx = cached[start:start + batch]
                self._store[idx] = fn(np.asarray(self._store[idx]))

    def drop(self) -> None:
        """Free the cache (memory pressure); later batches run the prefix again."""
        path = getattr(self, "_path", None)
        self._store = None
        self._have[:] = False
        if path is not None and path.exists():
            path.unlink()
        self.location = "dropped"
