"""Frozen blocks on ONNX Runtime inference: the bundle's prefix, and device-frozen *bridges*.

The bundle's ``prefix.onnx`` of a stage holds the host's weights, with masks and
BatchNorm folded in. Blocks that trained on the device and then froze must run with the
device's weights, so they get a *bridge*: the slice of the previous stage's eval graph from
its ``features`` input to the input of the first still-trainable block, cut out with
``onnx.utils.extract_model`` (onnx comes with onnxruntime-training). In that graph the
parameters (weights, masks, running statistics) are graph inputs, fed from the device's copy.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ._ort import inference_options, onnxruntime

from ..errors import BundleError


class OrtPrefix:
    """The bundle's ``prefix.onnx`` (dynamic batch)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        try:
            self.session = onnxruntime.InferenceSession(os.fspath(path), inference_options(threads),
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _boundary(graph, k_to: int, parameter_names: set[str]) -> str:
    """The one tensor entering block ``k_to`` from outside it (its input activation)."""
    scope = f"/blocks.{k_to}/"
    nodes = [n for n in graph.node if n.name.startswith(scope)]
    produced = {out for n in nodes for out in n.output}
    initializers = {i.name for i in graph.initializer}
    external = []
    for node in nodes:
        for name in node.input:
            if name and name not in produced and name not in parameter_names \
                    and name not in initializers and name not in external:
                external.append(name)
    if len(external) != 1:
        raise BundleError(f"cannot find the input of block {k_to} in the eval graph "
                          f"(candidates {external[:4]}); the exporter's node naming changed")
    return external[0]


class OrtBridge:
    """Blocks ``[k_from, k_to)`` in eval mode with the device's weights (cut from an eval graph)."""

    name = "onnxruntime"

    def __init__(self, eval_model: Path, k_from: int, k_to: int, parameters: dict[str, np.ndarray],
                 threads: int, features_input: str = "features"):
        import onnx
        import onnx.utils

        model = onnx.load(os.fspath(eval_model))
        graph = model.graph
        names = {i.name for i in graph.input} - {features_input}
        output = _boundary(graph, k_to, names)
        with tempfile.TemporaryDirectory() as tmp:
            full = Path(tmp) / "eval.onnx"
            onnx.save(model, os.fspath(full))
            cut = Path(tmp) / "bridge.onnx"
            inputs = [features_input] + [
                i.name for i in graph.input if i.name.startswith("blocks.")
                and k_from <= int(i.name.split(".")[1]) < k_to]
            onnx.utils.extract_model(os.fspath(full), os.fspath(cut), inputs, [output])
            sliced = onnx.load(os.fspath(cut))
            self.session = onnxruntime.InferenceSession(sliced.SerializeToString(), inference_options(threads),
                                                        providers=["CPUExecutionProvider"])
        needed = [i.name for i in self.session.get_inputs() if i.name != features_input]
        missing = [n for n in needed if n not in parameters]
        if missing:
            raise BundleError(f"bridge of blocks {k_from}..{k_to - 1} needs {missing[:3]} which the "
                              "device state lacks")
        self.feeds = {n: np.ascontiguousarray(parameters[n]) for n in needed}
        self.features_input = features_input
        self.k_from, self.k_to = k_from, k_to

    def forward(self, x: np.ndarray) -> np.ndarray:
        feeds = dict(self.feeds)
        feeds[self.features_input] = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, feeds)[0]


class PrefixChain:
    """The bundle prefix (or nothing at stage 0) followed by zero or more bridges."""

    def __init__(self, base, bridges: list, precision=None):
        self.base = base
        self.bridges = bridges
        # Applied to the output of the base and of every bridge (the feature cache's precision),
        # so features are the same numbers whichever way they were obtained.
        self.precision = precision or (lambda features: features)

    @property
    def name(self) -> str:
        parts = [self.base.name] if self.base is not None else []
        if self.bridges and all(hasattr(b, "blocks") for b in self.bridges):
            parts += [b.name for b in self.bridges]           # format 2: segments of block programs
        elif self.bridges:
            parts.append(f"{len(self.bridges)} bridge(s) on onnxruntime")
        return " + ".join(parts) or "none (stage 0)"

    @property
    def empty(self) -> bool:
        return self.base is None and not self.bridges

    def forward(self, x: np.ndarray, rounded: bool = True) -> np.ndarray:
        """Features for the suffix; ``rounded=False`` keeps full float32 (evaluation, export)."""
        keep = self.precision if rounded else (lambda features: features)
        for part in ([self.base] if self.base is not None else []) + list(self.bridges):
            # A frozen segment's int8 features are for training only (frozen_segment.py).
            run = part.forward if rounded else getattr(part, "forward_exact", part.forward)
            x = keep(run(x))
        return x
