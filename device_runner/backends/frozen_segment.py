"""Blocks that froze together, run for features: constant weights, float32 or int8.

A format-2 prefix is one segment per stage the run passed through. Once frozen, a block's
weights never change, so each segment builds its own sessions with the weights inside the
graph (quantize.py says why that is faster), and may switch to static int8 when
:func:`choose_precision` finds that the held-out top-1 stays within ``INT8_MAX_TOP1_DROP``
points of float32 (docs/device.md, "int8 frozen prefix").

``forward`` gives the features training reads (int8 when chosen); ``forward_exact`` the
float32 ones that held-out evaluation and the exported model use.
"""
from __future__ import annotations

import time

import numpy as np

from ..allocator import release_freed_memory
from ..errors import BundleError, RunError
from . import quantize

PRECISIONS = ("auto", "float32", "int8")
INT8_MAX_TOP1_DROP = 0.5       # percentage points of held-out top-1 that int8 may cost under "auto"
CALIBRATION_SAMPLES = 128      # the device's own training samples that set the int8 ranges
# The documented error of int8 features: ||int8 - float32|| / ||float32|| on samples the
# calibration never saw (measured 0.02-0.03; docs/device.md, tests/test_int8_prefix.py).
INT8_FEATURE_REL_ERROR = 0.06


class FrozenSegment:
    """Blocks ``blocks`` (consecutive, frozen) one after the other in eval mode."""

    def __init__(self, blocks, state, threads: int | None):
        self.blocks = tuple(blocks)
        self.threads = threads
        self._weights = [{name[len(f"blocks.{b.index}."):]: value for name, value in state.weights.items()
                          if name.startswith(f"blocks.{b.index}.")} for b in self.blocks]
        self._float32 = [self._session(b, quantize.constant_model(b.program("infer"), w).SerializeToString())
                         for b, w in zip(self.blocks, self._weights)]
        self._int8: list | None = None
        self.precision = "float32"
        self.decision: dict | None = None      # how the precision was chosen (run state, report)

    def _session(self, block, model_bytes: bytes):
        try:
            return quantize.session(model_bytes, self.threads)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise BundleError(f"ONNX Runtime cannot load frozen block {block.index}'s infer program: "
                              f"{str(exc).splitlines()[0][:300]}; re-export the bundle") from exc

    @property
    def name(self) -> str:
        return f"onnxruntime blocks {self.blocks[0].index}..{self.blocks[-1].index} ({self.precision})"

    @staticmethod
    def _run(sessions, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        for s in sessions:
            x = s.run(None, {quantize.X: x})[0]
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Features for training, at the chosen precision."""
        return self._run(self._int8 if self.precision == "int8" else self._float32, x)

    def forward_exact(self, x: np.ndarray) -> np.ndarray:
        """float32 features (held-out evaluation, the exported model)."""
        return self._run(self._float32, x)

    def quantize(self, calibration: np.ndarray) -> float:
        """Build the int8 sessions, ranges from ``calibration`` (this segment's float32 input);
        seconds taken. Deterministic: the same weights and samples give the same model."""
        started = time.perf_counter()
        sessions, x = [], np.ascontiguousarray(calibration, dtype=np.float32)
        for block, weights, exact in zip(self.blocks, self._weights, self._float32):
            model = quantize.constant_model(block.program("infer"), weights)
            sessions.append(self._session(block, quantize.int8_model(model, x)))
            release_freed_memory()
            x = exact.run(None, {quantize.X: x})[0]
        self._int8 = sessions
        return time.perf_counter() - started

    def use(self, precision: str) -> None:
        if precision == "int8" and self._int8 is None:
            raise RuntimeError("quantize() the segment before using int8")
        self.precision = precision


def choose_precision(segment: FrozenSegment, wanted: str, calibration: np.ndarray, top1) -> dict:
    """Set ``segment``'s precision as the profile asks (``prefix_precision``) and return the
    record of it. ``top1()`` is the held-out top-1 (percent) of the current model with the
    prefix as it stands, or None when the run has no held-out samples.

    * ``float32``: no int8 is built;
    * ``int8``: int8, with the top-1 change measured and reported;
    * ``auto``: int8 only if top-1 drops by at most ``INT8_MAX_TOP1_DROP`` points.
    """
    first, last = segment.blocks[0].index, segment.blocks[-1].index
    record = {"blocks": [first, last], "wanted": wanted, "precision": "float32"}
    if wanted == "float32":
        segment.use("float32")
        return {**record, "why": "profile prefix_precision: float32"}
    try:
        record["quantize_s"] = round(segment.quantize(calibration), 3)
    except Exception as exc:  # the quantization tool raises many types (onnx, ORT, its own)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if wanted == "int8":
            raise RunError(f"frozen blocks {first}..{last} cannot be quantized to int8 ({reason}); "
                           "run with --prefix-precision float32 or auto") from exc
        segment.use("float32")
        return {**record, "why": f"auto: int8 quantization failed ({reason}); float32 kept"}
    record["calibration_samples"] = len(calibration)
    segment.use("float32")
    top1_float32 = top1()
    segment.use("int8")
    top1_int8 = top1()
    if top1_float32 is not None:
        record.update(top1_float32=round(top1_float32, 3), top1_int8=round(top1_int8, 3),
                      top1_change=round(top1_int8 - top1_float32, 3))
    if wanted == "int8":
        record.update(precision="int8", why="profile prefix_precision: int8")
    elif top1_float32 is None:
        segment.use("float32")
        record["why"] = "auto: no held-out samples to measure int8's top-1 change on"
    elif top1_float32 - top1_int8 <= INT8_MAX_TOP1_DROP:
        record.update(precision="int8", why=f"auto: held-out top-1 changes by {top1_int8 - top1_float32:+.2f} "
                                            f"points (allowed: -{INT8_MAX_TOP1_DROP})")
    else:
        segment.use("float32")
        record["why"] = (f"auto: int8 costs {top1_float32 - top1_int8:.2f} points of held-out top-1 "
                         f"(more than {INT8_MAX_TOP1_DROP}); float32 kept")
    return record


def apply_recorded(segment: FrozenSegment, record: dict, calibration: np.ndarray) -> None:
    """A resumed run: the precision chosen before the crash, rebuilt from the same samples."""
    if record["precision"] == "int8":
        segment.quantize(calibration)
    segment.use(record["precision"])
    segment.decision = record
