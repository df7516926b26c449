"""Bundle format 2 on ONNX Runtime's training build: a boundary's artifacts, the state's weights.

A format-2 bundle carries, for every block boundary k, ORT training artifacts of blocks
``[k, n)`` *without weights* (spfde_edge/export/ort_artifacts.py). Entering boundary k this
trainer writes the checkpoint from the model state's arrays (``ort_checkpoint.write_checkpoint``),
loads it, and then points the state at ORT's own parameter buffers
(``Parameter.data.numpy()`` is a view of them), so the weights still exist once in RAM: the
prefix chain, stage changes and checkpoints keep reading and writing the state as with the
block-chain backend. :meth:`release` hands the arrays back (copies) before the trainer goes.

The update is the shared numpy SGD in place on ORT's buffers, with the gradient masked
(the graphs hold no masks); BatchNorm running statistics follow PyTorch's rule from the
batch statistics the training graph returns (ORT 1.19's kernel moves them itself with the
biased variance, so the device's values are written back after every step).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..bundle import Stage
from ..errors import BundleError
from ..model_state import ModelState
from .ort_checkpoint import write_checkpoint
from .ort_training import C, moved_running_stat, run_module, session_options
from .state_suffix import StateSuffix


class OrtBoundaryTrainer(StateSuffix):
    """Blocks ``[k, n)`` on ORT training artifacts built for boundary k; the trainer interface."""

    name = "onnxruntime-training (format 2)"

    @classmethod
    def factory(cls, bundle, threads: int | None):
        """``make(stage, blocks, state, sessions, checkpoint)``: the format-2 trainer signature
        stage_pipeline.py builds trainers with."""
        boundaries = {entry.k: entry for entry in bundle.manifest.ort_training}

        def make(stage, blocks, state, sessions, checkpoint=None):
            return cls(stage, boundaries[stage.k], bundle.root, state, threads, checkpoint)

        make.name = cls.name
        return make

    def __init__(self, stage: Stage, boundary, root: Path, state: ModelState, threads: int | None,
                 checkpoint: Path | None = None):
        if not hasattr(C, "load_checkpoint"):
            raise BundleError("this onnxruntime has no training support (the inference build); set "
                              "suffix_backend: onnxruntime in the profile, or install "
                              "onnxruntime-training-cpu on x86_64")
        self.stage, self.boundary, self.state = stage, boundary, state
        self.trainable = list(boundary.parameters)
        self.masked = {w for _, w in stage.masks}
        self._mask_names = {m: w for m, w in stage.masks}
        self._bound = list(boundary.parameters) + list(boundary.frozen)
        self._names = self.trainable + list(self._mask_names) + list(boundary.frozen)
        missing = [n for n in self._bound if n not in state.weights]
        if missing:
            raise BundleError(f"ORT boundary {stage.k} needs {missing[:3]}, which the weight store "
                              "does not hold; re-export the bundle")
        with tempfile.TemporaryDirectory(prefix="spfde-ort-") as tmp:
            path = Path(tmp) / "checkpoint"
            write_checkpoint(path, {n: state.weights[n] for n in boundary.parameters},
                             {n: state.weights[n] for n in boundary.frozen})
            try:
                self.checkpoint_state = C.load_checkpoint(os.fspath(path))
                device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
                self.module = C.Module(os.fspath(root / boundary.training_model), self.checkpoint_state,
                                       os.fspath(root / boundary.eval_model), device, session_options(threads))
            except RuntimeError as exc:
                raise BundleError(f"ONNX Runtime cannot load the training artifacts of boundary {stage.k}: "
                                  f"{str(exc).splitlines()[0][:300]}; re-export the bundle") from exc
        # One copy: from here on the state's arrays of the suffix are ORT's buffers.
        self._views = {name: self.checkpoint_state.get_parameter(name).data.numpy() for name in self._bound}
        state.weights.update(self._views)
        self.running = {n: np.array(state.weights[n], copy=True) for n in boundary.frozen}
        outputs = list(boundary.training_outputs)
        self._stat_index = [(row, outputs.index(row.batch_mean_output), outputs.index(row.batch_var_output))
                            for row in boundary.batchnorms]
        self.momentum_buffers: dict[str, np.ndarray] = {}
        if checkpoint is not None:
            self.load(checkpoint)

    def release(self) -> None:
        """Give the state its own arrays again (the trainer and its ORT buffers are going)."""
        for name, view in self._views.items():
            if self.state.weights.get(name) is view:   # not taken over by a successor's buffer
                self.state.weights[name] = np.array(view, copy=True)
        self._views = {}

    # --- parameters (state_suffix.py) ---------------------------------------------------------
    def set_parameter(self, name: str, value: np.ndarray) -> None:
        super().set_parameter(name, value)
        if name in self.running:
            self.running[name] = np.array(value, dtype=np.float32, copy=True)

    def gradient(self, name: str) -> np.ndarray | None:
        grad = self.checkpoint_state.get_parameter(name).grad if name in self.trainable else None
        if grad is None or not grad.has_value():
            return None
        grad = np.array(grad.numpy(), copy=True)
        return grad * self.state.masks[name] if name in self.masked else grad

    # --- steps -----------------------------------------------------------------------------
    def train_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        fetches, loss, logits = run_module(self.module, features, labels, train=True)
        for row, mean_at, var_at in self._stat_index:
            for name, at in ((row.running_mean, mean_at), (row.running_var, var_at)):
                self.running[name] = moved_running_stat(self.running[name], fetches[at].numpy(), row.momentum)
                np.copyto(self.state.weights[name], self.running[name])
        return loss, logits

    def sgd_step(self, lr_of_block: dict[int, float], momentum: float, weight_decay: float) -> None:
        grads = ((name, self.checkpoint_state.get_parameter(name).grad) for name in self.trainable)
        self._sgd(((name, grad.numpy()) for name, grad in grads if grad.has_value()),
                  lr_of_block, momentum, weight_decay)

    def eval_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        _, loss, logits = run_module(self.module, features, labels, train=False)
        return loss, logits

    # --- state -----------------------------------------------------------------------------
    def save(self, path) -> None:
        for name, value in self.running.items():
            np.copyto(self.state.weights[name], value)
        super().save(path)

