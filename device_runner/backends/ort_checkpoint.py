"""Write an ONNX Runtime training checkpoint from numpy arrays, without torch.

Bundle v2 ships the ORT training graphs of every boundary without weights; the device
writes the checkpoint of a boundary from its own arrays the first time it trains there.

The training build's ``C.save_checkpoint(trainable, non_trainable, path, nominal)`` takes
two lists of *serialized* ``onnx.TensorProto`` messages (bytes), as
``onnxruntime.training.onnxblock.save_checkpoint`` calls it. (The other overload saves an
existing ``CheckpointState``, which only ``load_checkpoint`` can make.) ``onnx`` is in
requirements-device.txt.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._ort import onnxruntime

from ..errors import BundleError

C = onnxruntime.capi._pybind_state


def tensor_proto_bytes(name: str, array: np.ndarray) -> bytes:
    """A serialized ``onnx.TensorProto`` holding ``array``."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name).SerializeToString()


def has_training_build() -> bool:
    return hasattr(C, "save_checkpoint") and hasattr(C, "load_checkpoint")


def write_checkpoint(path: Path, trainable: dict[str, np.ndarray], frozen: dict[str, np.ndarray]) -> None:
    """The ORT checkpoint of ``trainable`` (parameters with gradients) and ``frozen`` tensors.

    Insertion order is kept (use BoundaryArtifacts.parameters / .frozen). The checkpoint
    must hold every parameter input of the training graph it is loaded with.
    """
    if not has_training_build():
        raise BundleError("this onnxruntime has no training support (the inference build), so it "
                          "cannot write a training checkpoint; install onnxruntime-training-cpu on "
                          "x86_64 or set suffix_backend: onnxruntime in the profile")
    both = set(trainable) & set(frozen)
    if both:
        raise BundleError(f"checkpoint tensors both trainable and frozen: {sorted(both)[:3]}")
    for name, value in trainable.items():
        if np.asarray(value).dtype.kind != "f":
            raise BundleError(f"trainable checkpoint tensor {name} is {np.asarray(value).dtype}, "
                              "not floating point")
    path = Path(path)
    try:
        C.save_checkpoint([tensor_proto_bytes(n, v) for n, v in trainable.items()],
                          [tensor_proto_bytes(n, v) for n, v in frozen.items()],
                          os.fspath(path), False)
    except RuntimeError as exc:
        raise BundleError(f"ONNX Runtime cannot write the checkpoint {path}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
