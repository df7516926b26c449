"""What the two format-2 suffix trainers share: the suffix's arrays *are* the model state's.

``BlockChainTrainer`` (plain ONNX Runtime) and ``OrtBoundaryTrainer`` (the training build)
differ in how a step runs, not in where the weights live: every parameter, ``<weight>_mask``
and running statistic of blocks ``[k, n)`` is one array of the
:class:`~device_runner.model_state.ModelState`, read and written in place. This mixin gives
both the trainer interface's parameter access, the masked SGD update and the npz state file
(the format every backend's checkpoint uses), so those rules exist once.
"""
from __future__ import annotations

import numpy as np

from ..method import sgd as sgd_rule
from ..model_state import ModelState
from .blocks import block_of
from .onnx_step import load_state_file


class StateSuffix:
    """Set by the trainer: ``stage``, ``state``, ``trainable`` (parameter names), ``masked``
    (names of masked weights), ``_names`` (every name the suffix exposes, in order),
    ``momentum_buffers``."""

    stage: object
    state: ModelState
    trainable: list[str]
    masked: set[str]
    _names: list[str]
    momentum_buffers: dict[str, np.ndarray]

    def parameter_names(self) -> list[str]:
        """The suffix's parameters, ``<weight>_mask`` masks and running statistics."""
        return list(self._names)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._known_names():
            raise KeyError(f"{name!r} is not a parameter of the suffix from block {self.stage.k}")
        return self.state.array(name)

    def _known_names(self) -> set[str]:
        known = getattr(self, "_known", None)
        if known is None:
            known = self._known = set(self._names)
        return known

    def get_parameter(self, name: str) -> np.ndarray:
        return np.array(self._array(name), copy=True)

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        self._array(name)
        self.state.assign(name, value)

    def _sgd(self, gradients, lr_of_block: dict[int, float], momentum: float, weight_decay: float) -> None:
        """The shared SGD rule in place on the state's arrays for ``(name, gradient)`` pairs; a
        masked weight's gradient is multiplied by its mask (the graphs hold no masks)."""
        for name, grad in gradients:
            mask = self.state.masks[name] if name in self.masked else None
            sgd_rule.sgd_step(self.state.weights[name], grad, mask, self.momentum_buffers, name,
                              lr_of_block.get(block_of(name), 0.0), momentum, weight_decay)

    def save(self, path) -> None:
        """The suffix's arrays as npz, the format every backend's checkpoint uses."""
        with open(path, "wb") as handle:
            np.savez(handle, **{n: self.state.array(n) for n in self._names})

    def load(self, path) -> None:
        known = self._known_names()
        for name, value in load_state_file(path).items():
            if name in known:
                self.set_parameter(name, value)
