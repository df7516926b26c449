"""When things happen in SpFDE, as pure functions of the epoch.

Δτ paces three things (SpFDE §3): prune-and-grow, sieve exchanges and freezing steps, each
at the start of an epoch that is a positive multiple of Δτ (an *interval boundary*).

The host plan is written in *plan epochs*. The host trainer runs the plan itself, so its
epochs are plan epochs. A device run of ``E`` epochs continues the rest of a host plan:
:class:`PlanClock` maps its epochs onto the plan's, and the update fraction and every
block's learning rate are read off the plan's curves at the mapped epoch, so a device run
continues the host's schedules instead of restarting them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class ScheduleError(ValueError):
    """A schedule setting out of range; the message names the option to change."""


def is_interval_boundary(epoch: int, delta_tau: int, offset: int = 0) -> bool:
    """True at the start of epochs Δτ, 2Δτ, ...: where masks, sieve and freezing move.

    ``offset`` is the run's epoch 0 counted on that grid: a device run that continues a
    plan at epoch D (same epoch length) has offset D, so its boundaries fall where the
    host's would have.
    """
    return epoch + offset > 0 and (epoch + offset) % delta_tau == 0


@dataclass(frozen=True)
class PlanClock:
    """``plan_epoch = start + scale * run_epoch``. The host runs with the identity clock."""

    start: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ScheduleError(f"a plan clock needs a positive scale, got {self.scale}")

    def plan_epoch(self, run_epoch: float) -> float:
        return self.start + self.scale * run_epoch

    def run_epoch(self, plan_epoch: float) -> float:
        return (plan_epoch - self.start) / self.scale


@dataclass(frozen=True)
class UpdateSchedule:
    """When prune-and-grow runs and what fraction it swaps (RigL's split of *when* from *how*).

    Updates happen at interval boundaries (``delta_tau`` in run epochs) while the plan epoch
    is before ``end_epoch``; the fraction decays by cosine from ``initial_fraction`` to 0 at
    ``end_epoch`` (RigL's drop-fraction schedule).
    """

    delta_tau: int
    end_epoch: float
    initial_fraction: float = 0.3
    clock: PlanClock = PlanClock()
    offset: int = 0                     # see is_interval_boundary

    def __post_init__(self) -> None:
        if isinstance(self.delta_tau, bool) or int(self.delta_tau) != self.delta_tau or self.delta_tau < 1:
            raise ScheduleError(f"--delta-tau must be a positive number of epochs, got {self.delta_tau}")
        if not self.end_epoch >= 0:
            raise ScheduleError(f"the mask-update end epoch must be >= 0, got {self.end_epoch}")
        if not 0.0 <= self.initial_fraction <= 1.0:
            raise ScheduleError(f"--update-fraction must be in [0, 1], got {self.initial_fraction}")

    def is_update_epoch(self, epoch: int) -> bool:
        return (is_interval_boundary(epoch, self.delta_tau, self.offset)
                and self.clock.plan_epoch(epoch) < self.end_epoch)

    def fraction(self, epoch: float) -> float:
        plan_epoch = self.clock.plan_epoch(epoch)
        if self.end_epoch == 0 or plan_epoch >= self.end_epoch:
            return 0.0
        return self.initial_fraction * 0.5 * (1.0 + math.cos(math.pi * plan_epoch / self.end_epoch))


def num_frozen_at(freeze_epochs: Sequence[float], epoch: float) -> int:
    """Blocks frozen during ``epoch``: block i freezes at the start of ``freeze_epochs[i]``."""
    return sum(1 for e in freeze_epochs if e <= epoch)


def block_active_epochs(freeze_epochs: Sequence[float], num_blocks: int, end_epoch: float) -> list[float]:
    """Epochs each block trains for: until its freeze epoch, or ``end_epoch`` if it never freezes."""
    if len(freeze_epochs) >= num_blocks:
        raise ScheduleError(f"{len(freeze_epochs)} freeze epochs for {num_blocks} blocks; "
                            "the head block must stay trainable")
    return [float(e) for e in freeze_epochs] + [float(end_epoch)] * (num_blocks - len(freeze_epochs))


def block_lr(base_lr: float, epoch: float, active_epochs: float, warmup_epochs: float = 0.0) -> float:
    """A block's learning rate: cosine from ``base_lr`` to 0 at the block's freeze (SpFDE §3.2).

    Linear warmup from 0 over ``warmup_epochs`` (shared by all blocks), then cosine decay
    over the rest of the block's active epochs ``[0, active_epochs)``; 0 once it is frozen.
    """
    if epoch >= active_epochs:
        return 0.0
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (active_epochs - warmup_epochs)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
