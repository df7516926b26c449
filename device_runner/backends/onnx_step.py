"""The sparse suffix trained by plain ``onnxruntime`` running the bundle's ``step.onnx``.

``step.onnx`` is one whole training step in standard ONNX operators (exported by
spfde_edge/export/step_graph.py): parameters, masks, BatchNorm running statistics, features
and labels in; loss, logits, updated running statistics and one gradient per parameter out.
It needs only the inference build of ONNX Runtime, which has wheels for aarch64 (Raspberry
Pi OS, Jetson) where the training build has none. The state lives here as numpy arrays;
the update is the same numpy SGD as the ORT-training backend's, so the two agree step by
step. Evaluation runs the stage's ``eval_model.onnx`` (standard operators, parameters as
inputs) in an inference session.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._ort import inference_options, onnxruntime

from ..bundle import Stage
from ..errors import BundleError
from ..method import sgd as sgd_rule
from .blocks import block_of

LOSS, LOGITS = "loss", "logits"
NEW_SUFFIX, GRAD_SUFFIX = ".new", ".grad"


def _session(path: Path, threads: int, what: str):
    try:
        return onnxruntime.InferenceSession(os.fspath(path), inference_options(threads),
                                            providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise BundleError(f"ONNX Runtime cannot load the {what} {path.name}: "
                          f"{str(exc).splitlines()[0][:300]}; re-export the bundle") from exc


def load_state_file(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a suffix state (``suffix_state.npz`` in a bundle or a device checkpoint)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"suffix state {path} is unreadable ({exc}); copy the bundle again") from exc


class StepGraphTrainer:
    """Train/eval steps of one stage's suffix with ``step.onnx`` on plain onnxruntime."""

    name = "onnxruntime"

    def __init__(self, stage: Stage, threads: int, checkpoint: Path | None = None):
        if stage.step_model is None or stage.step_state is None:
            raise BundleError(f"stage {stage.k} has no standard-ONNX training step (step.onnx); "
                              "re-export the bundle with this spfde_edge (without --no-step-graph)")
        self.stage = stage
        self.session = _session(stage.step_model, threads, "training step graph")
        self.eval_session = _session(stage.eval_model, threads, "eval graph")
        self.values = load_state_file(stage.step_state)
        if checkpoint is not None:
            self.load(checkpoint)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in self.inputs[:-2] if n not in self.values]
        if missing or self.outputs[:2] != [LOSS, LOGITS]:
            raise BundleError(f"stage {stage.k}: step.onnx does not match its state file "
                              f"(missing {missing[:3]}); re-export the bundle")
        self.eval_inputs = [i.name for i in self.eval_session.get_inputs()]
        self.trainable = list(stage.parameters)
        self.mask_of = {weight: mask for mask, weight in stage.masks}
        self.grads: dict[str, np.ndarray] = {}
        self.momentum_buffers: dict[str, np.ndarray] = {}

    # --- parameters ----------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        return list(self.values)

    def get_parameter(self, name: str) -> np.ndarray:
        return np.array(self.values[name], copy=True)

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        current = self.values[name]
        value = np.asarray(value, dtype=current.dtype)
        if value.shape != current.shape:
            raise ValueError(f"{name}: shape {value.shape} != {current.shape}")
        self.values[name] = np.array(value, copy=True)

    def gradient(self, name: str) -> np.ndarray | None:
        grad = self.grads.get(name)
        return None if grad is None else np.array(grad, copy=True)

    # --- steps -----------------------------------------------------------------------------
    def _feeds(self, names: list[str], features: np.ndarray, labels: np.ndarray) -> dict:
        feeds = {n: self.values[n] for n in names if n in self.values}
        feeds["features"] = np.ascontiguousarray(features, dtype=np.float32)
        feeds["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
        return feeds

    def train_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward + backward; gradients kept for :meth:`sgd_step`, running statistics updated."""
        self.grads = {}      # the last step's gradients are not held through this one (block_chain.py)
        results = self.session.run(None, self._feeds(self.inputs, features, labels))
        for name, value in zip(self.outputs[2:], results[2:]):
            if name.endswith(GRAD_SUFFIX):
                self.grads[name[: -len(GRAD_SUFFIX)]] = value
            elif name.endswith(NEW_SUFFIX):
                self.values[name[: -len(NEW_SUFFIX)]] = value
        return float(results[0]), results[1]

    def sgd_step(self, lr_of_block: dict[int, float], momentum: float, weight_decay: float) -> None:
        for name in self.trainable:
            grad = self.grads.get(name)
            if grad is None:
                continue
            mask = self.values[self.mask_of[name]] if name in self.mask_of else None
            sgd_rule.sgd_step(self.values[name], grad, mask, self.momentum_buffers, name,
                              lr_of_block.get(block_of(name), 0.0), momentum, weight_decay)

    def eval_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        loss, logits = self.eval_session.run(None, self._feeds(self.eval_inputs, features, labels))[:2]
        return float(loss), logits

    # --- state -----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **self.values)

    def load(self, path: Path) -> None:
        saved = load_state_file(path)
        for name, value in saved.items():
            if name in self.values:
                self.set_parameter(name, value)
