"""Progressive layer freezing, single-shot scheme (SpFDE §3.2).

Blocks freeze front to back, one every ``delta_tau`` epochs from ``T_frz`` on: block i is
frozen from epoch ``e_i = T_frz + i * delta_tau`` and from then on costs only its forward
pass. :func:`freeze_schedule` picks ``T_frz`` and the number of frozen blocks so that the
training-FLOPs reduction meets a target; :class:`Freezer` is the small object the trainer
holds. Each block's cosine learning rate (:func:`block_lr`, zero from the block's freeze on)
and the freeze-epoch arithmetic are shared with the device (``device_runner.method.schedule``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from device_runner.method import schedule as shared
from device_runner.method.schedule import block_lr

# Plans whose reductions differ by less than this are treated as equally good; the later
# T_frz wins because freezing later preserves accuracy.
NEAR_EQUAL = 0.005
STATE_VERSION = 1


class FreezeError(ValueError):
    """A freezing target or schedule that cannot be met; the message says what to change."""


@dataclass(frozen=True)
class FreezePlan:
    """``freeze_epochs[i]`` is the epoch from which block i is frozen (empty: no freezing)."""

    freeze_epochs: list[int] = field(default_factory=list)
    T_frz: int | None = None
    reduction: float = 0.0  # predicted fraction of training FLOPs saved

    def __post_init__(self) -> None:
        epochs = list(self.freeze_epochs)
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise FreezeError(f"freeze_epochs must increase front to back, got {epochs}")
        if epochs and self.T_frz != epochs[0]:
            raise FreezeError(f"T_frz ({self.T_frz}) must equal the first freeze epoch "
                              f"({epochs[0]})")
        object.__setattr__(self, "freeze_epochs", epochs)

    @property
    def num_frozen(self) -> int:
        """Blocks frozen by the end of training."""
        return len(self.freeze_epochs)


def plan_reduction(flops_fn: Callable[[int], float], plan: FreezePlan, epochs: int) -> float:
    """Exact fraction of training FLOPs a plan saves over ``epochs`` epochs.

    ``flops_fn(num_frozen)`` is the per-sample training FLOPs with that many blocks frozen,
    e.g. ``lambda k: cost.training_flops_per_sample(profile, densities, k).total``.
    """
    if epochs < 1:
        raise FreezeError(f"epochs must be positive, got {epochs}")
    dense = flops_fn(0)
    if dense <= 0:
        raise FreezeError(f"flops_fn(0) must be positive, got {dense}")
    spent = sum(flops_fn(_num_frozen_at(plan, epoch)) for epoch in range(epochs))
    return 1.0 - spent / (epochs * dense)


def _num_frozen_at(plan: FreezePlan, epoch: int) -> int:
    return shared.num_frozen_at(plan.freeze_epochs, epoch)


def blockwise_flops_fn(block_train_flops: Sequence[float],
                       block_forward_flops: Sequence[float]) -> Callable[[int], float]:
    """``flops_fn`` from per-block costs: frozen blocks cost forward, the rest train."""
    if len(block_train_flops) != len(block_forward_flops):
        raise FreezeError(f"block_train_flops has {len(block_train_flops)} entries but "
                          f"block_forward_flops has {len(block_forward_flops)}")
    if any(f > t for t, f in zip(block_train_flops, block_forward_flops)):
        raise FreezeError("a block's forward FLOPs cannot exceed its training FLOPs")
    train = list(block_train_flops)
    forward = list(block_forward_flops)
    return lambda k: sum(forward[:k]) + sum(train[k:])


def freeze_schedule(block_train_flops: Sequence[float] | None = None,
                    block_forward_flops: Sequence[float] | None = None, *,
                    epochs: int, delta_tau: int, target_reduction: float,
                    max_frozen_fraction: float = 2 / 3,
                    flops_fn: Callable[[int], float] | None = None,
                    num_blocks: int | None = None, strict: bool = True,
                    epoch_flops_fn: Callable[[int, int], float] | None = None) -> FreezePlan:
    """The freezing plan whose FLOPs reduction is closest to ``target_reduction``.

    Give either per-block costs (``block_train_flops``, ``block_forward_flops``; slightly
    approximate, since the first trainable block's input-gradient saving depends on how
    many blocks are frozen) or the exact ``flops_fn(num_frozen)`` with ``num_blocks``, or
    ``epoch_flops_fn(num_frozen, epoch)`` with ``num_blocks`` when the per-sample cost also
    changes with the epoch (MEST runs above its target density in its update epochs).

    Searches every ``T_frz`` (a positive multiple of ``delta_tau``) and every number of
    frozen blocks k, with all ``e_i < epochs``, k at most ``floor(max_frozen_fraction *
    num_blocks)``, and the last (head) block never frozen. Among plans within
    ``NEAR_EQUAL`` of the best, the one with the latest ``T_frz`` wins (the empty plan
    counts as freezing never). Raises :class:`FreezeError` when the target is out of reach,
    unless ``strict`` is false: then the plan with the largest reduction is returned (the
    caller reports the shortfall; a 3-epoch smoke run should still freeze what it can).
    """
    if epoch_flops_fn is not None:
        if flops_fn is not None or num_blocks is None:
            raise FreezeError("with epoch_flops_fn give num_blocks and no flops_fn")
        flops_fn = lambda k: epoch_flops_fn(k, 0)  # noqa: E731 (argument checks only)
    if flops_fn is None:
        if block_train_flops is None or block_forward_flops is None:
            raise FreezeError("give block_train_flops and block_forward_flops, "
                              "or flops_fn with num_blocks")
        flops_fn = blockwise_flops_fn(block_train_flops, block_forward_flops)
        num_blocks = len(block_train_flops)
    elif num_blocks is None or block_train_flops is not None or block_forward_flops is not None:
        raise FreezeError("with flops_fn give num_blocks and no per-block lists")
    if epochs < 1 or delta_tau < 1:
        raise FreezeError(f"epochs and delta_tau must be positive, got {epochs} and {delta_tau}")
    if not 0.0 <= target_reduction < 1.0:
        raise FreezeError(f"target_reduction must be in [0, 1), got {target_reduction}")
    if not 0.0 <= max_frozen_fraction <= 1.0:
        raise FreezeError(f"max_frozen_fraction must be in [0, 1], got {max_frozen_fraction}")

    max_frozen = min(math.floor(max_frozen_fraction * num_blocks + 1e-9), num_blocks - 1)
    by_epoch = epoch_flops_fn or (lambda k, e: flops_fn(k))
    table = [[by_epoch(k, e) for e in range(epochs)] for k in range(max(max_frozen, 0) + 1)]
    baseline = sum(table[0])
    candidates = [FreezePlan()]
    for t_frz in range(delta_tau, epochs, delta_tau):
        for k in range(1, max_frozen + 1):
            freeze_epochs = [t_frz + i * delta_tau for i in range(k)]
            if freeze_epochs[-1] >= epochs:
                break
            plan = FreezePlan(freeze_epochs, t_frz)
            reduction = 1.0 - sum(table[_num_frozen_at(plan, e)][e] for e in range(epochs)) / baseline
            candidates.append(FreezePlan(freeze_epochs, t_frz, reduction))

    reachable = max(plan.reduction for plan in candidates)
    if not strict and target_reduction > reachable + NEAR_EQUAL:
        return max(candidates, key=lambda plan: plan.reduction)
    if target_reduction > reachable + NEAR_EQUAL:
        raise FreezeError(
            f"target FLOPs reduction {target_reduction:.1%} is out of reach: at most "
            f"{reachable:.1%} with {epochs} epochs, delta_tau={delta_tau} and at most "
            f"{max(max_frozen, 0)} of {num_blocks} blocks frozen; train more epochs, use a "
            f"smaller delta_tau or lower the target")
    best_error = min(abs(plan.reduction - target_reduction) for plan in candidates)
    near = [plan for plan in candidates
            if abs(plan.reduction - target_reduction) <= best_error + NEAR_EQUAL]
    return max(near, key=lambda plan: (epochs if plan.T_frz is None else plan.T_frz,
                                       -abs(plan.reduction - target_reduction)))


def block_active_epochs(plan: FreezePlan, num_blocks: int, epochs: int) -> list[float]:
    """Epochs each block trains for: its freeze epoch, or ``epochs`` if it never freezes."""
    try:
        return shared.block_active_epochs(plan.freeze_epochs, num_blocks, epochs)
    except shared.ScheduleError as exc:
        raise FreezeError(str(exc)) from None


__all__ = ["FreezeError", "FreezePlan", "Freezer", "block_active_epochs", "block_lr", "freeze_schedule",
           "plan_reduction"]


class Freezer:
    """Holds a :class:`FreezePlan` and answers which blocks are frozen at an epoch."""

    def __init__(self, plan: FreezePlan | None = None):
        self.plan = plan if plan is not None else FreezePlan()

    def num_frozen_at(self, epoch: int) -> int:
        """Blocks frozen during ``epoch`` (freezing happens at the start of an epoch)."""
        return _num_frozen_at(self.plan, epoch)

    def due(self, epoch: int) -> int | None:
        """Index of the block that freezes at the start of ``epoch``, if any."""
        for index, freeze_epoch in enumerate(self.plan.freeze_epochs):
            if freeze_epoch == epoch:
                return index
        return None

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "freeze_epochs": list(self.plan.freeze_epochs),
                "T_frz": self.plan.T_frz, "reduction": self.plan.reduction}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise FreezeError(f"freezer state version {state.get('version')} is not "
                              f"{STATE_VERSION}; re-plan with freeze_schedule")
        self.plan = FreezePlan(list(state["freeze_epochs"]), state["T_frz"],
                               float(state["reduction"]))
