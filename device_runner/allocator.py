"""glibc's malloc, set for a process that trains: memory a step frees goes back to the system.

By default glibc raises its mmap threshold to the size of the largest block freed so far
(up to 32 MB), so after the first step's gradients are freed, arrays of that size come from
the heap and their pages stay with the process: peak RSS grows by tens of MB over the first
steps. A fixed threshold keeps large arrays on mmap, returned when freed. At 8 MB (about a
512x512x3x3 float32 weight) the step time did not move and resnet18's suffix peaked at
294 MB instead of 339 (docs/benchmarks.md §8); at 4 MB the per-op activations of resnet32 x2
were mapped and unmapped every step (7-9 % slower). Other C libraries: nothing is changed.
"""
from __future__ import annotations

import ctypes
import gc

M_MMAP_THRESHOLD = -3                 # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 8 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:                   # not glibc (musl, macOS): nothing to set
        return None


def return_large_frees(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def release_freed_memory() -> None:
    """Hand memory freed by temporary work (the int8 quantizer's sessions) back to the system
    now: glibc keeps it otherwise (300 MB of peak RSS for resnet32 x2's first eight blocks)."""
    gc.collect()                      # the quantizer's sessions sit in reference cycles
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
