"""One SGD step with momentum and weight decay: PyTorch's ``torch.optim.SGD`` rule.

``v = momentum * v + (g + weight_decay * w);  w -= lr * v`` (dampening 0, no Nesterov),
with weight decay on *every* trainable parameter, BatchNorm scales and shifts and biases
included, exactly as the host trainer's ``torch.optim.SGD(weight_decay=...)`` applies it.
The host runs PyTorch's optimizer; the device backends run this function; the agreement
test (tests/test_agreement.py) holds the two to the same weights.

Masked weights never move: the gradient graph already zeroes their gradient, and
multiplying the step by the mask keeps weight decay from moving them (their value is 0).
"""
from __future__ import annotations

import numpy as np


def sgd_step(weight: np.ndarray, grad: np.ndarray, mask: np.ndarray | None,
             momentum_buffers: dict[str, np.ndarray], name: str, lr: float, momentum: float,
             weight_decay: float) -> None:
    """Update ``weight`` in place; ``momentum_buffers[name]`` is created on the first step.

    One scratch array per call (the products are written into it), not one per operation: on
    resnet18's suffix the temporaries were 2-3 copies of a 9 MB weight at once. The arithmetic
    is unchanged (IEEE products and sums commute), so the host agreement still holds bit for bit.
    """
    if weight_decay:
        scratch = np.multiply(weight, weight_decay, dtype=np.float32)
        scratch += grad.astype(np.float32, copy=False)      # summed in float32, as before
    else:
        scratch = grad.astype(np.float32, copy=True)
    if mask is not None:
        scratch *= mask
    step = scratch
    if momentum:
        buffer = momentum_buffers.get(name)
        if buffer is None:
            # PyTorch's first step stores the step itself as the buffer.
            buffer = momentum_buffers[name] = scratch.copy()
        else:
            buffer *= momentum
            buffer += scratch
        step = buffer
    if lr:
        np.multiply(step, lr, out=scratch)
        weight -= scratch
