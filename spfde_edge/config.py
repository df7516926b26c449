"""The configuration of a training run: filled by the CLI, stored in every checkpoint."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option and the fix."""


CONFIG_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "resnet32"
    width: float | None = None            # channel multiplier; None = the model's default
    cifar_stem: bool = True
    init_from: str | None = None          # pretrained weights (a state dict); masks by magnitude
    bn_momentum: float | None = None      # BatchNorm running-statistics momentum; None = the model's
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    input_size: int = 32
    val_fraction: float = 0.1
    synthetic_size: int = 512
    train_subset: int | None = None        # use only this many training samples (seeded, balanced)
    augment: bool = True
    # optimisation (SGD with momentum, per-block cosine LR)
    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    warmup_epochs: float = 0.0            # linear LR warmup shared by all blocks, then the cosine
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # SpFDE (paper notation: Δτ = delta_tau)
    delta_tau: int = 5
    sparsity: float = 0.9
    distribution: str = "uniform"
    dst: str = "mest"
    update_fraction: float = 0.3
    mest_lambda: float = 1.0              # MEST's λ in the prune score |w| + λ|g|
    freeze_flops: float = 0.0             # target training-FLOPs reduction from freezing
    max_frozen_fraction: float = 2 / 3
    sieve: float = 0.0                    # fraction of the training set kept removed
    sieve_swap: float = 0.5               # fraction of the removed queue exchanged per update
    # run
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}"),
            (0.0 <= self.weight_decay < 1.0, f"--weight-decay must be in [0, 1), got {self.weight_decay}"),
            (self.threads is None or self.threads >= 1,
             f"--threads must be at least 1, got {self.threads}; leave it out for torch's choice"),
            (self.input_size >= 1, f"--input-size must be at least 1 pixel, got {self.input_size}"),
            (self.synthetic_size >= 1, f"--synthetic-size must be at least 1, got {self.synthetic_size}"),
            (self.train_subset is None or self.train_subset >= 1,
             f"--train-subset must be at least 1 sample, got {self.train_subset}"),
            (self.bn_momentum is None or 0.0 < self.bn_momentum < 1.0,
             f"--bn-momentum must be in (0, 1), got {self.bn_momentum}; leave it out for the model's own"),
            (self.width is None or (self.width > 0 and math.isfinite(self.width)),
             f"--width must be a positive multiplier, got {self.width}"),
            (0.0 <= self.max_frozen_fraction <= 1.0,
             f"--max-frozen-fraction must be in [0, 1], got {self.max_frozen_fraction}"),
            (self.delta_tau >= 1, f"--delta-tau must be at least 1 epoch, got {self.delta_tau}"),
            (0.0 <= self.sparsity < 1.0, f"--sparsity must be in [0, 1), got {self.sparsity}"),
            (0.0 <= self.freeze_flops < 1.0, f"--freeze-flops must be in [0, 1), got {self.freeze_flops}"),
            (0.0 <= self.sieve < 1.0, f"--sieve must be in [0, 1), got {self.sieve}"),
            (0.0 < self.sieve_swap <= 1.0, f"--sieve-swap must be in (0, 1], got {self.sieve_swap}"),
            (0.0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}"),
            (0.0 <= self.mest_lambda < float("inf"),
             f"--mest-lambda must be a number >= 0, got {self.mest_lambda}"),
            (0.0 < self.update_fraction < 1.0,
             f"--update-fraction must be in (0, 1), got {self.update_fraction}"),
            # Every epoch reports held-out accuracy, so there must be a held-out split.
            (0.0 <= self.val_fraction < 1.0,
             f"--val-fraction must be in [0, 1), got {self.val_fraction}; 0 trains on everything "
             "and reports no validation accuracy"),
            (self.distribution in ("uniform", "erk"),
             f"--distribution must be uniform or erk, got {self.distribution}"),
            (self.dst == "static" or self.sparsity > 0,
             f"--dst {self.dst} needs --sparsity > 0; for a dense model pass --dst static"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        version = data.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported by this spfde-edge "
                              f"(expects {CONFIG_VERSION}); use the release that wrote it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; the checkpoint comes from a newer spfde-edge")
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
