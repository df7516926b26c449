"""Dynamic sparse training on the host: the shared prune-and-grow rules applied to a PyTorch model.

*When* masks change is :class:`UpdateSchedule` and *how* is the algorithm (``mest``,
``rigl``, ``set``, ``static``); both are defined once in ``device_runner.method`` (numpy,
torch-free) and run identically on the device. This module only moves tensors to and from
those rules and resets the optimizer state they name. The trainer, at an update epoch
``e`` (``schedule.is_update_epoch(e)``)::

    fraction = schedule.fraction(e)
    frozen = frozen_names(model)                     # same set for begin and end
    grads = dense_gradient(model, maskset, loss) if algorithm.needs_dense_grads else None
    algorithm.begin_update(maskset, model, fraction, rng, optimizer, frozen, grads)
    ... train the epoch ...                          # leave param.grad set at the end
    algorithm.end_update(maskset, model, fraction, rng, optimizer, frozen, grads)
    maskset.check(model)

``rng`` is a ``numpy.random.Generator`` (the same stream on every DDP rank). Every weight
that is pruned or grown is set to zero and its optimizer state (momentum, Adam moments) is
zeroed, so a regrown weight starts clean (RigL §3, MEST §4).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from device_runner.method import dst as rules
from device_runner.method.schedule import ScheduleError, UpdateSchedule
from spfde_edge.sparsity.masks import MaskSet, SparsityError

__all__ = ["DSTAlgorithm", "ScheduleError", "UpdateSchedule", "available_algorithms", "dense_gradient",
           "frozen_names", "get_algorithm", "reset_positions"]


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that no longer train; DST leaves their masks as they are."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def dense_gradient(model: nn.Module, maskset: MaskSet,
                   compute_loss: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the masked weights *including inactive positions*, for RigL's growth.

    ``compute_loss`` runs one forward pass on a training batch and returns the loss. The
    model's existing ``.grad`` and buffers (BatchNorm statistics) are restored afterwards,
    so this extra batch leaves no trace on training.
    """
    params = dict(model.named_parameters())
    saved_grads = {n: p.grad for n, p in params.items()}
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    for p in params.values():
        p.grad = None
    try:
        with maskset.dense_gradients():
            compute_loss().backward()
        return {n: params[n].grad.detach().clone()
                for n in maskset.masks if params[n].grad is not None}
    finally:
        for n, p in params.items():
            p.grad = saved_grads[n]
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])


def reset_positions(param: nn.Parameter, positions: torch.Tensor,
                    optimizer: torch.optim.Optimizer | None) -> None:
    """Zero the weight, its gradient and every same-shaped optimizer state at ``positions``."""
    with torch.no_grad():
        param.masked_fill_(positions, 0.0)
        if param.grad is not None:
            param.grad.masked_fill_(positions, 0.0)
        if optimizer is not None:
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(positions, 0.0)


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().numpy()


class DSTAlgorithm:
    """A shared prune-and-grow rule (``device_runner.method.dst``) applied to a model's MaskSet.

    Both hooks return ``{layer: weights swapped}`` for logging.
    """

    def __init__(self, rule: rules.Algorithm):
        self.rule = rule
        self.name = rule.name
        self.needs_dense_grads = rule.needs_dense_gradient

    def begin_update(self, maskset: MaskSet, model: nn.Module, fraction: float,
                     rng: np.random.Generator, optimizer: torch.optim.Optimizer | None,
                     frozen_names: set[str],
                     dense_grads: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        if self.needs_dense_grads:
            missing = [n for n in maskset.masks if n not in frozen_names and n not in (dense_grads or {})]
            if missing:
                raise SparsityError(f"rigl needs the dense gradient of '{missing[0]}'; pass "
                                    "dense_grads=dense_gradient(model, maskset, compute_loss)")
        return self._apply(self.rule.begin, maskset, model, fraction, rng, optimizer, frozen_names,
                           dense_grads)

    def end_update(self, maskset: MaskSet, model: nn.Module, fraction: float,
                   rng: np.random.Generator, optimizer: torch.optim.Optimizer | None,
                   frozen_names: set[str],
                   dense_grads: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        for name in frozen_names & set(maskset.masks):
            if int((~maskset.masks[name]).sum()) != maskset.target_zeros[name]:
                raise SparsityError(f"{name} was frozen between begin_update and end_update; "
                                    "freeze only between mask updates")
        return self._apply(self.rule.end, maskset, model, fraction, rng, optimizer, frozen_names, None)

    def _apply(self, hook, maskset, model, fraction, rng, optimizer, frozen, dense_grads) -> dict[str, int]:
        if not isinstance(rng, np.random.Generator):
            raise SparsityError(f"prune-and-grow draws from a numpy.random.Generator, got "
                                f"{type(rng).__name__}; pass np.random.default_rng(seed)")
        swapped = {}
        for name, param, mask in self._layers(maskset, model, fraction, frozen):
            layer = rules.Layer(name, _numpy(param), _numpy(mask), maskset.target_zeros[name],
                                grad=_numpy(param.grad),
                                dense_grad=_numpy((dense_grads or {}).get(name)))
            change = hook(layer, fraction, rng)
            if change is None:
                continue
            maskset.masks[name] = torch.from_numpy(change.mask).to(mask.device)
            reset_positions(param, torch.from_numpy(change.reset).to(param.device), optimizer)
            swapped[name] = change.swapped
        return swapped

    @staticmethod
    def _layers(maskset: MaskSet, model: nn.Module, fraction: float,
                frozen: set[str]) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        if not 0.0 <= fraction <= 1.0:
            raise SparsityError(f"update fraction must be in [0, 1], got {fraction}")
        params = dict(model.named_parameters())
        for name in maskset.masks:
            if name not in frozen:
                param = params[name]
                yield name, param, maskset.mask_for(name, param.device)


def available_algorithms() -> list[str]:
    return sorted(rules.ALGORITHMS)


def get_algorithm(name: str, lam: float = 1.0) -> DSTAlgorithm:
    """The shared algorithm ``name`` (``lam``: MEST's λ in |w| + λ|g|)."""
    try:
        return DSTAlgorithm(rules.get_algorithm(name, lam))
    except ValueError as exc:
        raise SparsityError(str(exc)) from None
