"""The bundle's ``prefix.pte`` on the ExecuTorch runtime (XNNPACK), when it can be used.

ExecuTorch 1.5's Python bindings take and return torch tensors and load libtorch, so in
Python this backend needs torch installed; :func:`available` says so instead of importing
it. A profile opts in with ``prefix_backend: executorch``; ``auto`` uses ExecuTorch only
when its runtime imports without torch (a native build), otherwise ONNX Runtime. The
program has a fixed batch (``pte_batch_size``): batches are split and the last one padded.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from ..errors import BundleError


def available() -> tuple[bool, str]:
    """(usable, reason) without importing anything heavy."""
    if importlib.util.find_spec("executorch") is None:
        return False, "ExecuTorch runtime not installed"
    if importlib.util.find_spec("torch") is None:
        return False, "ExecuTorch's Python bindings need torch, which is not installed"
    return True, "ExecuTorch runtime installed (its bindings load torch)"


class ExecuTorchPrefix:
    name = "executorch"

    def __init__(self, path: Path, batch_size: int):
        try:
            runtime = importlib.import_module("executorch.runtime")
        except ImportError as exc:
            raise BundleError(f"the profile asks for ExecuTorch but it cannot be imported ({exc}); "
                              "set prefix_backend: onnxruntime or auto") from exc
        self._tensor_lib = importlib.import_module("torch")  # what the bindings exchange
        program = runtime.Runtime.get().load_program(os.fspath(path))
        self.method = program.load_method("forward")
        self.batch_size = int(batch_size)

    def forward(self, x: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(x), self.batch_size):
            chunk = np.ascontiguousarray(x[start:start + self.batch_size], dtype=np.float32)
            count = len(chunk)
            if count < self.batch_size:
                pad = np.zeros((self.batch_size - count, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            result = self.method.execute([self._tensor_lib.from_numpy(chunk)])[0]
            outputs.append(np.asarray(result.numpy())[:count])
        return np.concatenate(outputs)
