"""Frozen blocks as constant-weight ONNX models, in float32 or static int8 (QDQ).

A frozen block's weights never change again, so its infer program can carry them as
initializers instead of reading them as inputs every call. ONNX Runtime then folds
BatchNorm into the convolution, fuses activations and runs its NCHWc convolutions (it only
does so for constant filters): 1.2x on resnet18's first five blocks. Static int8 goes
further (per-channel int8 weights, uint8 activations with ranges calibrated on the
device's own data, ONNX Runtime's quantization tool): docs/benchmarks.md §8.

Everything here runs on the board, with plain onnxruntime and onnx (no torch).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from ._ort import inference_options, onnxruntime

X = "x"                        # a block program's input
CALIBRATION_BATCH = 8          # calibration samples per ONNX Runtime call (its transient memory)


def constant_model(program: Path, weights: dict[str, np.ndarray]):
    """The ``onnx.ModelProto`` of ``program`` (an infer program) with every input but ``x``
    turned into an initializer holding ``weights[name]``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(program))
    kept = [i for i in model.graph.input if i.name == X]
    for graph_input in model.graph.input:
        if graph_input.name != X:
            value = np.ascontiguousarray(weights[graph_input.name], dtype=np.float32)
            model.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def session(model_bytes: bytes, threads: int | None):
    options = inference_options(threads)
    options.add_session_config_entry("session.force_spinning_stop", "1")   # as block_chain.py says why
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _without_torch():
    """``onnxruntime.quantization`` imports ``onnxruntime.tools``, which imports torch when it
    is installed (3 s and hundreds of MB on a dev machine) for a helper this never uses."""
    name = "onnxruntime.tools.pytorch_export_helpers"
    placed = name not in sys.modules
    if placed:
        stub = types.ModuleType(name)
        stub.infer_input_info = None
        sys.modules[name] = stub
    try:
        yield
    finally:
        if placed and sys.modules.get(name) is stub:
            del sys.modules[name]


def _quantization():
    with _without_torch():
        from onnxruntime import quantization
    return quantization


def int8_model(model, calibration: np.ndarray) -> bytes:
    """Static int8 of a constant-weight block model: BatchNorm folded into the convolutions
    first (ONNX Runtime's basic graph optimizations), then QDQ with per-channel int8 weights
    and uint8 activations whose ranges are the min/max over ``calibration`` (the block's
    float32 input for a few of the device's samples)."""
    q = _quantization()

    class Batches(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + CALIBRATION_BATCH]
                                for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {X: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = inference_options(1)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.fspath(folded)
        onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        quantized = Path(tmp) / "int8.onnx"
        import logging

        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": done above
        try:
            q.quantize_static(os.fspath(folded), os.fspath(quantized), Batches(),
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax,
                              extra_options={"CalibTensorRangeSymmetric": False})
        finally:
            logging.getLogger().setLevel(quiet)
        return quantized.read_bytes()
