"""A device run's place in the host's SpFDE plan: which stage trains when, Δτ, LR and DST.

The bundle carries the host plan in plan epochs (``spfde.epochs``, ``epochs_done``, the
freeze epochs, Δτ). A device run of ``epochs`` epochs continues the rest of that plan:
:func:`device_plan` maps its epochs linearly onto the remaining plan epochs, and the shared
rules of ``device_runner.method.schedule`` (update epochs and fraction, per-block cosine LR)
are evaluated at the mapped plan epoch, so the device continues the host's curves instead
of restarting them. A plan that is already finished (a trained checkpoint exported for
fine-tuning) gets a fresh plan over the device's own epochs at a tenth of the base LR.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BundleError
from .method.schedule import (PlanClock, UpdateSchedule, block_active_epochs, block_lr,
                              is_interval_boundary)

FINE_TUNE_LR_FACTOR = 0.1


@dataclass(frozen=True)
class DevicePlan:
    """How the device's epochs map onto the host plan."""

    clock: PlanClock
    end_epoch: float        # plan epoch where the LR and mask-update schedules end
    fine_tune: bool         # the host plan was finished: a fresh plan over the device run


def device_plan(epochs_done: int, plan_epochs: int, epochs: int) -> DevicePlan:
    if epochs_done < plan_epochs:
        return DevicePlan(PlanClock(float(epochs_done), (plan_epochs - epochs_done) / epochs),
                          float(plan_epochs), False)
    return DevicePlan(PlanClock(0.0, 1.0), float(epochs), True)


def stage_starts(stage_ks: Sequence[int], freeze_epochs: Sequence[int], plan: DevicePlan, epochs: int,
                 freeze_at: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[(k, first device epoch)]`` for the bundle's stages, in order; the first starts at 0.

    Stage k starts when the host plan freezes block k-1 (mapped to device epochs); stages
    whose freeze epoch is not in the rest of the plan (a bundle exported with explicit
    ``--stages``) are spread evenly over the run. ``freeze_at`` (device epochs, one per
    later stage) overrides both.
    """
    ks = sorted(stage_ks)
    later = ks[1:]
    if freeze_at is not None:
        if len(freeze_at) != len(later):
            raise BundleError(f"--freeze-at needs {len(later)} epoch(s), one per later stage "
                              f"{later}; got {list(freeze_at)}")
        starts = [int(e) for e in freeze_at]
    else:
        starts = []
        for j, k in enumerate(later, start=1):
            host = freeze_epochs[k - 1] if k - 1 < len(freeze_epochs) else None
            if host is not None and not plan.fine_tune and plan.clock.start < host <= plan.end_epoch:
                start = round(plan.clock.run_epoch(host))
            else:
                start = round(j * epochs / len(ks))
            starts.append(max(1, start))
    for previous, current in zip(starts, starts[1:]):
        if current < previous:
            raise BundleError(f"stage start epochs must not decrease, got {starts}")
    return [(ks[0], 0)] + list(zip(later, starts))


def planned_stage_ks(num_blocks: int, num_frozen: int, freeze_epochs: Sequence[int]) -> list[int]:
    """The stages the host plan moves through: from the blocks frozen now to the last block the
    plan freezes (the head never freezes). What format 1 exports by default; format 2 can
    freeze at any boundary, so a run there takes exactly these from the plan."""
    last = min(num_blocks - 1, max(num_frozen, len(freeze_epochs)))
    return list(range(num_frozen, last + 1))


def available_stage_ks(bundle) -> list[int]:
    """Every stage a run of ``bundle`` may use: format 1 its exported stages, format 2 every
    block boundary from the blocks the host froze to the head."""
    if bundle.format_version == 1:
        return [s.k for s in bundle.stages]
    return list(range(bundle.manifest.source.num_frozen, bundle.num_blocks))


def run_stage_ks(bundle, stages: Sequence[int] | None = None) -> list[int]:
    """The stage boundaries a run of ``bundle`` schedules: ``stages`` (``--stages``) when given,
    else format 1's exported stages and format 2's host plan (from the blocks frozen now to
    the last block the plan freezes)."""
    available = available_stage_ks(bundle)
    if stages is not None:
        wanted = [int(k) for k in stages]
        if not wanted or wanted != sorted(set(wanted)) or not set(wanted) <= set(available):
            offer = (f"the exported stages {available}" if bundle.format_version == 1 else
                     f"block boundaries {available[0]}..{available[-1]} (the host froze {available[0]} blocks; "
                     f"block {available[-1]} is the head)")
            raise BundleError(f"--stages {','.join(map(str, wanted))}: give increasing boundaries from "
                              f"{offer}")
        return wanted
    if bundle.format_version == 1:
        return available
    manifest = bundle.manifest
    return planned_stage_ks(bundle.num_blocks, manifest.source.num_frozen, manifest.spfde.freezing.freeze_epochs)


def stage_at(starts: Sequence[tuple[int, int]], epoch: int) -> int:
    """Position in ``starts`` of the stage that trains during ``epoch``."""
    position = 0
    for index, (_, start) in enumerate(starts):
        if start <= epoch:
            position = index
    return position


def block_freeze_epochs(starts: Sequence[tuple[int, int]], plan: DevicePlan) -> list[float]:
    """Plan epoch at which each block freezes on this device run, front to back.

    Blocks before the first stage are frozen from the start; the blocks ``[k_prev, k)`` freeze
    when stage ``k`` starts. Later blocks are not listed (they train to the end).
    """
    frozen: list[float] = [plan.clock.start] * starts[0][0]
    for (k_prev, _), (k, start) in zip(starts, starts[1:]):
        frozen += [plan.clock.plan_epoch(start)] * (k - k_prev)
    return frozen


@dataclass(frozen=True)
class DeviceSchedule:
    """Everything time-dependent in a device run, from the shared rules."""

    plan: DevicePlan
    starts: list[tuple[int, int]]
    delta_tau: int
    boundary_offset: int                # the device's epoch 0 on the plan's Δτ grid
    base_lr: float
    active_epochs: list[float]          # per block, plan epochs
    updates: UpdateSchedule
    warmup_epochs: float = 0.0          # plan epochs of linear LR warmup (the host's rule)

    def is_boundary(self, epoch: int) -> bool:
        """Sieve exchanges (and mask updates, while the plan has them) start this epoch."""
        return is_interval_boundary(epoch, self.delta_tau, self.boundary_offset)

    def lrs(self, epoch: float, scale: float = 1.0) -> dict[int, float]:
        """Each block's learning rate at device epoch ``epoch`` (fractional within an epoch)."""
        plan_epoch = self.plan.clock.plan_epoch(epoch)
        return {b: scale * block_lr(self.base_lr, plan_epoch, active, self.warmup_epochs)
                for b, active in enumerate(self.active_epochs)}


def device_schedule(*, stage_ks: Sequence[int], num_blocks: int, epochs: int, epochs_done: int,
                    plan_epochs: int, freeze_epochs: Sequence[int], delta_tau: int, base_lr: float,
                    update_fraction: float, lr: float | None = None, device_delta_tau: int | None = None,
                    freeze_at: Sequence[int] | None = None, warmup_epochs: float = 0.0) -> DeviceSchedule:
    """The schedule of a device run of ``epochs`` epochs over a bundle's host plan.

    ``lr`` and ``device_delta_tau`` override the plan's base LR and the scaled Δτ.
    """
    plan = device_plan(epochs_done, plan_epochs, epochs)
    starts = stage_starts(stage_ks, freeze_epochs, plan, epochs, freeze_at)
    if device_delta_tau is None:
        device_delta_tau = max(1, round(delta_tau / plan.clock.scale))
    if lr is None:
        lr = base_lr * (FINE_TUNE_LR_FACTOR if plan.fine_tune else 1.0)
    offset = round(plan.clock.start / plan.clock.scale)
    active = block_active_epochs(block_freeze_epochs(starts, plan), num_blocks, plan.end_epoch)
    updates = UpdateSchedule(device_delta_tau, plan.end_epoch, update_fraction, plan.clock, offset)
    warmup = 0.0 if plan.fine_tune else warmup_epochs
    return DeviceSchedule(plan, starts, device_delta_tau, offset, lr, active, updates, warmup)
