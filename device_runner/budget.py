"""Memory budget: measure the process's RSS, plan the batch size, watch it during training.

The budget is on peak RSS of the whole process. Linux keeps the peak (VmHWM in
/proc/self/status) and lets a process reset it (write 5 to /proc/self/clear_refs, Linux
>= 4.0), so a training step's true peak is measured without sampling threads. Planning is
a pure function of measured peaks at two batch sizes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import psutil

from .errors import BudgetError

_STATUS = "/proc/self/status"


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak` (or process start)."""
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int
    predicted_peak_mb: float
    base_mb: float
    per_sample_mb: float
    budget_mb: float
    reason: str


def plan_batch(peaks: dict[int, float], budget_mb: float, headroom: float, max_batch: int,
               extra_mb: float = 0.0) -> BatchPlan:
    """Largest batch (a power of two, at most ``max_batch``) whose predicted peak fits.

    ``peaks`` maps measured batch sizes to measured peak RSS (MB); a line through them
    predicts larger batches. ``headroom`` is the fraction of the budget kept free for
    allocator noise, evaluation and checkpoints; ``extra_mb`` is memory planned for other
    uses (the feature cache).
    """
    sizes = sorted(peaks)
    if len(sizes) >= 2 and sizes[-1] != sizes[0]:
        slope = max(0.0, (peaks[sizes[-1]] - peaks[sizes[0]]) / (sizes[-1] - sizes[0]))
    else:
        slope = 0.0
    base = peaks[sizes[0]] - slope * sizes[0]
    usable = budget_mb * (1.0 - headroom) - extra_mb
    if base + slope > usable:
        raise BudgetError(
            f"a training step with batch 1 needs about {base + slope:.0f} MB of RSS "
            f"({base:.0f} MB of runtime, model and data plus {slope:.2f} MB per sample"
            f"{f', {extra_mb:.0f} MB of feature cache' if extra_mb else ''}) but the profile "
            f"allows {budget_mb:.0f} MB with {headroom:.0%} headroom; raise budgets.memory_mb, "
            "use a smaller model or a later stage, or load less data")
    best = 1
    size = 1
    while size * 2 <= max_batch and base + slope * size * 2 <= usable:
        size *= 2
        best = size
    if max_batch > best and base + slope * max_batch <= usable and math.log2(max_batch) % 1:
        best = max_batch
    reason = (f"largest batch <= {max_batch} with predicted peak <= {usable:.0f} MB "
              f"({budget_mb:.0f} MB budget, {headroom:.0%} headroom)")
    return BatchPlan(best, base + slope * best, base, slope, budget_mb, reason)


def probe_batch_sizes(max_batch: int) -> list[int]:
    """The two batch sizes whose measured peaks :func:`plan_batch` draws its line through."""
    return sorted({1 if max_batch < 4 else 2, min(max_batch, 8)})


def measure_step_peak_mb(trainer, features_of, labels, indices, momentum: float, weight_decay: float,
                         steps: int = 1) -> float:
    """Peak RSS (MB) of prefix + train step + SGD on ``indices``; the trainer's weights and
    momentum are restored after, so planning leaves no trace in the run.

    ``features_of(indices)`` runs the prefix without the feature cache (the worst case).
    """
    saved = {n: trainer.get_parameter(n) for n in trainer.parameter_names()}
    saved_momentum = copy.deepcopy(trainer.momentum_buffers)
    reset_peak()
    for _ in range(steps):
        trainer.train_step(features_of(indices), labels[indices])
        trainer.sgd_step({}, momentum, weight_decay)
    peak = peak_rss_mb()
    for name, value in saved.items():
        trainer.set_parameter(name, value)
    trainer.momentum_buffers = saved_momentum
    return peak


def plan_with_cache(peaks: dict[int, float], budget_mb: float, headroom: float, max_batch: int,
                    cache_mb: float) -> tuple[BatchPlan, bool]:
    """The batch plan with ``cache_mb`` of feature cache beside training, or, when only training
    fits, the plan without it and False (the caller drops the cache)."""
    try:
        return plan_batch(peaks, budget_mb, headroom, max_batch, cache_mb), True
    except BudgetError:
        if not cache_mb:
            raise
        return plan_batch(peaks, budget_mb, headroom, max_batch, 0.0), False


def check_forced_batch(plan: BatchPlan, forced_batch: int | None) -> None:
    """BudgetError when ``--batch-size`` asks for more than the memory budget allows."""
    if forced_batch is not None and plan.batch_size < forced_batch:
        raise BudgetError(f"--batch-size {forced_batch} is predicted to need "
                          f"{plan.base_mb + plan.per_sample_mb * forced_batch:.0f} MB; the "
                          f"memory budget allows batch {plan.batch_size}; drop --batch-size or raise "
                          "budgets.memory_mb")


def plan_record(plan: BatchPlan, peaks: dict[int, float], cache_mb: float) -> dict:
    """The plan as stored in checkpoints and report.json (``plan``)."""
    return {"batch_size": plan.batch_size, "predicted_peak_mb": round(plan.predicted_peak_mb, 1),
            "base_mb": round(plan.base_mb, 1), "per_sample_mb": round(plan.per_sample_mb, 3),
            "measured_peaks_mb": {str(b): round(p, 1) for b, p in peaks.items()},
            "budget_mb": plan.budget_mb, "reason": plan.reason,
            "cache_planned_mb": round(cache_mb, 1)}
