"""The one in-memory copy of the model on the device (bundle format 2).

Every parameter and BatchNorm running statistic is one float32 array here, and every
masked weight's mask one uint8 array. The frozen prefix, the trainer, stage changes and
checkpoints all read and write these arrays *in place*: ONNX Runtime reads a contiguous
numpy input without copying it, so no other copy of a weight exists and a change made
by one part (an SGD step, a running-stat update, a mask update) is what every other part
runs with next.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import MASK_SUFFIX
from .weight_store import read_weights


@dataclass
class ModelState:
    weights: dict[str, np.ndarray]     # float32, C-contiguous: parameters and running statistics
    masks: dict[str, np.ndarray]       # uint8 (1 = active), by weight name

    @classmethod
    def load(cls, weights_path: str | Path) -> "ModelState":
        """The model as stored in the bundle's ``weights.safetensors``."""
        weights, masks = read_weights(weights_path)
        return cls({n: _own(w) for n, w in weights.items()}, {n: _own(m) for n, m in masks.items()})

    def array(self, name: str) -> np.ndarray:
        """The live array of a parameter, running statistic or ``<weight>_mask``."""
        if name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] in self.masks:
            return self.masks[name[: -len(MASK_SUFFIX)]]
        try:
            return self.weights[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the model state; the checkpoint or bundle does not "
                           "belong to this model") from None

    def assign(self, name: str, value: np.ndarray) -> None:
        """Write ``value`` into ``name``'s array in place (so everything that holds it sees it)."""
        current = self.array(name)
        value = np.asarray(value)
        if value.shape != current.shape:
            raise ValueError(f"{name}: shape {value.shape} != {current.shape}")
        current[...] = value


def _own(array: np.ndarray) -> np.ndarray:
    """A writable, C-contiguous array that no file or other buffer backs."""
    return np.array(array, copy=True, order="C")
