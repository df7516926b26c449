"""The frozen prefix as inference-only graphs: ExecuTorch (.pte, XNNPACK) and ONNX.

Stage k freezes blocks ``[0, k)``. They run in eval mode (BatchNorm with running
statistics, SpFDE §3.2) and never change on the device, so masks are multiplied into the
weights once here: the graphs hold plain convolutions with zeros, no mask operators.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spfde_edge.models import BlockModel

INPUT_NAME = "input"
FEATURES_NAME = "features"
PTE_FILE = "prefix.pte"
ONNX_FILE = "prefix.onnx"


def baked_prefix(model: BlockModel, masks: dict[str, torch.Tensor], k: int) -> nn.Sequential:
    """A copy of blocks ``[0, k)`` in eval mode with every masked weight multiplied out."""
    prefix = copy.deepcopy(nn.Sequential(*model.blocks[:k])).eval()
    params = dict(prefix.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            index = int(name.split(".")[1])
            if index < k:
                # nn.Sequential names its children "0", "1", …, like model.blocks.
                params[name.split(".", 1)[1]].mul_(mask.to(torch.float32))
    prefix.requires_grad_(False)
    return prefix


def export_prefix_onnx(prefix: nn.Sequential, example: torch.Tensor, path: Path, opset: int) -> None:
    """ONNX for ONNX Runtime inference; the batch dimension is dynamic."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter, as for the suffix: one exporter for the whole bundle,
        # and it writes an IR version (8 for opset 17) that ORT 1.19 loads.
        warnings.simplefilter("ignore")
        torch.onnx.export(prefix, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[FEATURES_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}})
    onnx.save(onnx.load_from_string(buffer.getvalue()), path)


def export_prefix_pte(prefix: nn.Sequential, example: torch.Tensor, path: Path) -> None:
    """ExecuTorch program with every supported operator delegated to XNNPACK.

    Shapes are static (``example``'s batch): ExecuTorch plans all memory ahead of time,
    which is what a microcontroller-class runtime wants; pad or drop a short last batch.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(prefix, (example,))
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)


def run_pte(path: Path, x: torch.Tensor) -> np.ndarray:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    # The runtime reads the data pointer as a contiguous NCHW buffer and ignores strides: a
    # channels-last view (numpy HWC images transposed) would silently give wrong logits.
    return method.execute([x.contiguous()])[0].numpy()


def run_onnx(path: Path, x: np.ndarray, input_name: str = INPUT_NAME) -> np.ndarray:
    import onnxruntime

    from device_runner.backends._ort import inference_options

    session = onnxruntime.InferenceSession(str(path), inference_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def check_prefix(prefix: nn.Sequential, folder: Path, example: torch.Tensor) -> dict:
    """Max abs feature difference of each prefix file against the PyTorch prefix."""
    with torch.no_grad():
        reference = prefix(example).numpy()
    return {
        "pte_features_max_abs": float(np.abs(run_pte(folder / PTE_FILE, example) - reference).max()),
        "onnx_features_max_abs": float(np.abs(run_onnx(folder / ONNX_FILE, example.numpy()) - reference).max()),
    }
