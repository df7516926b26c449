"""Pretrained starts (``--init-from PATH``): load a weights file into a model, offline.

Accepted files: a state dict saved with ``torch.save`` (read with ``weights_only=True``, so
loading runs no code) or a ``.safetensors`` file; a torchvision or timm weights file for
the same architecture; a spfde-edge checkpoint (``checkpoint.pt``: its ``model``). Names
are the model's own (``blocks.<i>.…``) or the library's (``features.0.0.weight``).

The head is re-initialised when the class count differs (its tensors keep the fresh
initialisation); any other missing, extra or misshapen tensor means the file is for another
model and is refused with the names that do not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .models import BlockModel, ModelError


@dataclass
class InitReport:
    path: str
    loaded: int
    reinitialised: list[str]   # head tensors whose shape changed with the class count

    def line(self) -> str:
        head = (f"; head re-initialised for the new class count ({', '.join(self.reinitialised)})"
                if self.reinitialised else "")
        return f"init: {self.loaded} tensors from {self.path}{head}"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"--init-from {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same one line
        raise ModelError(f"--init-from {path} is not a weights file (a torch state dict or "
                         f".safetensors): {str(exc).splitlines()[0][:160]}") from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--init-from {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_initial_weights(model: BlockModel, path: Path) -> InitReport:
    """Copy the file's tensors into ``model`` (in place); see the module docstring."""
    state = read_weights(Path(path))
    own = model.state_dict()
    by_library_name = {library: ours for ours, library in model.source_names.items()}
    head = f"blocks.{len(model.blocks) - 1}."
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        name = key if key in own else by_library_name.get(key)
        if name is None:
            unknown.append(key)
        else:
            mapped[name] = tensor
    missing = [n for n in own if n not in mapped and not n.endswith("num_batches_tracked")]
    if unknown or missing:
        problem = (f"{len(unknown)} tensors the model lacks (e.g. {', '.join(unknown[:3])})" if unknown
                   else f"{len(missing)} of the model's tensors missing (e.g. {', '.join(missing[:3])})")
        raise ModelError(f"--init-from {path} is not for {model.name}: {problem}; use weights of the "
                         "same architecture")
    reinitialised = []
    for name, tensor in mapped.items():
        if tensor.shape != own[name].shape:
            if not name.startswith(head):
                raise ModelError(f"--init-from {path}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(own[name].shape)}; only the head may differ (class count)")
            reinitialised.append(name)
    with torch.no_grad():
        for name, tensor in mapped.items():
            if name not in reinitialised:
                own[name].copy_(tensor.to(own[name].dtype))
    return InitReport(str(path), len(mapped) - len(reinitialised), reinitialised)
