"""Prune-and-grow on the device: the shared rules (``method.dst``) applied to a suffix backend.

Masks are non-trainable parameters of the suffix (``<weight>_mask``, 1 = active) that the
training graphs multiply into the weights, so changing a mask needs no re-export. At an
update epoch the loop calls :func:`begin_update` before its first step and
:func:`end_update` after its last, exactly where the host trainer calls its hooks: MEST
grows at the start and prunes |w| + λ|g| back to each layer's target count at the end;
SET and RigL swap at the start. RigL's dense gradient comes from one extra batch with
every mask opened (:func:`dense_gradients`), as on the host.
"""
from __future__ import annotations

import numpy as np

from .method import dst as rules


def target_zeros(trainer) -> dict[str, int]:
    """Each masked weight's exact number of inactive positions (its sparsity target)."""
    return {weight: int(np.count_nonzero(trainer.get_parameter(mask) < 0.5))
            for mask, weight in trainer.stage.masks}


def dense_gradients(trainer, features: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient of each effective weight ``w * mask`` at every position, on one batch.

    With every mask set to 1 the forward pass is unchanged (inactive weights are exactly
    zero) and the weight gradient is the dense one. Masks, BatchNorm statistics and the
    last step's gradients are restored, so this batch leaves no trace on training.
    """
    state_names = [n for n in trainer.parameter_names() if n not in set(trainer.trainable)]
    saved = {n: trainer.get_parameter(n) for n in state_names}
    saved_grads = {w: trainer.gradient(w) for _, w in trainer.stage.masks}
    try:
        for mask, _ in trainer.stage.masks:
            trainer.set_parameter(mask, np.ones_like(saved[mask]))
        trainer.train_step(features, labels)
        return {w: trainer.gradient(w) for _, w in trainer.stage.masks}
    finally:
        for name, value in saved.items():
            trainer.set_parameter(name, value)


def _layers(trainer, targets: dict[str, int], dense: dict[str, np.ndarray] | None):
    for mask_name, weight_name in trainer.stage.masks:
        yield mask_name, rules.Layer(weight_name, trainer.get_parameter(weight_name),
                                     trainer.get_parameter(mask_name) > 0.5, targets[weight_name],
                                     grad=trainer.gradient(weight_name),
                                     dense_grad=None if dense is None else dense[weight_name])


def _apply(trainer, mask_name: str, layer: rules.Layer, change: rules.LayerChange) -> None:
    """New mask; weight and momentum restart at zero where the rule says."""
    weight = layer.weight
    weight[change.reset] = 0.0
    trainer.set_parameter(layer.name, weight)
    trainer.set_parameter(mask_name, change.mask)
    buffer = trainer.momentum_buffers.get(layer.name)
    if buffer is not None:
        buffer[change.reset] = 0.0


def begin_update(trainer, algorithm: rules.Algorithm, fraction: float, rng: np.random.Generator,
                 targets: dict[str, int], dense: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """The start-of-epoch hook on every masked layer of the suffix; weights grown per layer."""
    return _run(trainer, algorithm.begin, fraction, rng, targets, dense)


def end_update(trainer, algorithm: rules.Algorithm, fraction: float, rng: np.random.Generator,
               targets: dict[str, int]) -> dict[str, int]:
    """The end-of-epoch hook (MEST prunes back to target); weights pruned per layer."""
    return _run(trainer, algorithm.end, fraction, rng, targets, None)


def _run(trainer, hook, fraction, rng, targets, dense) -> dict[str, int]:
    changed = {}
    for mask_name, layer in _layers(trainer, targets, dense):
        change = hook(layer, fraction, rng)
        if change is not None:
            _apply(trainer, mask_name, layer, change)
            changed[layer.name] = change.swapped
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
