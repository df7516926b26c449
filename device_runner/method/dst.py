"""How prune-and-grow changes a layer's mask: ``static``, ``set``, ``rigl``, ``mest``.

Each algorithm is two hooks around an update epoch (see :class:`.schedule.UpdateSchedule`
for *when*): ``begin`` at its start, ``end`` at its end. A hook looks at one masked layer
and returns a :class:`LayerChange`: the new mask and the positions whose weight, gradient
and optimizer momentum restart at zero (a regrown weight starts clean, RigL §3, MEST §4).

* ``set`` (Mocanu et al. 2018): at the start, drop the k smallest |w| and grow k random
  positions that were inactive before the drop;
* ``rigl`` (Evci et al. 2020): as set, but grow where the dense gradient (the gradient of
  the effective weight ``w * mask``, inactive positions included) is largest;
* ``mest`` (Yuan et al. 2021, elastic mutation with soft memory bound): grow k random
  positions at the start, so the layer trains one epoch above its target count, and at
  the end prune back to the target by the score |w| + λ|g| (g: the last step's gradient);
* ``static``: the mask never changes.

k = round(fraction * active), capped by the free positions. Ranking ties are broken by
position (the lower flat index first), so host and device pick the same weights.
Everything is numpy; the host trainer and the device runner call these same functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Layer:
    """One masked weight as prune-and-grow sees it."""

    name: str
    weight: np.ndarray
    mask: np.ndarray                        # bool, True = active
    target_zeros: int                       # the layer's exact number of inactive weights
    grad: np.ndarray | None = None          # last step's gradient (MEST's |g|)
    dense_grad: np.ndarray | None = None    # gradient of w * mask at every position (RigL)


@dataclass(frozen=True)
class LayerChange:
    mask: np.ndarray       # the new bool mask
    reset: np.ndarray      # bool: weight, gradient and momentum restart at zero here
    swapped: int           # weights grown (begin) or pruned (end)


def swap_count(mask: np.ndarray, fraction: float) -> int:
    """k = round(fraction * active), capped by the inactive positions there are to grow into."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"update fraction must be in [0, 1], got {fraction}")
    active = int(np.count_nonzero(mask))
    return min(int(round(fraction * active)), mask.size - active)


def smallest(scores: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` lowest scores among the ``among`` positions (ties: lower index)."""
    candidates = np.flatnonzero(among)
    order = np.argsort(scores.reshape(-1)[candidates], kind="stable")
    return candidates[order[:k]]


def largest(scores: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` highest scores among ``among`` (ties: lower index)."""
    candidates = np.flatnonzero(among)
    order = np.argsort(-scores.reshape(-1)[candidates], kind="stable")
    return candidates[order[:k]]


def random_positions(among: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct flat indices drawn uniformly from the ``among`` positions."""
    candidates = np.flatnonzero(among)
    return candidates[rng.permutation(candidates.size)[:k]]


def _positions(indices: np.ndarray, like: np.ndarray) -> np.ndarray:
    flat = np.zeros(like.size, dtype=bool)
    flat[indices] = True
    return flat.reshape(like.shape)


class Algorithm:
    """A prune-and-grow rule; the default hooks change nothing (``static``)."""

    name = "static"
    needs_dense_gradient = False

    def begin(self, layer: Layer, fraction: float, rng: np.random.Generator) -> LayerChange | None:
        return None

    def end(self, layer: Layer, fraction: float, rng: np.random.Generator) -> LayerChange | None:
        return None


class _PruneThenGrow(Algorithm):
    """SET and RigL: swap k weights at the start of the update epoch."""

    def _grow(self, layer: Layer, candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must say how it grows weights")

    def begin(self, layer, fraction, rng):
        mask = layer.mask.astype(bool)
        k = swap_count(mask, fraction)
        if k == 0:
            return None
        pruned = _positions(smallest(np.abs(layer.weight), mask, k), mask)
        grown = _positions(self._grow(layer, ~mask, k, rng), mask)
        return LayerChange((mask & ~pruned) | grown, pruned | grown, k)


class SET(_PruneThenGrow):
    name = "set"

    def _grow(self, layer, candidates, k, rng):
        return random_positions(candidates, k, rng)


class RigL(_PruneThenGrow):
    name = "rigl"
    needs_dense_gradient = True

    def _grow(self, layer, candidates, k, rng):
        if layer.dense_grad is None:
            raise ValueError(f"rigl needs the dense gradient of '{layer.name}' (the gradient of "
                             "weight * mask at every position) to grow")
        return largest(np.abs(layer.dense_grad), candidates, k)


class MEST(Algorithm):
    """Grow at the start of the update epoch, prune |w| + λ|g| back to the target at its end."""

    name = "mest"

    def __init__(self, lam: float = 1.0):
        if not lam >= 0:
            raise ValueError(f"mest lambda must be >= 0, got {lam}")
        self.lam = float(lam)

    def begin(self, layer, fraction, rng):
        mask = layer.mask.astype(bool)
        k = swap_count(mask, fraction)
        if k == 0:
            return None
        grown = _positions(random_positions(~mask, k, rng), mask)
        return LayerChange(mask | grown, grown, k)

    def end(self, layer, fraction, rng):
        mask = layer.mask.astype(bool)
        excess = layer.target_zeros - (mask.size - int(np.count_nonzero(mask)))
        if excess <= 0:
            return None
        score = np.abs(layer.weight)
        if layer.grad is not None and self.lam:
            score = score + self.lam * np.abs(layer.grad)
        pruned = _positions(smallest(score, mask, excess), mask)
        return LayerChange(mask & ~pruned, pruned, excess)


ALGORITHMS: dict[str, type[Algorithm]] = {"static": Algorithm, "set": SET, "rigl": RigL, "mest": MEST}


def get_algorithm(name: str, lam: float = 1.0) -> Algorithm:
    """The algorithm called ``name``; an unknown name is an error, never a silent substitute."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown DST algorithm '{name}'; choose one of {', '.join(sorted(ALGORITHMS))}")
    return MEST(lam) if name == "mest" else ALGORITHMS[name]()
