"""The current stage's frozen side: prefix chain, feature cache, and each stage's suffix trainer.

At stage ``starts[position]`` blocks before ``k`` are frozen. They run as a chain: the
bundle's prefix of the first stage (ExecuTorch or ONNX Runtime, or nothing at stage 0),
then one ONNX Runtime *bridge* per later stage change with the device-trained weights of
the blocks that froze there. Their output for a sample never changes within a stage, so
it is cached per sample index (cache.py). Moving to the next stage carries the suffix's
weights, masks, BatchNorm statistics and momentum into the next stage's artifacts.

A format-2 bundle has one model state (model_state.py) and per-block programs instead:
the chain is :class:`~.backends.frozen_segment.FrozenSegment` s over the frozen blocks
(one per stage the run passed through, each rounded to the cache's precision like a
bridge; constant weights, in int8 where the profile's ``prefix_precision`` allows), and a
stage change only moves ``k``: the next trainer shares the state, so nothing is copied and
no graph is cut.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .backends import executorch_prefix
from .backends.block_chain import BlockSessions
from .backends.blocks import block_of
from .backends.frozen_segment import (
    CALIBRATION_SAMPLES,
    FrozenSegment,
    apply_recorded,
    choose_precision,
)
from .backends.ort_prefix import OrtBridge, OrtPrefix, PrefixChain
from .bundle import MASK_SUFFIX, Bundle
from .cache import FeatureCache, round_trip
from .data import DeviceData, normalize
from .errors import BundleError
from .model_state import ModelState
from .profile import Profile


def choose_base_prefix(first_stage, wanted: str, threads: int):
    """(the bundle prefix of the run's first stage or None, a sentence saying why)."""
    if first_stage.k == 0 or first_stage.prefix_onnx is None:
        return None, "none (stage 0 trains every block)"
    _, why = executorch_prefix.available()
    if wanted == "executorch":
        if first_stage.prefix_pte is None:
            raise BundleError("the profile asks for ExecuTorch but the bundle has no .pte prefix")
        return (executorch_prefix.ExecuTorchPrefix(first_stage.prefix_pte, first_stage.pte_batch_size or 1),
                f"executorch (profile prefix_backend: executorch; {why})")
    # auto: ExecuTorch's Python bindings need torch (see backends/executorch_prefix.py).
    return (OrtPrefix(first_stage.prefix_onnx, threads),
            f"onnxruntime (profile prefix_backend: {wanted}; ExecuTorch: {why})")


class StagePipeline:
    """Features for the suffix at stage ``starts[position]``, and the move to the next stage.

    ``frozen_params`` holds the device-trained weights of blocks frozen on the device; it
    is run state (the checkpoint's ``frozen/`` arrays) and feeds the bridges. In format 2
    its arrays are the model state's own (given ones are written into the state first).
    """

    def __init__(self, bundle: Bundle, profile: Profile, data: DeviceData, starts: list,
                 suffix_class: type, cache_dir: Path, position: int = 0,
                 frozen_params: dict[str, np.ndarray] | None = None, train_idx: np.ndarray | None = None,
                 heldout_idx: np.ndarray | None = None, precisions: list[dict] | None = None):
        self.bundle, self.profile, self.data = bundle, profile, data
        # The int8 prefix's calibration samples (fixed: a resumed run rebuilds the same model)
        # and the held-out samples its top-1 change is measured on.
        empty = np.zeros(0, np.int64)
        self.calibration_idx = np.sort(train_idx if train_idx is not None else empty)[:CALIBRATION_SAMPLES]
        self.heldout_idx = heldout_idx if heldout_idx is not None else empty
        self.starts = starts
        self.suffix_class = suffix_class
        self.cache_dir = cache_dir
        self.position = position
        self.frozen_params = {} if frozen_params is None else frozen_params
        self.state: ModelState | None = None        # format 2: the one copy of the model
        self.sessions: BlockSessions | None = None
        if bundle.format_version == 2:
            self.state = ModelState.load(bundle.weights_path)
            self.sessions = BlockSessions(profile.threads)
            for name, value in self.frozen_params.items():
                self.state.assign(name, value)
            self.frozen_params = {name: self.state.array(name) for name in self.frozen_params}
        self.prefix = self._build_prefix()
        self.precisions: list[dict] = []          # run state: one record per frozen segment
        if precisions is not None:                # a resumed run: as chosen before
            for position, segment in enumerate(self._segments()):
                record = precisions[position] if position < len(precisions) else {
                    "blocks": [segment.blocks[0].index, segment.blocks[-1].index], "precision": "float32",
                    "why": "the run started before int8 prefixes"}
                apply_recorded(segment, record, self._calibration_for(segment))
                self.precisions.append(record)
        self.cache = self._new_cache()

    @property
    def k(self) -> int:
        """First trainable block of the current stage."""
        return self.starts[self.position][0]

    def new_trainer(self, suffix_state: Path | None = None):
        """The current stage's suffix trainer, from the bundle or from a checkpoint's suffix state."""
        stage = self.bundle.stage(self.k)
        if self.state is not None:   # format 2: every trainer runs on the one model state
            return self.suffix_class(stage, self.bundle.blocks, self.state, self.sessions, suffix_state)
        if suffix_state is None:
            return self.suffix_class(stage, self.profile.threads)
        return self.suffix_class(stage, self.profile.threads, suffix_state)

    # --- building ---------------------------------------------------------------------------
    def _chain(self, k_from: int, k_to: int) -> FrozenSegment:
        return FrozenSegment(self.bundle.blocks[k_from:k_to], self.state, self.profile.threads)

    def _segments(self) -> list[FrozenSegment]:
        """Format 2: the frozen segments of the prefix, first to last."""
        parts = ([self.prefix.base] if self.prefix.base is not None else []) + list(self.prefix.bridges)
        return [p for p in parts if isinstance(p, FrozenSegment)]

    def _calibration_for(self, segment: FrozenSegment) -> np.ndarray:
        """The segment's float32 input for the calibration samples."""
        x = normalize(self.data.images[self.calibration_idx], self.bundle.mean, self.bundle.std)
        for part in self._segments():
            if part is segment:
                return x
            x = part.forward_exact(x)
        raise ValueError("segment is not in the prefix")

    def _heldout_top1(self, trainer) -> float | None:
        """Held-out top-1 (percent) of ``trainer`` on features as training reads them."""
        if self.heldout_idx.size == 0:
            return None
        return 100.0 * self.evaluate(trainer, self.heldout_idx, 64, training_features=True)["val_acc"]

    def settle_precisions(self, trainer) -> list[dict]:
        """Choose the precision of every frozen segment not chosen yet (profile
        ``prefix_precision``); the new records, for the run's events."""
        new = []
        for segment in self._segments()[len(self.precisions):]:
            if self.data.images.shape[0] == 0 or self.calibration_idx.size == 0:
                record = {"blocks": [segment.blocks[0].index, segment.blocks[-1].index], "precision": "float32",
                          "wanted": self.profile.prefix_precision, "why": "no device data to calibrate int8 on"}
            else:
                record = choose_precision(segment, self.profile.prefix_precision, self._calibration_for(segment),
                                          lambda: self._heldout_top1(trainer))
            segment.decision = record
            self.precisions.append(record)
            new.append(record)
        return new

    def _build_prefix(self) -> PrefixChain:
        if self.state is not None:
            if self.profile.prefix_backend == "executorch":
                raise BundleError("the profile asks for prefix_backend: executorch, but a format-2 bundle has no "
                                  ".pte (its frozen blocks run as ONNX; docs/bundle.md says why); set "
                                  "prefix_backend: auto or onnxruntime, or export with --bundle-format 1")
            k0 = self.starts[0][0] if self.starts else 0
            self.prefix_choice = ("onnxruntime block chain (bundle format 2: the frozen blocks' infer programs)"
                                  if k0 or self.position else "none (stage 0 trains every block)")
            segments = [self._chain(self.starts[j - 1][0], self.starts[j][0]) for j in range(1, self.position + 1)]
            return PrefixChain(self._chain(0, k0) if k0 else None, segments, self._precision)
        first = self.bundle.stage(self.starts[0][0]) if self.starts else self.bundle.stages[0]
        base, self.prefix_choice = choose_base_prefix(first, self.profile.prefix_backend, self.profile.threads)
        bridges = []
        for j in range(1, self.position + 1):
            k_from, k_to = self.starts[j - 1][0], self.starts[j][0]
            bridges.append(OrtBridge(self.bundle.stage(k_from).eval_model, k_from, k_to,
                                     self.frozen_params, self.profile.threads))
        return PrefixChain(base, bridges, self._precision)

    def _precision(self, features: np.ndarray) -> np.ndarray:
        return round_trip(features, self.profile.cache_dtype)

    def _new_cache(self) -> FeatureCache:
        location = self.profile.cache_location
        if self.prefix.empty:
            location = "none"
        return FeatureCache(len(self.data), self.bundle.stage(self.k).feature_shape, location,
                            self.profile.cache_max_mb, self.cache_dir, self.profile.cache_dtype)

    def planned_cache_mb(self) -> float:
        """Memory the feature cache takes when full, if it lives in memory (else 0)."""
        if self.cache.enabled and self.cache.location == "memory":
            return len(self.data) * self.cache.bytes_per_sample / 2**20
        return 0.0

    # --- features ---------------------------------------------------------------------------
    def features(self, indices: np.ndarray) -> tuple[np.ndarray, int, float, float]:
        """(features, cache hits, data seconds, prefix seconds) for dataset ``indices``."""
        t0 = time.perf_counter()
        hit = self.cache.lookup(indices)
        missing = indices[~hit]
        x = normalize(self.data.images[missing], self.bundle.mean, self.bundle.std) if missing.size else None
        t1 = time.perf_counter()
        if self.prefix.empty:
            features = x
        else:
            features = np.empty((len(indices), *self.bundle.stage(self.k).feature_shape), np.float32)
            if hit.any():
                features[hit] = self.cache.get(indices[hit])
            if missing.size:
                computed = self.prefix.forward(x)
                features[~hit] = computed
                self.cache.put(missing, computed)
        t2 = time.perf_counter()
        return features, int(hit.sum()), t1 - t0, t2 - t1

    def uncached_features(self, indices: np.ndarray, training_features: bool = False) -> np.ndarray:
        """The prefix's full-precision output for ``indices`` without the cache (held-out
        evaluation, and what memory planning measures); ``training_features``: at the
        precision training reads instead (int8 prefix, cache rounding)."""
        x = normalize(self.data.images[indices], self.bundle.mean, self.bundle.std)
        return x if self.prefix.empty else self.prefix.forward(x, rounded=training_features)

    def evaluate(self, trainer, indices: np.ndarray, batch_size: int, training_features: bool = False) -> dict:
        """Held-out accuracy and loss of ``trainer`` on ``indices``, at full precision: the
        model the run reports is the one ``export-model`` writes (the cache's precision only
        applies to the features training steps read). ``training_features``: on the features
        as training reads them (how the int8 prefix is judged, frozen_segment.py)."""
        correct, loss_sum = 0, 0.0
        size = max(1, batch_size or 32)
        labels = self.data.labels
        for start in range(0, indices.size, size):
            idx = indices[start:start + size]
            loss, logits = trainer.eval_step(self.uncached_features(idx, training_features), labels[idx])
            correct += int((logits.argmax(1) == labels[idx]).sum())
            loss_sum += loss * idx.size
        return {"val_acc": correct / indices.size, "val_loss": loss_sum / indices.size}

    # --- stage change -----------------------------------------------------------------------
    def enter_stage(self, position: int, trainer):
        """Move to ``starts[position]`` and return its suffix trainer, with ``trainer``'s state carried.

        Blocks that freeze keep their device-trained weights (a new bridge runs them);
        cached features are carried through that bridge instead of being recomputed.
        """
        old_k = self.k
        self.position = position
        new_k = self.k
        if self.state is not None:
            return self._move_boundary(old_k, new_k, trainer)
        current = {n: trainer.get_parameter(n) for n in trainer.parameter_names()}
        for name, value in current.items():
            if block_of(name) < new_k:
                self.frozen_params[name] = value
        successor = self.new_trainer()
        for name in successor.parameter_names():
            if name in current:
                successor.set_parameter(name, current[name])
        successor.momentum_buffers = {n: b for n, b in trainer.momentum_buffers.items() if block_of(n) >= new_k}
        bridge = OrtBridge(self.bundle.stage(old_k).eval_model, old_k, new_k, self.frozen_params,
                           self.profile.threads)
        self.prefix = PrefixChain(self.prefix.base, self.prefix.bridges + [bridge], self._precision)
        if self.cache.enabled:
            self.cache.transform(lambda features: self._precision(bridge.forward(features)),
                                 feature_shape=self.bundle.stage(new_k).feature_shape)
        return successor

    def _move_boundary(self, old_k: int, new_k: int, trainer):
        """Format 2: blocks ``[old_k, new_k)`` freeze in place; only their infer programs run on."""
        trainer.release()   # the state must hold its own arrays before they are shared on
        for block in self.bundle.blocks[old_k:new_k]:
            for name in block.parameters + block.running_stats + tuple(w + MASK_SUFFIX for w in block.masks):
                self.frozen_params[name] = self.state.array(name)
            self.sessions.release(block.index, ("infer", "train", "backward", "backward_first"))
        self.sessions.release(new_k, ("backward",))   # the first trainable block runs backward_first
        successor = self.new_trainer()
        successor.momentum_buffers = {n: b for n, b in trainer.momentum_buffers.items() if block_of(n) >= new_k}
        segment = self._chain(old_k, new_k)
        self.prefix = PrefixChain(self.prefix.base, self.prefix.bridges + [segment], self._precision)
        self.settle_precisions(successor)   # before the cache: features come from the chosen precision
        if self.cache.enabled:
            self.cache.transform(lambda features: self._precision(segment.forward(features)),
                                 feature_shape=self.bundle.stage(new_k).feature_shape)
        return successor
