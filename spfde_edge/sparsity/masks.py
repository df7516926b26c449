"""Per-layer binary weight masks: how sparse each layer is, and keeping it that way.

A :class:`MaskSet` owns one boolean mask per prunable weight (``True`` = active). Two
invariants hold between mask updates, and :meth:`MaskSet.check` enforces them:

* every inactive weight is exactly zero;
* every layer has exactly its target number of zeros (set once, at construction).

Gradient hooks (:meth:`MaskSet.attach`) zero the gradient of inactive weights, so momentum
and weight decay can never revive them without a mask update.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from spfde_edge.models import prunable_layers

DISTRIBUTIONS = ("uniform", "erk")


class SparsityError(ValueError):
    """Invalid sparsity settings, or a mask invariant that no longer holds."""


def validate_sparsity(sparsity: float) -> float:
    """Sparsity is the fraction of zeros; 1.0 would leave nothing to train."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) \
            or not 0.0 <= sparsity < 1.0:
        raise SparsityError(f"--sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def uniform_zeros(numel: int, sparsity: float) -> int:
    """Exact zero count of a layer under uniform sparsity."""
    return int(round(sparsity * numel))


def erk_densities(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (RigL, Evci et al. 2020, §3 / appendix).

    Density of layer l is ``eps * sum(shape_l) / prod(shape_l)``, with ``eps`` chosen so the
    total number of nonzeros equals the uniform total. A layer that would exceed density 1
    is made dense and ``eps`` is re-solved over the rest, one layer at a time (the layer with
    the largest raw density first), as RigL does.
    """
    sparsity = validate_sparsity(sparsity)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    target_nnz = sum(numel[n] - uniform_zeros(numel[n], sparsity) for n in shapes)
    dense: set[str] = set()
    eps = 0.0
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            break
        budget = target_nnz - sum(numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in rest)
        largest = max(rest, key=lambda n: raw[n])
        if eps * raw[largest] <= 1.0:
            break
        dense.add(largest)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def target_zero_counts(shapes: Mapping[str, tuple[int, ...]], sparsity: float,
                       distribution: str) -> dict[str, int]:
    """Exact integer zero count per layer for a sparsity distribution."""
    sparsity = validate_sparsity(sparsity)
    if distribution == "uniform":
        return {n: uniform_zeros(math.prod(s), sparsity) for n, s in shapes.items()}
    if distribution == "erk":
        densities = erk_densities(shapes, sparsity)
        return {n: math.prod(s) - int(round(densities[n] * math.prod(s)))
                for n, s in shapes.items()}
    raise SparsityError(
        f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got '{distribution}'")


def maskable_weights(model: nn.Module) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Prunable weights by parameter name, and the names kept dense.

    The first conv stays dense (paper default, as in RigL/MEST): it has few weights and
    every later feature depends on it.
    """
    weights: dict[str, nn.Parameter] = {}
    dense: list[str] = []
    for name, layer in prunable_layers(model):
        param_name = f"{name}.weight"
        if not dense and isinstance(layer, nn.Conv2d):
            dense.append(param_name)
        else:
            weights[param_name] = layer.weight
    return weights, dense


class MaskSet:
    """Boolean masks keyed by weight parameter name, plus the per-layer zero targets."""

    def __init__(self, masks: dict[str, torch.Tensor], target_zeros: dict[str, int],
                 sparsity: float, distribution: str, dense_names: list[str]):
        if set(masks) != set(target_zeros):
            raise SparsityError("masks and target_zeros must name the same layers")
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        self.target_zeros = {n: int(z) for n, z in target_zeros.items()}
        self.target_sparsity = validate_sparsity(sparsity)
        if distribution not in DISTRIBUTIONS:
            raise SparsityError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                                f"got '{distribution}'")
        self.distribution = distribution
        self.dense_names = list(dense_names)
        self._mask_gradients = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def random(cls, model: nn.Module, sparsity: float, distribution: str,
               generator: torch.Generator) -> "MaskSet":
        """Random masks with exact per-layer zero counts; does not touch the model."""
        return cls._removing_first(model, sparsity, distribution, lambda weight: torch.randperm(
            weight.numel(), generator=generator, device=generator.device).to(weight.device))

    @classmethod
    def magnitude(cls, model: nn.Module, sparsity: float, distribution: str) -> "MaskSet":
        """Keep each layer's largest |w| at its target density (a pretrained start: its
        trained weights say which connections matter); ties broken by position."""
        return cls._removing_first(model, sparsity, distribution,
                                   lambda weight: torch.argsort(weight.detach().abs().flatten(), stable=True))

    @classmethod
    def _removing_first(cls, model: nn.Module, sparsity: float, distribution: str, order) -> "MaskSet":
        """Per layer, mask out the first ``zeros`` positions of ``order(weight)`` (flat indices)."""
        sparsity = validate_sparsity(sparsity)
        weights, dense = maskable_weights(model)
        zeros = target_zero_counts({n: tuple(w.shape) for n, w in weights.items()},
                                   sparsity, distribution)
        masks = {}
        for name, weight in weights.items():
            flat = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
            flat[order(weight)[: zeros[name]]] = False
            masks[name] = flat.view(weight.shape)
        return cls(masks, zeros, sparsity, distribution, dense)

    # -- applying masks -------------------------------------------------------------------

    def mask_for(self, name: str, device: torch.device) -> torch.Tensor:
        """The mask of ``name`` on ``device`` (moved once, e.g. after load_state_dict)."""
        mask = self.masks[name]
        if mask.device != device:
            mask = self.masks[name] = mask.to(device)
        return mask

    def apply(self, model: nn.Module) -> None:
        """Zero every inactive weight in place."""
        with torch.no_grad():
            for name, param in self._params(model):
                param.masked_fill_(~self.mask_for(name, param.device), 0.0)

    def attach(self, model: nn.Module) -> None:
        """Mask each weight's gradient as it is computed (before the optimizer sees it)."""
        self.detach()
        for name, param in self._params(model):
            self._hooks.append(param.register_hook(self._gradient_hook(name)))

    def detach(self) -> None:
        """Remove the gradient hooks installed by :meth:`attach`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self._mask_gradients:
                return grad
            # Looked up at call time: DST replaces masks while the hook stays registered.
            return grad.masked_fill(~self.mask_for(name, grad.device), 0.0)
        return hook

    @contextmanager
    def dense_gradients(self) -> Iterator[None]:
        """Let gradients of inactive weights through (RigL grows by dense gradient)."""
        previous = self._mask_gradients
        self._mask_gradients = False
        try:
            yield
        finally:
            self._mask_gradients = previous

    # -- reporting ------------------------------------------------------------------------

    def layer_density(self) -> dict[str, float]:
        return {n: m.float().mean().item() for n, m in self.masks.items()}

    def density_of(self, param_name: str) -> float:
        """Density of any parameter; unmasked ones (first conv, biases, BN) are dense."""
        mask = self.masks.get(param_name)
        return 1.0 if mask is None else mask.float().mean().item()

    def nonzero_count(self) -> int:
        """Active weights over the masked layers."""
        return sum(int(m.sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        """Fraction of zeros over the masked layers, as the masks stand now."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - self.nonzero_count() / total if total else 0.0

    def check(self, model: nn.Module) -> None:
        """Raise :class:`SparsityError` if an inactive weight is nonzero or a count drifted.

        Call it after :meth:`apply` and after every completed mask update; MEST is
        legitimately above its target count between ``begin_update`` and ``end_update``.
        """
        for name, param in self._params(model):
            mask = self.mask_for(name, param.device)
            revived = int((param.detach()[~mask] != 0).sum())
            if revived:
                raise SparsityError(f"{name}: {revived} masked weights are nonzero; "
                                    "call MaskSet.apply(model) and attach(model) before training")
            zeros = int((~mask).sum())
            if zeros != self.target_zeros[name]:
                raise SparsityError(f"{name}: mask has {zeros} zeros, target is "
                                    f"{self.target_zeros[name]}; a mask update was left unfinished")

    def _params(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        params = dict(model.named_parameters())
        for name in self.masks:
            if name not in params:
                raise SparsityError(f"mask '{name}' has no parameter in this model; "
                                    "masks were built for a different architecture")
            yield name, params[name]

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "target_zeros": dict(self.target_zeros),
            "sparsity": self.target_sparsity,
            "distribution": self.distribution,
            "dense_names": list(self.dense_names),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.masks and set(state["masks"]) != set(self.masks):
            raise SparsityError("saved masks name different layers than this MaskSet; "
                                "was the checkpoint made with another model?")
        self.masks = {n: m.clone().to(torch.bool) for n, m in state["masks"].items()}
        self.target_zeros = {n: int(z) for n, z in state["target_zeros"].items()}
        self.target_sparsity = validate_sparsity(state["sparsity"])
        self.distribution = state["distribution"]
        self.dense_names = list(state["dense_names"])

    @classmethod
    def from_state_dict(cls, state: dict) -> "MaskSet":
        return cls(dict(state["masks"]), dict(state["target_zeros"]), state["sparsity"],
                   state["distribution"], state["dense_names"])
