"""Dynamic sparse training on the device: prune-and-grow by editing the training state.

Masks are non-trainable checkpoint parameters (``<weight>_mask``, float32, 1 = active)
that the graph multiplies into the weights, so changing a mask needs no re-export. Each
update, per masked layer, prunes the ``n`` active weights with the smallest score and grows
``n`` positions that were inactive before the update, so every layer keeps exactly its
number of active weights (sparsity is exact). A grown weight starts at zero with zero
momentum (RigL, MEST). Scores: ``set`` |w|; ``mest`` |w| + λ|g| with the last step's
gradient. RigL needs dense gradients of masked weights, which the masked graph does not
produce, so ``rigl`` bundles are updated as ``set`` on the device (reported).

Pure functions on numpy arrays; the loop passes a ``numpy.random.Generator``.
"""
from __future__ import annotations

import math

import numpy as np

DEVICE_ALGORITHMS = {"set": "set", "mest": "mest", "rigl": "set", "static": "static"}


def update_fraction(base: float, epoch: int, end_epoch: int) -> float:
    """Cosine-decayed fraction of active weights exchanged at ``epoch`` (RigL's schedule)."""
    if end_epoch <= 0 or epoch >= end_epoch:
        return 0.0
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / end_epoch))


def prune_and_grow(weight: np.ndarray, mask: np.ndarray, fraction: float, rng: np.random.Generator,
                   grad: np.ndarray | None = None, lam: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New ``(weight, mask, grown)`` for one layer; ``grown`` is a bool array of regrown positions.

    The number of active positions is unchanged. Pruned weights become zero.
    """
    flat_mask = mask.reshape(-1) > 0.5
    active = np.flatnonzero(flat_mask)
    inactive = np.flatnonzero(~flat_mask)
    count = min(int(round(fraction * active.size)), inactive.size)
    new_weight = weight.reshape(-1).copy()
    new_mask = flat_mask.copy()
    grown = np.zeros_like(flat_mask)
    if count > 0:
        score = np.abs(new_weight[active])
        if grad is not None:
            score = score + lam * np.abs(grad.reshape(-1)[active])
        # Random tie-break so layers full of equal scores do not always prune the same rows.
        order = np.lexsort((rng.random(active.size), score))
        pruned = active[order[:count]]
        regrow = rng.choice(inactive, size=count, replace=False)
        new_mask[pruned] = False
        new_weight[pruned] = 0.0
        new_mask[regrow] = True
        new_weight[regrow] = 0.0
        grown[regrow] = True
    return (new_weight.reshape(weight.shape), new_mask.reshape(mask.shape).astype(mask.dtype),
            grown.reshape(mask.shape))


def apply_update(trainer, fraction: float, rng: np.random.Generator, algorithm: str = "set",
                 lam: float = 1.0) -> dict:
    """Prune-and-grow every masked layer of ``trainer``'s suffix; returns counts per layer."""
    kind = DEVICE_ALGORITHMS.get(algorithm, "set")
    changed = {}
    if kind == "static" or fraction <= 0:
        return changed
    for mask_name, weight_name in trainer.stage.masks:
        weight = trainer.get_parameter(weight_name)
        mask = trainer.get_parameter(mask_name)
        grad = trainer.gradient(weight_name) if kind == "mest" else None
        new_weight, new_mask, grown = prune_and_grow(weight, mask, fraction, rng, grad, lam)
        trainer.set_parameter(weight_name, new_weight)
        trainer.set_parameter(mask_name, new_mask)
        buffer = trainer.momentum_buffers.get(weight_name)
        if buffer is not None:
            buffer[grown] = 0.0
            buffer[new_mask < 0.5] = 0.0
        changed[weight_name] = int(grown.sum())
    return changed


def sparsity_report(trainer) -> dict:
    """Active/total per masked layer and whether every masked-out weight is exactly zero."""
    active = total = stray = 0
    for mask_name, weight_name in trainer.stage.masks:
        mask = trainer.get_parameter(mask_name) > 0.5
        weight = trainer.get_parameter(weight_name)
        active += int(mask.sum())
        total += mask.size
        stray += int(np.count_nonzero(weight[~mask]))
    # A suffix without masked layers (e.g. a dense head) has no sparsity to report.
    return {"active": active, "total": total, "sparsity": 1.0 - active / total if total else None,
            "masked_nonzero": stray}
