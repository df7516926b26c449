"""SGD with momentum and weight decay in numpy, shared by every suffix backend.

The backends differ only in how they compute gradients; the update is this one function,
so a run gives the same weights on either backend (and a checkpoint written by one resumes
on the other).
"""
from __future__ import annotations

import numpy as np


def block_of(name: str) -> int:
    """Block index of a parameter named ``blocks.<i>.…``."""
    return int(name.split(".")[1])


def sgd_update(weight: np.ndarray, grad: np.ndarray, mask: np.ndarray | None,
               momentum_buffers: dict[str, np.ndarray], name: str, lr: float, momentum: float,
               weight_decay: float) -> None:
    """``v = mu v + g + wd w; w -= lr v`` in place on ``weight``; masked positions never move.

    Weight decay applies to weights (ndim > 1) only, as in the host trainer. The graph
    already zeroes masked gradients; multiplying the step by the mask keeps weight decay
    from moving them too.
    """
    step = grad.astype(np.float32, copy=True)
    if weight_decay and weight.ndim > 1:
        step += weight_decay * weight
    if mask is not None:
        step *= mask
    if momentum:
        buffer = momentum_buffers.get(name)
        if buffer is None:
            buffer = momentum_buffers[name] = np.zeros_like(weight)
        buffer *= momentum
        buffer += step
        step = buffer
    if lr:
        weight -= lr * step
