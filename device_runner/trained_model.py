"""The model a device run trained, opened read-only from its run folder: uint8 images -> logits.

After ``python -m device_runner ... --out RUN`` the trained network exists only as RUN's last
checkpoint: the bundle's prefix of the run's first stage, one bridge per stage change with
the device-trained weights of the blocks frozen on the device (the checkpoint's ``frozen/``
arrays), and the current stage's suffix state (``suffix_state.npz``). :class:`TrainedModel`
puts those pieces back together with the runner's own classes (StagePipeline, PrefixChain,
the suffix backends), so evaluate, predict and export-model see exactly what the run
evaluated. It trains nothing and writes nothing into the run folder, and takes no lock: it
can read a run that is still training (it sees that run's last complete checkpoint).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from . import checkpoint, schedule
from .backends import choose_suffix_backend
from .backends.blocks import block_of
from .bundle import load_bundle
from .data import DeviceData, normalize, stratified_split
from .errors import RunError
from .profile import load_profile
from .run_config import RunConfig
from .run_state import bundle_hashes
from .stage_pipeline import StagePipeline

BATCH = 64  # images per forward pass: small enough for a board, large enough for throughput


def run_starts(config: RunConfig, bundle) -> list[tuple[int, int]]:
    """The run's stages as ``(k, first epoch)``: the same schedule call the runner makes."""
    plan = bundle.manifest.spfde
    return schedule.device_schedule(
        stage_ks=schedule.run_stage_ks(bundle, config.stages), num_blocks=bundle.num_blocks,
        epochs=config.epochs,
        epochs_done=plan.epochs_done, plan_epochs=plan.epochs, freeze_epochs=plan.freezing.freeze_epochs,
        delta_tau=plan.delta_tau, base_lr=plan.lr_schedule.base_lr, update_fraction=plan.dst.update_fraction,
        lr=config.lr, device_delta_tau=config.delta_tau, freeze_at=config.freeze_at).starts


class TrainedModel:
    """RUN's last checkpointed model; :meth:`logits` maps uint8 ``[N, 3, H, W]`` images to logits."""

    def __init__(self, run: str | Path, threads: int | None = None):
        self.run = Path(run)
        if not (self.run / checkpoint.POINTER).is_file() and not checkpoint.is_unfinished_start(self.run):
            raise RunError(f"{self.run} holds no trained model ({checkpoint.POINTER} missing); give the "
                           "--out folder of a python -m device_runner run")
        meta, arrays, suffix_state = checkpoint.read(self.run)
        self.config = RunConfig.from_dict(meta["config"])
        profile = load_profile(self.config.profile, self.config.profile_overrides())
        # The same checks the run made: signature (with the run's trusted keys), paths, sha256.
        self.bundle = load_bundle(self.config.bundle,
                                  trusted_keys=self.config.trusted_keys or profile.trusted_keys_dir)
        if meta["bundle_sha"] != bundle_hashes(self.bundle):
            raise RunError(f"the bundle {self.config.bundle} changed since run {self.run} trained on it "
                           "(its sha256 table differs); give the run its original bundle")
        # No feature cache: inference sees each image once.
        self.profile = replace(profile, cache_location="none", threads=threads or profile.threads)
        self.starts = run_starts(self.config, self.bundle)
        self.position = int(meta["stage_pos"])
        frozen = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("frozen/")}
        frozen_blocks = sorted({block_of(n) for n in frozen})
        expected = list(range(self.starts[0][0], self.starts[self.position][0]))
        if frozen_blocks != expected:
            raise RunError(f"checkpoint of {self.run} froze blocks {frozen_blocks} on the device but its "
                           f"schedule says {expected}; the run folder is inconsistent")
        self.epoch, self.status = int(meta["epoch"]), meta["status"]
        self.mid_epoch = int(meta["position"]) > 0
        self.history = meta["history"]
        suffix_class, self.suffix_choice = choose_suffix_backend(self.profile.suffix_backend, self.bundle,
                                                                   [k for k, _ in self.starts], self.profile.threads)
        size = self.input_size
        nothing = DeviceData(np.zeros((0, 3, size, size), np.uint8), np.zeros(0, np.int64), "none")
        self.pipeline = StagePipeline(self.bundle, self.profile, nothing, self.starts, suffix_class,
                                      self.run / "cache", self.position, frozen)
        self.trainer = self.pipeline.new_trainer(suffix_state)

    # --- what the model is ----------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def input_size(self) -> int:
        return self.bundle.input_size

    @property
    def stage_k(self) -> int:
        """First block the run was still training (blocks before it are frozen)."""
        return self.pipeline.k

    @property
    def frozen_params(self) -> dict[str, np.ndarray]:
        return self.pipeline.frozen_params

    def suffix_parameters(self) -> dict[str, np.ndarray]:
        """Every parameter, mask and BatchNorm statistic of the current suffix, by name."""
        return {n: self.trainer.get_parameter(n) for n in self.trainer.parameter_names()}

    def describe(self) -> str:
        where = f"epoch {self.epoch + 1} (mid-epoch checkpoint)" if self.mid_epoch else f"after epoch {self.epoch}"
        return (f"{self.bundle.model_name} of run {self.run} ({self.status}, {where}), stage {self.stage_k}, "
                f"prefix on {self.pipeline.prefix.name}, suffix on {self.trainer.name}")

    # --- inference ------------------------------------------------------------------------------
    def logits(self, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """float32 ``[N, classes]`` for uint8 images ``[N, 3, H, W]`` at the bundle's input size,
        normalised as the bundle says (``model.normalization``)."""
        images = np.asarray(images)
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size) or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N, 3, {size}, {size}], got {images.dtype} "
                             f"{list(images.shape)}")
        out = []
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size], self.bundle.mean, self.bundle.std)
            features = x if self.pipeline.prefix.empty else self.pipeline.prefix.forward(x, rounded=False)
            # The eval graph also computes a loss; its labels do not change the logits.
            _, logits = self.trainer.eval_step(features, np.zeros(len(x), np.int64))
            out.append(np.asarray(logits, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def held_out(self) -> DeviceData:
        """The run's own held-out split (its data, ``--val-fraction`` and seed), never trained on."""
        from .loop import run_data  # the runner's data loading, so the split is the run's

        data = run_data(self.config, self.bundle)
        _, val_idx = stratified_split(data.labels, self.config.val_fraction, self.config.seed)
        return DeviceData(data.images[val_idx], data.labels[val_idx], f"held-out split of {data.source}")
