"""The SpFDE schedule on the device, as pure functions of the manifest and the run length.

The host plan is in host epochs (``spfde.epochs``, ``epochs_done``, freeze epochs, Δτ). The
device runs ``epochs`` epochs of its own, so the rest of the host schedule is mapped
linearly onto them; stages whose freeze epoch is not in the rest of the plan (a bundle
exported with explicit ``--stages``) are spread evenly over the run. ``freeze_at`` (device
epochs, one per later stage) overrides the mapping.
"""
from __future__ import annotations

import math

from .errors import BundleError


def stage_starts(stage_ks: list[int], spfde: dict, epochs: int,
                 freeze_at: list[int] | None = None) -> list[tuple[int, int]]:
    """``[(k, first device epoch)]`` for the bundle's stages, in order; the first starts at 0."""
    ks = sorted(stage_ks)
    later = ks[1:]
    if freeze_at is not None:
        if len(freeze_at) != len(later):
            raise BundleError(f"--freeze-at needs {len(later)} epoch(s), one per later stage "
                              f"{later}; got {list(freeze_at)}")
        starts = [int(e) for e in freeze_at]
    else:
        done, total = int(spfde.get("epochs_done", 0)), int(spfde.get("epochs", 0))
        freeze_epochs = list(spfde.get("freezing", {}).get("freeze_epochs", []))
        remaining = max(1, total - done)
        starts = []
        for j, k in enumerate(later, start=1):
            host = freeze_epochs[k - 1] if k - 1 < len(freeze_epochs) else None
            if host is not None and done < host <= total:
                start = round((host - done) / remaining * epochs)
            else:
                start = round(j * epochs / len(ks))
            starts.append(max(1, start))
    for previous, current in zip(starts, starts[1:]):
        if current < previous:
            raise BundleError(f"stage start epochs must not decrease, got {starts}")
    return [(ks[0], 0)] + list(zip(later, starts))


def stage_at(starts: list[tuple[int, int]], epoch: int) -> int:
    """Position in ``starts`` of the stage that trains during ``epoch``."""
    position = 0
    for index, (_, start) in enumerate(starts):
        if start <= epoch:
            position = index
    return position


def block_active_epochs(starts: list[tuple[int, int]], num_blocks: int, epochs: int) -> list[float]:
    """Device epochs each block trains for: until the stage that freezes it starts, else all."""
    active = [float(epochs)] * num_blocks
    for k, start in starts[1:]:
        for block in range(num_blocks):
            if block < k and active[block] == float(epochs) and block >= starts[0][0]:
                active[block] = float(start)
    return active


def block_lr(base_lr: float, epoch_float: float, active_epochs: float) -> float:
    """Per-block cosine from ``base_lr`` to 0 at the block's freeze (SpFDE §3.2, as the host)."""
    if active_epochs <= 0 or epoch_float >= active_epochs:
        return 0.0
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch_float / active_epochs))


def device_delta_tau(spfde: dict, epochs: int) -> int:
    """Δτ scaled like the rest of the schedule, at least one epoch."""
    done, total = int(spfde.get("epochs_done", 0)), int(spfde.get("epochs", 0))
    remaining = max(1, total - done)
    return max(1, round(int(spfde["delta_tau"]) * epochs / remaining))


def default_lr(spfde: dict) -> float:
    """The host's base LR for a fresh schedule; a tenth of it to fine-tune a finished one."""
    base = float(spfde["lr_schedule"]["base_lr"])
    done, total = int(spfde.get("epochs_done", 0)), int(spfde.get("epochs", 0))
    return base if done < total else 0.1 * base
