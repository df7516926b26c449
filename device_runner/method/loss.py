"""The training loss, cross entropy averaged over the batch: PyTorch's ``F.cross_entropy``.

The block programs end at the logits, so the device computes the loss and its gradient
here, once, for every trainer that chains blocks. float64 inside: the log-softmax of
large logits stays exact to float32 and the gradient sums to zero per sample.
"""
from __future__ import annotations

import numpy as np


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean loss, d loss / d logits as float32) for logits ``[N, C]`` and int labels ``[N]``."""
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"cross_entropy takes logits [N, C] and labels [N], got {list(z.shape)} "
                         f"and {list(labels.shape)}")
    rows = np.arange(z.shape[0])
    shifted = z - z.max(axis=1, keepdims=True)        # log-softmax without overflow
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[rows, labels].mean()
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    grad /= z.shape[0]
    return float(loss), grad.astype(np.float32)
