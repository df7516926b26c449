"""Sparse weights for SpFDE: masks and their invariants (``masks``), and how and when
dynamic sparse training changes them (``dst``, the shared rules applied to a model)."""
from spfde_edge.sparsity.dst import (DSTAlgorithm, ScheduleError, UpdateSchedule, available_algorithms,
                                     dense_gradient, frozen_names, get_algorithm)
from spfde_edge.sparsity.masks import MaskSet, SparsityError, erk_densities, target_zero_counts

__all__ = [
    "DSTAlgorithm", "MaskSet", "ScheduleError", "SparsityError", "UpdateSchedule", "available_algorithms",
    "dense_gradient", "erk_densities", "frozen_names", "get_algorithm", "target_zero_counts",
]
