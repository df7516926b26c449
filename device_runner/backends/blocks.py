"""Each suffix parameter's block, which picks its learning rate in the SGD step.

The SGD update itself is defined once in :mod:`device_runner.method.sgd` (PyTorch's rule,
as on the host); the backends call it on their own parameter buffers.
"""
from __future__ import annotations


def block_of(name: str) -> int:
    """Block index of a parameter named ``blocks.<i>.…`` (the exporter's naming)."""
    return int(name.split(".")[1])
