"""What one on-device run was told: the dataclass the CLI fills, stored in checkpoints and reports."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import RunError


@dataclass(frozen=True)
class RunConfig:
    """Everything ``python -m device_runner`` can be told; stored in checkpoints and reports."""

    bundle: str
    profile: str
    data: str | None = None
    out: str | None = None
    epochs: int = 3
    lr: float | None = None              # default: the bundle's base LR (a tenth when fine-tuning)
    batch_size: int | None = None        # default: the largest that fits the memory budget
    val_fraction: float = 0.1
    sieve: float | None = None           # removed fraction; default the bundle's, else 0.2
    delta_tau: int | None = None         # device epochs; default scaled from the bundle's
    freeze_at: tuple[int, ...] | None = None
    stages: tuple[int, ...] | None = None  # block boundaries to train at; default the bundle's plan
    max_per_class: int | None = None
    memory_budget_mb: float | None = None
    energy_budget_j: float | None = None
    cache: str | None = None             # memory | disk | none (default: the profile's)
    cache_dtype: str | None = None       # float32 | float16 | int8 (default: the profile's)
    prefix_precision: str | None = None  # auto | float32 | int8 (default: the profile's)
    checkpoint_every: int | None = None  # steps (default: the profile's)
    threads: int | None = None           # default: the profile's
    seed: int = 0
    suffix_backend: str | None = None    # auto | onnxruntime-training | onnxruntime (default: profile's)
    trusted_keys: str | None = None      # folder of NAME.pub keys (absolute); default the profile's trust.keys_dir

    def validate(self) -> "RunConfig":
        """Refuse values that cannot work (RunError naming the option), before anything is read
        or written; ``None`` means the bundle's or profile's default."""
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (_positive(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.batch_size is None or self.batch_size >= 1,
             f"--batch-size must be at least 1, got {self.batch_size}; leave it out to get the "
             "largest batch that fits the memory budget"),
            (0.0 < self.val_fraction < 1.0,
             f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}"),
            (self.sieve is None or 0.0 <= self.sieve < 1.0,
             f"--sieve must be in [0, 1) (the fraction of samples kept removed), got {self.sieve}"),
            (self.delta_tau is None or self.delta_tau >= 1,
             f"--delta-tau must be at least 1 device epoch, got {self.delta_tau}"),
            (self.max_per_class is None or self.max_per_class >= 1,
             f"--max-per-class must be at least 1 image, got {self.max_per_class}; leave it out "
             "to use every image"),
            (_positive(self.memory_budget_mb),
             f"--memory-budget-mb must be a positive number of MB, got {self.memory_budget_mb}"),
            (_positive(self.energy_budget_j),
             f"--energy-budget-j must be a positive number of joules, got {self.energy_budget_j}; "
             "leave it out for no energy budget"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be at least 1 step, got {self.checkpoint_every}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.seed >= 0, f"--seed must be 0 or more, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RunError(message)
        for epoch in self.freeze_at or ():
            # A start equal to --epochs is the run's end: the stage is planned but not reached.
            if not 1 <= epoch <= self.epochs:
                raise RunError(f"--freeze-at {','.join(map(str, self.freeze_at))}: with --epochs "
                               f"{self.epochs} a later stage can start at epochs 1..{self.epochs} only "
                               "(after the first epoch, by the end of the run); lower --freeze-at or "
                               "raise --epochs")
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise RunError(f"--out {self.out} is a file; the run needs a new or empty folder")
        return self

    def profile_overrides(self) -> dict:
        overrides = {}
        if self.memory_budget_mb is not None:
            overrides["budgets.memory_mb"] = self.memory_budget_mb
        if self.energy_budget_j is not None:
            overrides["budgets.energy_j"] = self.energy_budget_j
        if self.cache is not None:
            overrides["cache.location"] = self.cache
        if self.cache_dtype is not None:
            overrides["cache.dtype"] = self.cache_dtype
        if self.prefix_precision is not None:
            overrides["prefix_precision"] = self.prefix_precision
        if self.threads is not None:
            overrides["budgets.threads"] = self.threads
        if self.suffix_backend is not None:
            overrides["suffix_backend"] = self.suffix_backend
        return overrides

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("freeze_at", "stages"):
            data[name] = list(data[name]) if data[name] is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        for name in ("freeze_at", "stages"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def _positive(value: float | None) -> bool:
    """None (not given) or a finite number above 0; NaN and inf are refused."""
    return value is None or (math.isfinite(value) and value > 0)
