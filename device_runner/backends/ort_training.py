"""The sparse suffix on ONNX Runtime on-device training, through ``onnxruntime.capi`` only.

``import onnxruntime.training`` pulls in torch (its optimizer helpers import it), so this
module uses the pybind classes those wrappers are made of: ``load_checkpoint``, ``Module``,
``save_checkpoint``. The bundle's ``optimizer_model.onnx`` is plain SGD with one learning
rate; the runner needs a learning rate per block, momentum and weight decay, so the update
is done here in numpy, in place on the checkpoint's parameter buffers
(``Parameter.data.numpy()`` is a view of them), with no copy of the weights.

BatchNorm: ORT training normalises with batch statistics but does not maintain running
statistics usefully (ORT 1.19's CPU kernel moves the checkpoint values itself, with the
biased variance; see spfde_edge/export/suffix.py). The training graph returns each
BatchNorm's batch mean and unbiased variance; the device keeps its own running copy,
updates it with PyTorch's rule and writes it back after every step.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._ort import configure, onnxruntime

from ..bundle import Stage
from ..errors import BundleError
from .onnx_step import load_state_file
from ..method import sgd as sgd_rule
from .blocks import block_of

C = onnxruntime.capi._pybind_state
C.set_default_logger_severity(3)  # ORT warns about benign shape merges on every load


def session_options(threads: int) -> "C.SessionOptions":
    return configure(C.SessionOptions(), threads)


def run_module(module, features: np.ndarray, labels: np.ndarray, train: bool):
    """One ORT training-module call on a batch: (fetches, loss, a copy of the logits); a train
    step keeps its gradients in ORT (reset first) and fetches the batch statistics too."""
    fetches = C.OrtValueVector()
    inputs = [np.ascontiguousarray(features, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.int64)]
    if train:
        module.lazy_reset_grad()
        module.train_step(inputs, fetches)
    else:
        module.eval_step(inputs, fetches)
    return fetches, float(fetches[0].numpy()), np.array(fetches[1].numpy(), copy=True)


def moved_running_stat(running: np.ndarray, batch: np.ndarray, momentum: float) -> np.ndarray:
    """PyTorch's BatchNorm rule: ``(1 - momentum) * running + momentum * batch`` (unbiased variance)."""
    return ((1.0 - momentum) * running + momentum * batch).astype(np.float32)


class SuffixTrainer:
    """Train/eval steps of one stage's suffix, parameters by name, SGD with momentum in numpy."""

    name = "onnxruntime-training"

    def __init__(self, stage: Stage, threads: int, checkpoint: Path | None = None):
        self.stage = stage
        path = stage.checkpoint
        if not hasattr(C, "load_checkpoint"):
            raise BundleError("this onnxruntime has no training support (the inference build); "
                              "set suffix_backend: onnxruntime in the profile, or install "
                              "onnxruntime-training-cpu on x86_64")
        try:
            self.state = C.load_checkpoint(os.fspath(path))
            device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
            self.module = C.Module(os.fspath(stage.training_model), self.state,
                                   os.fspath(stage.eval_model), device, session_options(threads))
        except RuntimeError as exc:
            raise BundleError(f"ONNX Runtime cannot load stage {stage.k} "
                              f"({path.name}): {str(exc).splitlines()[0][:300]}") from exc
        self.trainable = [n for n in stage.parameters]
        self.mask_of = {weight: mask for mask, weight in stage.masks}
        self.running = {}
        for row in stage.batchnorms:
            for key in ("running_mean", "running_var"):
                self.running[row[key]] = self.get_parameter(row[key])
        outputs = list(stage.training_outputs)
        self._stat_index = [(row, outputs.index(row["batch_mean_output"]),
                             outputs.index(row["batch_var_output"])) for row in stage.batchnorms]
        self.momentum_buffers: dict[str, np.ndarray] = {}
        if checkpoint is not None:
            self.load(checkpoint)

    # --- parameters ----------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        return list(self.state.parameter_names())

    def _view(self, name: str) -> np.ndarray:
        return self.state.get_parameter(name).data.numpy()

    def get_parameter(self, name: str) -> np.ndarray:
        return np.array(self._view(name), copy=True)

    def set_parameter(self, name: str, value: np.ndarray) -> None:
        current = self._view(name)
        value = np.asarray(value, dtype=current.dtype)
        if value.shape != current.shape:
            raise ValueError(f"{name}: shape {value.shape} != {current.shape}")
        current[...] = value
        if name in self.running:
            self.running[name] = value.copy()

    def gradient(self, name: str) -> np.ndarray | None:
        grad = self.state.get_parameter(name).grad
        return np.array(grad.numpy(), copy=True) if grad.has_value() else None

    # --- steps -----------------------------------------------------------------------------
    def train_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward + backward (gradients stay in ORT); running statistics updated here."""
        fetches, loss, logits = run_module(self.module, features, labels, train=True)
        for row, mean_at, var_at in self._stat_index:
            for key, at in (("running_mean", mean_at), ("running_var", var_at)):
                self.running[row[key]] = moved_running_stat(self.running[row[key]], fetches[at].numpy(),
                                                            float(row["momentum"]))
                self._view(row[key])[...] = self.running[row[key]]
        return loss, logits

    def sgd_step(self, lr_of_block: dict[int, float], momentum: float, weight_decay: float) -> None:
        """The shared numpy SGD, in place on the checkpoint's parameter buffers."""
        for name in self.trainable:
            param = self.state.get_parameter(name)
            if not param.grad.has_value():
                continue
            mask = self._view(self.mask_of[name]) if name in self.mask_of else None
            sgd_rule.sgd_step(param.data.numpy(), param.grad.numpy(), mask, self.momentum_buffers,
                              name, lr_of_block.get(block_of(name), 0.0), momentum, weight_decay)

    def eval_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        _, loss, logits = run_module(self.module, features, labels, train=False)
        return loss, logits

    def save(self, path: Path) -> None:
        """Every parameter, mask and running statistic as npz: the format both backends read."""
        for name, value in self.running.items():
            self._view(name)[...] = value
        with open(path, "wb") as handle:
            np.savez(handle, **{n: self.get_parameter(n) for n in self.parameter_names()})

    def load(self, path: Path) -> None:
        names = set(self.parameter_names())
        for name, value in load_state_file(path).items():
            if name in names:
                self.set_parameter(name, value)
