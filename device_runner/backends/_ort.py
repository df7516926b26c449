"""Import ONNX Runtime without letting it load torch.

The onnxruntime-training wheel checks at import time whether ``onnxruntime.training.ortmodule``
imports, and that module imports torch: 3-4 s and a few hundred MB of RSS on a board where
torch happens to be installed, for nothing the runner uses. While ``onnxruntime`` is first
imported, its ``training`` package is marked unavailable so the check fails fast; the mark
is removed afterwards, so other code in the process can still import it.
"""
from __future__ import annotations

import sys


def import_onnxruntime():
    if "onnxruntime" not in sys.modules:
        marked = "onnxruntime.training" not in sys.modules
        if marked:
            sys.modules["onnxruntime.training"] = None
        try:
            import onnxruntime  # noqa: F401
            import onnxruntime.capi._pybind_state  # noqa: F401
        finally:
            if marked and sys.modules.get("onnxruntime.training", 0) is None:
                del sys.modules["onnxruntime.training"]
    import onnxruntime
    return onnxruntime


onnxruntime = import_onnxruntime()


def configure(options, threads: int | None = None):
    """The one set of session settings every ONNX Runtime session here uses.

    ``options`` is an ``onnxruntime.SessionOptions`` or the training build's
    ``capi._pybind_state.SessionOptions``. Without the CPU memory arena, memory a step
    freed goes back to the allocator, so a smaller batch really lowers RSS when the runner
    must shrink it under the memory budget (budget.py).
    """
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return options


def inference_options(threads: int | None = None):
    return configure(onnxruntime.SessionOptions(), threads)
