"""Phase 5 of scripts/arm64_check.sh, run inside the arm64 rootfs: the device side imports
without torch, and plain ONNX Runtime runs a tiny model built here with onnx's helpers."""
from __future__ import annotations

import importlib.util
import platform
import sys

for heavy in ("torch", "torchvision", "spfde_edge"):
    if importlib.util.find_spec(heavy) is not None:
        sys.exit(f"error: {heavy} is importable in this environment; the check needs a torch-free one")

import device_runner  # noqa: E402  (after the torch check on purpose)
from device_runner import loop  # noqa: E402,F401  pulls in numpy, yaml, PIL, psutil

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

leaked = [name for name in ("torch", "torchvision", "spfde_edge") if name in sys.modules]
if leaked:
    sys.exit(f"error: importing device_runner loaded {', '.join(leaked)}")

rng = np.random.default_rng(0)
w = rng.standard_normal((4, 3)).astype(np.float32)
b = rng.standard_normal(3).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
    "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8  # ORT 1.19 reads IR <= 10; 8 is what opset 17 needs
onnx.checker.check_model(model)
session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
x = rng.standard_normal((5, 4)).astype(np.float32)
(y,) = session.run(None, {"x": x})
expected = np.maximum(x @ w + b, 0)
if not np.allclose(y, expected, rtol=1e-5, atol=1e-6):
    sys.exit(f"error: ONNX Runtime's Gemm+Relu differs from numpy by {np.abs(y - expected).max():.3g}")
print(f"   {platform.machine()} python {platform.python_version()}: device_runner imports without torch; "
      f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())}), "
      f"numpy {np.__version__}, onnx {onnx.__version__}: tiny model OK")
