"""What one on-device run was told: the dataclass the CLI fills, stored in checkpoints and reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
    max_per_class: int | None = None
    memory_budget_mb: float | None = None
    energy_budget_j: float | None = None
    cache: str | None = None             # memory | disk | none (default: the profile's)
    checkpoint_every: int | None = None  # steps (default: the profile's)
    threads: int | None = None           # default: the profile's
    seed: int = 0
    suffix_backend: str | None = None    # auto | onnxruntime-training | onnxruntime (default: profile's)

    def profile_overrides(self) -> dict:
        overrides = {}
        if self.memory_budget_mb is not None:
            overrides["budgets.memory_mb"] = self.memory_budget_mb
        if self.energy_budget_j is not None:
            overrides["budgets.energy_j"] = self.energy_budget_j
        if self.cache is not None:
            overrides["cache.location"] = self.cache
        if self.threads is not None:
            overrides["budgets.threads"] = self.threads
        if self.suffix_backend is not None:
            overrides["suffix_backend"] = self.suffix_backend
        return overrides

    def to_dict(self) -> dict:
        data = asdict(self)
        data["freeze_at"] = list(self.freeze_at) if self.freeze_at is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        if data.get("freeze_at") is not None:
            data["freeze_at"] = tuple(data["freeze_at"])
        return cls(**data)
