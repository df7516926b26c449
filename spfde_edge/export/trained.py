"""A device run's whole trained model as one ExecuTorch program (``--from-device RUN --format pte``).

The run is brought home (``spfde_edge.device_import``: its logits checked against the device's
to 1e-4), then the whole model — every block in eval mode, masks multiplied into the weights,
the bundle's normalisation in front — is lowered to XNNPACK exactly as a bundle's prefix is
(``prefix.export_prefix_pte``), and the program's logits are checked against PyTorch.

Input ``image``: float32 ``[batch, 3, H, W]``, RGB pixel values 0..255 (a uint8 image cast to
float), at the bundle's input size; output ``logits`` ``[batch, classes]``. The batch is fixed
(ExecuTorch plans memory ahead of time), 1 unless ``--batch-size`` says otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import prefix as prefix_io
from .parity import ParityError

TOLERANCE = 1e-4


class Normalize(nn.Module):
    """``(pixels / 255 - mean) / std`` per channel, as the bundle's ``model.normalization`` says."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std


def export_trained_pte(run: str | Path, out: str | Path | None = None, batch_size: int | None = None,
                       log=print) -> Path:
    from spfde_edge.device_import import read_device_run

    device = read_device_run(run)
    model = device.model
    net = nn.Sequential(Normalize(device.bundle.mean, device.bundle.std),
                        prefix_io.baked_prefix(model, device.masks, len(model.blocks))).eval()
    size = device.bundle.input_size
    batch = batch_size or 1
    example = torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0)).float()
    out = Path(out) if out is not None else Path("export") / f"{Path(run).name}.pte"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        prefix_io.export_prefix_pte(net, example, tmp)
        with torch.no_grad():
            reference = net(example).numpy()
        difference = float(np.abs(prefix_io.run_pte(tmp, example) - reference).max())
        if not difference <= TOLERANCE:
            raise ParityError(f"the .pte's logits are {difference:.3g} away from PyTorch's (limit {TOLERANCE}); "
                              "nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out}: {device.bundle.model_name} trained by {run} (stage {device.num_frozen}), input float32 "
        f"[{batch}, 3, {size}, {size}] pixels 0..255, logits vs PyTorch max abs {difference:.1e}; "
        + "; ".join(device.notes))
    return out
