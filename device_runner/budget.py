"""Memory budget: measure the process's RSS, plan the batch size, watch it during training.

The budget is on peak RSS of the whole process. Linux keeps the peak (VmHWM in
/proc/self/status) and lets a process reset it (write 5 to /proc/self/clear_refs, Linux
>= 4.0), so a training step's true peak is measured without sampling threads. Planning is
a pure function of measured peaks at two batch sizes.
"""
from __future__ import annotations

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
