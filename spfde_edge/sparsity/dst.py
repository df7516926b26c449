"""Dynamic sparse training: *when* masks change (:class:`UpdateSchedule`) apart from *how*
(the algorithms ``mest``, ``rigl``, ``set``, ``static``), following RigL's split.

The trainer, at an update epoch ``e`` (``schedule.is_update_epoch(e)``)::

    fraction = schedule.fraction(e)
    frozen = frozen_names(model)                     # same set for begin and end
    grads = dense_gradient(model, maskset, loss) if algorithm.needs_dense_grads else None
    algorithm.begin_update(maskset, model, fraction, generator, optimizer, frozen, grads)
    ... train the epoch ...                          # leave param.grad set at the end
    algorithm.end_update(maskset, model, fraction, generator, optimizer, frozen, grads)
    maskset.check(model)

Every weight that is pruned or grown is set to zero and its optimizer state (momentum,
Adam moments) is zeroed, so a regrown weight starts clean (RigL §3, MEST §4).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from spfde_edge.sparsity.masks import MaskSet, SparsityError


@dataclass(frozen=True)
class UpdateSchedule:
    """Update every ``delta_tau`` epochs before ``end_epoch``; the swapped fraction decays
    by cosine from ``initial_fraction`` (RigL's drop-fraction schedule)."""

    delta_tau: int
    end_epoch: int
    initial_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.delta_tau < 1:
            raise SparsityError(f"--delta-tau must be a positive number of epochs, got {self.delta_tau}")
        if self.end_epoch < 0:
            raise SparsityError(f"--dst-end-epoch must be >= 0, got {self.end_epoch}")
        if not 0.0 <= self.initial_fraction <= 1.0:
            raise SparsityError(f"--update-fraction must be in [0, 1], got {self.initial_fraction}")

    def is_update_epoch(self, epoch: int) -> bool:
        return 0 < epoch < self.end_epoch and epoch % self.delta_tau == 0

    def fraction(self, epoch: int) -> float:
        if self.end_epoch == 0:
            return 0.0
        return self.initial_fraction * 0.5 * (1.0 + math.cos(math.pi * epoch / self.end_epoch))


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


# -- per-layer selection (flat indices) ---------------------------------------------------

def _smallest(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k lowest scores among the ``among`` positions."""
    flat = scores.reshape(-1).masked_fill(~among.reshape(-1), math.inf)
    return torch.topk(flat, k, largest=False).indices


def _largest(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1).masked_fill(~among.reshape(-1), -math.inf)
    return torch.topk(flat, k, largest=True).indices


def _random(among: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    candidates = among.reshape(-1).nonzero().squeeze(1)
    order = torch.randperm(candidates.numel(), generator=generator, device=generator.device)
    return candidates[order[:k].to(candidates.device)]


def _positions(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    flat[indices] = True
    return flat.view(like.shape)


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


# -- algorithms ---------------------------------------------------------------------------

class DSTAlgorithm:
    """How masks change. Both hooks return ``{layer: weights swapped}`` for logging."""

    name = "base"
    needs_dense_grads = False

    def begin_update(self, maskset: MaskSet, model: nn.Module, fraction: float,
                     generator: torch.Generator, optimizer: torch.optim.Optimizer | None,
                     frozen_names: set[str],
                     dense_grads: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        return {}

    def end_update(self, maskset: MaskSet, model: nn.Module, fraction: float,
                   generator: torch.Generator, optimizer: torch.optim.Optimizer | None,
                   frozen_names: set[str],
                   dense_grads: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        return {}

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

    @staticmethod
    def _swap_count(mask: torch.Tensor, fraction: float) -> int:
        """k = round(fraction * nnz), capped by the free positions there are to grow into."""
        nnz = int(mask.sum())
        return min(int(round(fraction * nnz)), mask.numel() - nnz)


_ALGORITHMS: dict[str, type[DSTAlgorithm]] = {}


def register_algorithm(name: str):
    def wrap(cls: type[DSTAlgorithm]) -> type[DSTAlgorithm]:
        cls.name = name
        _ALGORITHMS[name] = cls
        return cls
    return wrap


def available_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def get_algorithm(name: str, **options) -> DSTAlgorithm:
    """Build a registered algorithm; ``options`` go to its constructor (e.g. ``lam`` for mest)."""
    if name not in _ALGORITHMS:
        raise SparsityError(f"unknown DST algorithm '{name}'; choose one of "
                            f"{', '.join(available_algorithms())}")
    return _ALGORITHMS[name](**options)


@register_algorithm("static")
class Static(DSTAlgorithm):
    """Fixed random mask: the baseline every DST method is compared against."""


class _PruneThenGrow(DSTAlgorithm):
    """SET/RigL: at the start of the epoch drop the k smallest-magnitude active weights and
    grow k positions that were inactive before the drop (never the ones just dropped)."""

    def _grow(self, name: str, candidates: torch.Tensor, k: int, generator: torch.Generator,
              dense_grads: dict | None) -> torch.Tensor:
        """Flat indices of the k positions to grow; each subclass says how (abstract)."""
        raise NotImplementedError(f"{type(self).__name__} must define how it grows weights")

    def begin_update(self, maskset, model, fraction, generator, optimizer, frozen_names,
                     dense_grads=None):
        swapped = {}
        for name, param, mask in self._layers(maskset, model, fraction, frozen_names):
            k = self._swap_count(mask, fraction)
            if k == 0:
                continue
            pruned = _positions(_smallest(param.detach().abs(), mask, k), mask)
            grown = _positions(self._grow(name, ~mask, k, generator, dense_grads), mask)
            maskset.masks[name] = (mask & ~pruned) | grown
            reset_positions(param, pruned | grown, optimizer)
            swapped[name] = k
        return swapped


@register_algorithm("set")
class SET(_PruneThenGrow):
    """Sparse Evolutionary Training (Mocanu et al. 2018): random growth."""

    def _grow(self, name, candidates, k, generator, dense_grads):
        return _random(candidates, k, generator)


@register_algorithm("rigl")
class RigL(_PruneThenGrow):
    """RigL (Evci et al. 2020): grow where the dense gradient is largest.

    Needs ``dense_grads`` from :func:`dense_gradient` on one batch, at the update step.
    """

    needs_dense_grads = True

    def _grow(self, name, candidates, k, generator, dense_grads):
        if dense_grads is None or name not in dense_grads:
            raise SparsityError(f"rigl needs the dense gradient of '{name}'; pass "
                                "dense_grads=dense_gradient(model, maskset, compute_loss)")
        return _largest(dense_grads[name].abs().to(candidates.device), candidates, k)


@register_algorithm("mest")
class MEST(DSTAlgorithm):
    """MEST's Elastic Mutation with Soft memory bound (EM&S, Yuan et al. NeurIPS 2021).

    ``begin_update`` grows k random positions, so the layer runs an epoch above its target
    count (the soft memory bound); ``end_update`` prunes back to the target by the score
    ``|w| + lam * |grad|``. Grown weights compete with old ones, so a grown weight that did
    not become important is removed again.
    """

    def __init__(self, lam: float = 1.0):
        if lam < 0:
            raise SparsityError(f"mest lambda must be >= 0, got {lam}")
        self.lam = float(lam)

    def begin_update(self, maskset, model, fraction, generator, optimizer, frozen_names,
                     dense_grads=None):
        swapped = {}
        for name, param, mask in self._layers(maskset, model, fraction, frozen_names):
            k = self._swap_count(mask, fraction)
            if k == 0:
                continue
            grown = _positions(_random(~mask, k, generator), mask)
            maskset.masks[name] = mask | grown
            reset_positions(param, grown, optimizer)
            swapped[name] = k
        return swapped

    def end_update(self, maskset, model, fraction, generator, optimizer, frozen_names,
                   dense_grads=None):
        for name in frozen_names & set(maskset.masks):
            if int((~maskset.masks[name]).sum()) != maskset.target_zeros[name]:
                raise SparsityError(f"{name} was frozen between begin_update and end_update; "
                                    "freeze only between mask updates")
        swapped = {}
        for name, param, mask in self._layers(maskset, model, fraction, frozen_names):
            excess = maskset.target_zeros[name] - int((~mask).sum())
            if excess <= 0:
                continue
            score = param.detach().abs()
            if param.grad is not None and self.lam:
                score = score + self.lam * param.grad.detach().abs()
            pruned = _positions(_smallest(score, mask, excess), mask)
            maskset.masks[name] = mask & ~pruned
            reset_positions(param, pruned, optimizer)
            swapped[name] = excess
        return swapped
