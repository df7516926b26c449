"""Training cost model of SpFDE (NeurIPS 2022): FLOPs and fp32 memory per training step.

:func:`profile_model` runs one forward pass with hooks and turns the model into plain
numbers (:class:`ModelProfile`). Everything else is arithmetic on that profile:

* :func:`training_flops_per_sample` - forward, input-gradient and weight-gradient FLOPs
  under per-layer weight densities (dynamic sparse training) and a frozen block prefix
  (progressive layer freezing);
* :func:`training_memory_bytes` - weights, stored activations, weight gradients and
  activation gradients for one step at a given batch size.

FLOPs count multiply and add separately (2 x MACs) over Conv2d/Linear layers only; biases,
BatchNorm, activations and pooling are ignored, exactly as ``torch.utils.flop_counter``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

FP32_BYTES = 4
# A masked layer keeps its nonzeros plus one 16-bit index each (a column index inside a
# row/kernel group, as compact sparse formats on edge runtimes do).
SPARSE_INDEX_BYTES = 2

_STORED_INPUT = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
_STORED_OUTPUT = (nn.ReLU, nn.ReLU6)
_PRODUCES_ACTIVATION = _STORED_INPUT + _STORED_OUTPUT


class CostError(ValueError):
    """A cost query that does not fit the profiled model (unknown layer, bad block count)."""


@dataclass(frozen=True)
class LayerProfile:
    """One Conv2d/Linear call; sizes are per sample."""

    name: str                 # weight parameter name, e.g. "blocks.2.conv1.weight"
    block: int
    forward_flops: int        # dense, 2 x MACs, bias not counted
    weight_numel: int
    input_numel: int
    output_numel: int
    reads_block_input: bool   # needs no input gradient when its block is the first trainable


@dataclass(frozen=True)
class BlockProfile:
    """One freezing block; activation sizes are per sample."""

    name: str
    activation_numel: int     # stored for backward (rule in :func:`profile_model`)
    output_numel: int
    peak_activation_numel: int  # largest tensor the block produces (its gradient's size)
    param_numel: int          # all parameters, BatchNorm included


@dataclass(frozen=True)
class ModelProfile:
    model_name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerProfile, ...]
    blocks: tuple[BlockProfile, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def forward_flops(self) -> int:
        """Dense forward FLOPs per sample."""
        return sum(layer.forward_flops for layer in self.layers)


@dataclass(frozen=True)
class BlockFlops:
    forward: float
    backward_input: float
    backward_weight: float

    @property
    def total(self) -> float:
        return self.forward + self.backward_input + self.backward_weight


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs per sample, summed over blocks, and the per-block split."""

    forward: float
    backward_input: float
    backward_weight: float
    total: float
    per_block: tuple[BlockFlops, ...]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held during one fp32 training step."""

    weights_bytes: int
    activations_bytes: int
    weight_grads_bytes: int
    activation_grads_bytes: int
    total_bytes: int

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 2**20


def profile_model(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelProfile:
    """Profile a :class:`~spfde_edge.models.BlockModel` with one sample of ``input_shape``.

    Runs one forward pass in eval mode without gradients; the model's mode is restored.

    Activations stored for backward: the inputs of Conv2d, Linear and BatchNorm layers
    (needed for their weight gradients) and the outputs of ReLU/ReLU6 (needed for theirs).
    A tensor used by several of them - a ReLU output that feeds the next conv, a block
    input read by conv1 and the shortcut - is counted once, in the last block that stores
    it: trainable blocks form a suffix, so that block is trainable whenever an earlier
    user is.

    ``reads_block_input``: the layer reads its block's input tensor, directly or through
    parameter-free modules only (pooling, flatten, dropout); tensor identity decides. Such
    an input does not require grad when the block is the first trainable one, so PyTorch
    computes no input gradient for the layer.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise CostError("profile_model needs a BlockModel (a model with .blocks); "
                        "build it with spfde_edge.models.create_model")
    block_names = list(getattr(model, "block_names", [str(i) for i in range(len(blocks))]))
    layer_names = {module: name for name, module in model.named_modules()}

    keep_alive: list[torch.Tensor] = []   # tensors stay alive, so id() is never reused
    grad_free: set[int] = set()           # ids of tensors derived from the block input only
    stored: dict[int, tuple[int, int]] = {}  # tensor id -> (last storing block, numel)
    peak = [0] * len(blocks)
    outputs = [0] * len(blocks)
    layers: list[LayerProfile] = []
    current = [0]

    def remember(tensor: torch.Tensor) -> int:
        keep_alive.append(tensor)
        return id(tensor)

    def block_pre_hook(index: int):
        def hook(module, args):
            current[0] = index
            grad_free.clear()
            grad_free.add(remember(args[0]))
        return hook

    def block_hook(index: int):
        def hook(module, args, output):
            outputs[index] = output[0].numel()
            peak[index] = max(peak[index], output[0].numel())
        return hook

    def leaf_hook(module, args, output):
        block = current[0]
        inp = args[0] if args else None
        if not isinstance(output, torch.Tensor) or not isinstance(inp, torch.Tensor):
            return
        if isinstance(module, _STORED_INPUT):
            stored[remember(inp)] = (block, inp[0].numel())
        if isinstance(module, _STORED_OUTPUT):
            stored[remember(output)] = (block, output[0].numel())
        if isinstance(module, _PRODUCES_ACTIVATION):
            peak[block] = max(peak[block], output[0].numel())
        if next(module.parameters(recurse=False), None) is None and id(inp) in grad_free:
            grad_free.add(remember(output))
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append(_layer_profile(module, layer_names[module], block, inp, output,
                                         id(inp) in grad_free))

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(block_pre_hook(index)))
        handles.append(block.register_forward_hook(block_hook(index)))
    for module in model.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(leaf_hook))

    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    activation = [0] * len(blocks)
    for block, numel in stored.values():
        activation[block] += numel
    block_profiles = tuple(
        BlockProfile(name=block_names[i], activation_numel=activation[i],
                     output_numel=outputs[i], peak_activation_numel=peak[i],
                     param_numel=sum(p.numel() for p in blocks[i].parameters()))
        for i in range(len(blocks)))
    return ModelProfile(model_name=str(getattr(model, "name", type(model).__name__)),
                        input_shape=tuple(input_shape), layers=tuple(layers),
                        blocks=block_profiles)


def _layer_profile(module: nn.Module, name: str, block: int, inp: torch.Tensor,
                   output: torch.Tensor, reads_block_input: bool) -> LayerProfile:
    out_numel = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = out_numel * (module.in_channels // module.groups) * kh * kw
    else:
        macs = out_numel * module.in_features
    param_name = f"{name}.weight"
    parts = param_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or int(parts[1]) != block:
        raise CostError(f"layer '{param_name}' is not inside model.blocks[{block}]; every "
                        "Conv2d/Linear must belong to exactly one freezing block")
    return LayerProfile(name=param_name, block=block, forward_flops=2 * macs,
                        weight_numel=module.weight.numel(), input_numel=inp[0].numel(),
                        output_numel=out_numel, reads_block_input=reads_block_input)


def _check(profile: ModelProfile, densities: Mapping[str, float], num_frozen: int) -> None:
    if not 0 <= num_frozen <= profile.num_blocks:
        raise CostError(f"num_frozen must be in 0..{profile.num_blocks}, got {num_frozen}")
    known = {layer.name for layer in profile.layers}
    unknown = sorted(set(densities) - known)
    if unknown:
        raise CostError(f"densities name layers the model does not have: {unknown[:3]}; "
                        f"use weight parameter names such as '{profile.layers[0].name}'")
    bad = {n: d for n, d in densities.items() if not 0.0 <= d <= 1.0}
    if bad:
        raise CostError(f"densities must be in [0, 1], got {bad}")


def training_flops_per_sample(profile: ModelProfile, densities: Mapping[str, float],
                              num_frozen: int) -> FlopsBreakdown:
    """Training FLOPs of one sample with the first ``num_frozen`` blocks frozen.

    Every layer runs forward at ``dense FLOPs x density`` (layers absent from
    ``densities`` are dense). Frozen blocks have no backward (SpFDE §3.2). In trainable
    blocks the weight gradient costs the layer's forward FLOPs and so does the input
    gradient, except for layers that read the input of the first trainable block (for
    block 0 that is the network input): that tensor does not require grad, so autograd
    skips its gradient.
    """
    _check(profile, densities, num_frozen)
    per_block = [[0.0, 0.0, 0.0] for _ in profile.blocks]
    for layer in profile.layers:
        flops = layer.forward_flops * densities.get(layer.name, 1.0)
        row = per_block[layer.block]
        row[0] += flops
        if layer.block < num_frozen:
            continue
        row[2] += flops
        if not (layer.block == num_frozen and layer.reads_block_input):
            row[1] += flops
    blocks = tuple(BlockFlops(*row) for row in per_block)
    forward = sum(b.forward for b in blocks)
    backward_input = sum(b.backward_input for b in blocks)
    backward_weight = sum(b.backward_weight for b in blocks)
    return FlopsBreakdown(forward=forward, backward_input=backward_input,
                          backward_weight=backward_weight,
                          total=forward + backward_input + backward_weight, per_block=blocks)


def dense_train_flops_per_sample(profile: ModelProfile) -> FlopsBreakdown:
    """The dense reference: all weights active, nothing frozen."""
    return training_flops_per_sample(profile, {}, 0)


def _nonzeros(layer: LayerProfile, densities: Mapping[str, float]) -> int:
    return int(round(densities.get(layer.name, 1.0) * layer.weight_numel))


def training_memory_bytes(profile: ModelProfile, densities: Mapping[str, float],
                          num_frozen: int, batch_size: int) -> MemoryBreakdown:
    """Memory of one fp32 training step, by the SpFDE paper's model.

    * weights: all blocks. A layer in ``densities`` with density < 1 is stored compactly,
      nonzeros at 4 B plus a 2 B index each; other weights, biases and BatchNorm
      parameters at 4 B per element.
    * activations: trainable blocks store ``activation_numel`` per sample; frozen blocks
      store nothing, but the largest frozen-block output is held once because it feeds
      the trainable suffix.
    * weight gradients: trainable blocks, masked weights at their nonzeros only, plus
      biases and BatchNorm parameters, 4 B each.
    * activation gradients: two live buffers the size of the largest activation in the
      trainable part.

    Optimizer state and framework workspace are not included.
    """
    _check(profile, densities, num_frozen)
    if batch_size < 1:
        raise CostError(f"batch_size must be positive, got {batch_size}")
    weights = 0
    grads = 0
    for index, block in enumerate(profile.blocks):
        layers = [layer for layer in profile.layers if layer.block == index]
        other = block.param_numel - sum(layer.weight_numel for layer in layers)
        stored = other * FP32_BYTES
        for layer in layers:
            nnz = _nonzeros(layer, densities)
            if densities.get(layer.name, 1.0) < 1.0:
                stored += nnz * (FP32_BYTES + SPARSE_INDEX_BYTES)
            else:
                stored += layer.weight_numel * FP32_BYTES
            if index >= num_frozen:
                grads += nnz * FP32_BYTES
        weights += stored
        if index >= num_frozen:
            grads += other * FP32_BYTES
    trainable = profile.blocks[num_frozen:]
    frozen = profile.blocks[:num_frozen]
    activation_numel = sum(b.activation_numel for b in trainable)
    activation_numel += max((b.output_numel for b in frozen), default=0)
    largest = max((b.peak_activation_numel for b in trainable), default=0)
    activations = activation_numel * batch_size * FP32_BYTES
    activation_grads = 2 * largest * batch_size * FP32_BYTES
    return MemoryBreakdown(weights_bytes=weights, activations_bytes=activations,
                           weight_grads_bytes=grads, activation_grads_bytes=activation_grads,
                           total_bytes=weights + activations + grads + activation_grads)
