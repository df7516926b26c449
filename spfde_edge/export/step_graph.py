"""A whole training step of the sparse suffix in standard ONNX operators, for plain onnxruntime.

ONNX Runtime's on-device training build has no aarch64 Python wheel; plain ``onnxruntime``
has one on every board we target. So each stage also carries ``step.onnx``: one graph that
takes the suffix's parameters, masks, BatchNorm running statistics, features and labels,
and returns the loss, the logits, the updated running statistics and one gradient per
parameter. The device applies SGD with momentum in numpy (as with the ORT-training backend).

How it is built (route measured in ../shared/notes/training-graph.md, written anew here):
``torch.export`` of (suffix + cross entropy) with a symbolic batch, then the joint
forward/backward graph from ``_decompose_exported_program(joint_loss_index=0)`` with
decompositions chosen so that only standard ONNX operators remain:

* BatchNorm is decomposed into reductions. Left as ONNX ``BatchNormalization`` with
  training_mode=1, the plain onnxruntime CPU build silently normalises with the running
  statistics: wrong loss and gradients, no error.
* ``convolution_backward`` has no ONNX translation; :func:`convolution_backward` below
  writes it as forward convolutions and per-tap products.

The flat joint graph is then exported with ``torch.onnx.export(dynamo=True)`` (IR 10).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spfde_edge.models import BlockModel

from .suffix import FEATURES_INPUT, LABELS_INPUT, LOGITS_OUTPUT, TrainableSuffix

STEP_FILE = "step.onnx"
STATE_FILE = "suffix_state.npz"
LOSS_OUTPUT = "loss"
NEW_SUFFIX = ".new"      # output name of an updated running statistic
GRAD_SUFFIX = ".grad"    # output name of a parameter's gradient
STEP_OPSET = 18          # the dynamo exporter's lowest opset
BACKEND = "onnxruntime"  # the device backend name that runs this graph

aten = torch.ops.aten


def _tap_ranges(tap: int, size_in: int, size_out: int, stride: int, padding: int, dilation: int):
    """Output positions of one kernel tap that read inside the (unpadded) input.

    Output ``o`` reads input ``o * stride + tap * dilation - padding``; returns the first
    and last such ``o`` and the input position of the first, or None if none is inside.
    """
    offset = tap * dilation - padding
    first = 0 if offset >= 0 else -(offset // stride)
    last = min(size_out - 1, (size_in - 1 - offset) // stride)
    if last < first:
        return None
    return first, last, first * stride + offset


def convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    """``aten.convolution_backward`` in ops that have ONNX translations.

    * input gradient: stride 1 is a convolution of the output gradient with the flipped,
      channel-swapped kernel (measured faster in onnxruntime than ConvTranspose); otherwise
      a transposed convolution, with output_padding recovering the input size;
    * weight gradient: one matrix product per kernel tap between the output gradient and
      the input window that tap reads (both channels-first). The windows are cut from the unpadded input (no Pad
      node): padding the input made torch.export fix the batch size;
    * depthwise convolutions (groups == channels) use per-channel products, other grouped
      ones (RegNet, ResNeXt, ShuffleNet) one batched product per tap over the groups.
    """
    if transposed:
        raise NotImplementedError("transposed convolutions are not supported in the step graph")
    out_channels, in_per_group, kh, kw = weight.shape
    in_channels = inp.shape[1]
    depthwise = groups > 1 and groups == in_channels == out_channels and in_per_group == 1
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        if all(s == 1 for s in stride) and groups == 1:
            flipped = weight.flip(2, 3).transpose(0, 1)
            pad = [dilation[i] * (weight.shape[2 + i] - 1) - padding[i] for i in range(2)]
            if min(pad) >= 0:
                grad_input = aten.convolution(grad_out, flipped, None, [1, 1], pad, dilation, False,
                                              [0, 0], 1)
        if grad_input is None:
            extra = [(inp.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
                     % stride[i] for i in range(2)]
            grad_input = aten.convolution(grad_out, weight, None, stride, padding, dilation, True,
                                          extra, groups)
    if output_mask[1]:
        # Channels first once, so each tap is a plain (out x N·H·W) @ (N·H·W x in) product
        # (measured: 30% less step time on resnet32x2 than an einsum per tap).
        g_all = grad_out.permute(1, 0, 2, 3)
        x_all = inp.permute(1, 0, 2, 3)
        taps = []
        for i in range(kh):
            for j in range(kw):
                rows = _tap_ranges(i, inp.shape[2], grad_out.shape[2], stride[0], padding[0], dilation[0])
                cols = _tap_ranges(j, inp.shape[3], grad_out.shape[3], stride[1], padding[1], dilation[1])
                if rows is None or cols is None:
                    taps.append(weight.new_zeros(out_channels, in_per_group))
                    continue
                (r0, r1, ri), (c0, c1, ci) = rows, cols
                g = g_all[:, :, r0:r1 + 1, c0:c1 + 1]
                x = x_all[:, :, ri:ri + stride[0] * (r1 - r0) + 1:stride[0],
                          ci:ci + stride[1] * (c1 - c0) + 1:stride[1]]
                if depthwise:
                    taps.append((g * x).sum(dim=(1, 2, 3)).unsqueeze(1))
                elif groups > 1:   # one product per group, batched: (G, out/G, ·) @ (G, ·, in/G)
                    per_group = g.reshape(groups, out_channels // groups, -1) @ \
                        x.reshape(groups, in_per_group, -1).transpose(1, 2)
                    taps.append(per_group.reshape(out_channels, in_per_group))
                else:
                    taps.append(g.reshape(out_channels, -1) @ x.reshape(in_channels, -1).t())
        grad_weight = torch.stack(taps, dim=-1).reshape(out_channels, in_per_group, kh, kw)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


@contextlib.contextmanager
def cached_onnx_registry():
    """Build torch.onnx's operator registry once per process instead of once per export.

    ``ONNXRegistry.from_torchlib()`` re-imports every torchlib function's IR on each
    ``torch.onnx.export`` call: measured 2 s per call, a third of a block's export time.
    Nothing here registers custom operators, so one registry per opset serves every call.
    """
    from torch.onnx._internal.exporter import _registration

    original = _registration.ONNXRegistry.from_torchlib
    cache: dict = _REGISTRY_CACHE

    def cached(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(*args, **kwargs)
        return cache[key]

    _registration.ONNXRegistry.from_torchlib = staticmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


_REGISTRY_CACHE: dict = {}


def decomposition_table() -> dict:
    """torch.onnx's own table (ops without an ONNX translation), plus the two overrides above.

    Using the exporter's table for the joint graph leaves nothing for ``torch.onnx.export`` to
    decompose, so its second decomposition pass (a full retrace, a third of the export time)
    is skipped; see :func:`_decomposed_already`.
    """
    from torch._decomp import decomposition_table as full
    from torch.onnx._internal.exporter import _decomp, _registration

    with cached_onnx_registry():
        registry = _registration.ONNXRegistry.from_torchlib()
    table = _decomp.create_onnx_friendly_decomposition_table(
        set(_decomp.get_onnx_implemented_overloads(registry)))
    # Cross entropy in plain reductions too: torch 2.14's ONNX translation of
    # nll_loss_backward drops the 1/N of the mean (gradients came out N times too large).
    # hardtanh_backward (ReLU6's) too: its ONNX translation passes the gradient at x == min and
    # x == max, PyTorch does not; a BatchNorm channel that a sparse mask left constant sits
    # exactly at 0 there, and its gradient came out 1/sqrt(eps) times a wrong nonzero.
    for op in (aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default,
               aten.native_batch_norm.default, aten.nll_loss_forward.default, aten.nll_loss_backward.default,
               aten.hardtanh_backward.default):
        table[op] = full[op]
    table[aten.convolution_backward.default] = convolution_backward
    return table


@contextlib.contextmanager
def _decomposed_already():
    """Let ``torch.onnx.export`` skip its decomposition pass: the joint graph is already in the
    exporter's operator set (torch 2.14's private ``_fx_passes.decompose_with_registry``)."""
    from torch.onnx._internal.exporter import _fx_passes

    original = _fx_passes.decompose_with_registry
    _fx_passes.decompose_with_registry = lambda program, registry: program
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


class _LossOfSuffix(nn.Module):
    """``(features, labels) -> (loss, logits)``; the suffix's batch-statistics outputs unused."""

    def __init__(self, suffix: TrainableSuffix):
        super().__init__()
        self.suffix = suffix

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.suffix(x)[0]
        return F.cross_entropy(logits, y), logits.detach()


class _FlatStep(nn.Module):
    """The joint graph with every parameter, mask and running statistic as a named input."""

    def __init__(self, gm, order: list[tuple[str, str]], constants: dict[str, torch.Tensor],
                 input_names: list[str], mutated: list[str], grads: list[str]):
        super().__init__()
        self.gm = gm
        self.order = order              # (kind, name) of every placeholder of gm
        self.constants = constants      # placeholders bound here (num_batches_tracked)
        self.input_names = input_names
        self.mutated = mutated          # per gm output: buffer name or "" (kept when in input_names)
        self.grads = grads

    def forward(self, *inputs):
        given = dict(zip(self.input_names, inputs))
        args = [self.constants[name] if name in self.constants else given[name] for _, name in self.order]
        outputs = self.gm(*args)
        kept = [o for o, m in zip(outputs, self.mutated) if m and m in given]
        n_mut = len(self.mutated)
        loss, logits = outputs[n_mut], outputs[n_mut + 1]
        return (loss, logits, *kept, *outputs[n_mut + 2:])


@dataclass
class StepGraph:
    path: Path
    state_path: Path
    inputs: list[str]            # graph inputs in order: state names, then features, labels
    outputs: list[str]           # loss, logits, <running stat>.new ..., <parameter>.grad ...
    parameters: list[str]
    masks: list[str]
    running_stats: list[str]
    export_s: float


def export_step_graph(model: BlockModel, masks: dict[str, torch.Tensor], k: int, example: torch.Tensor,
                      folder: Path, num_classes: int) -> StepGraph:
    """Write ``step.onnx`` and ``suffix_state.npz`` (the stage's starting state) into ``folder``."""
    from torch.export import Dim
    from torch.export.exported_program import _decompose_exported_program

    started = time.perf_counter()
    suffix = TrainableSuffix(model, k, masks).train()
    suffix.apply_masks()
    state = {name: t.detach().clone() for name, t in suffix.state_dict().items()}
    labels = torch.arange(example.shape[0]) % num_classes
    batch = Dim("batch", min=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(_LossOfSuffix(suffix), (example, labels),
                                       dynamic_shapes=({0: batch}, {0: batch}))
        joint = _decompose_exported_program(exported, cia_to_decomp={},
                                            python_decomp_table=decomposition_table(),
                                            joint_loss_index=0, decompose_custom_triton_ops=False)
    signature = joint.graph_signature

    def plain(target: str) -> str:
        return target.removeprefix("suffix.")

    order, constants = [], {}
    for spec in signature.input_specs:
        kind = spec.kind.name
        name = plain(spec.target) if kind in ("PARAMETER", "BUFFER") else spec.arg.name
        order.append((kind, name))
        if name.endswith("num_batches_tracked"):
            constants[name] = state[name]
    user_inputs = [n for kind, n in order if kind == "USER_INPUT"]
    parameters = [n for kind, n in order if kind == "PARAMETER"]
    buffers = [n for kind, n in order if kind == "BUFFER" and n not in constants]
    mask_names = [n for n in buffers if n.endswith("_mask")]
    running = [n for n in buffers if n.endswith(("running_mean", "running_var"))]
    unknown = sorted(set(buffers) - set(mask_names) - set(running))
    if unknown:
        raise RuntimeError(f"step graph has unexpected buffers {unknown[:5]}")
    kinds = [spec.kind.name for spec in signature.output_specs]
    n_mut = kinds.count("BUFFER_MUTATION")
    if kinds[n_mut:n_mut + 2] != ["LOSS_OUTPUT", "USER_OUTPUT"] or set(kinds[n_mut + 2:]) != {"GRADIENT_TO_PARAMETER"}:
        raise RuntimeError(f"unexpected joint graph outputs {sorted(set(kinds))}")
    mutated, grads = [], []
    for spec in signature.output_specs:
        kind = spec.kind.name
        if kind == "BUFFER_MUTATION":
            mutated.append(plain(spec.target) if plain(spec.target) in running else "")
        elif kind == "GRADIENT_TO_PARAMETER":
            grads.append(plain(spec.target))
    if grads != parameters:
        raise RuntimeError("step graph gradients do not follow the parameter order")
    input_names = parameters + mask_names + running + [FEATURES_INPUT, LABELS_INPUT]
    flat = _FlatStep(joint.graph_module, [(k_, n if k_ != "USER_INPUT" else
                                           (FEATURES_INPUT, LABELS_INPUT)[user_inputs.index(n)])
                                          for k_, n in order],
                     constants, input_names, mutated, grads)
    kept_running = [m for m in mutated if m]
    output_names = ([LOSS_OUTPUT, LOGITS_OUTPUT] + [n + NEW_SUFFIX for n in kept_running]
                    + [n + GRAD_SUFFIX for n in grads])
    args = tuple([state[n] for n in parameters + mask_names + running] + [example, labels])
    dynamic = tuple({0: batch} if n in (FEATURES_INPUT, LABELS_INPUT) else None for n in input_names)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STEP_FILE
    with warnings.catch_warnings(), _decomposed_already():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(flat, args, dynamo=True, opset_version=STEP_OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=(dynamic,), optimize=False, verbose=False,
                                    external_data=False)
    program.save(str(path), external_data=False)
    state_path = folder / STATE_FILE
    with open(state_path, "wb") as handle:
        np.savez(handle, **{n: state[n].cpu().numpy() for n in parameters + mask_names + running})
    return StepGraph(path=path, state_path=state_path, inputs=input_names, outputs=output_names,
                     parameters=parameters, masks=mask_names, running_stats=kept_running,
                     export_s=time.perf_counter() - started)


# -- parity ------------------------------------------------------------------------------------

def _norm_rel(pairs) -> float:
    diff = sum(float(np.sum((np.asarray(a, dtype=np.float64) - b) ** 2)) for a, b in pairs)
    norm = sum(float(np.sum(np.asarray(b, dtype=np.float64) ** 2)) for _, b in pairs)
    return (diff / max(norm, 1e-300)) ** 0.5


def check_step_graph(model: BlockModel, masks: dict[str, torch.Tensor], k: int, graph: StepGraph,
                     artifacts_folder: Path, batch_size: int, feature_shape: list[int], num_classes: int,
                     lr: float = 0.01, seed: int = 0) -> dict:
    """One step of ``step.onnx`` on plain onnxruntime against float64 PyTorch and ORT training.

    * loss, gradients (as one vector) and updated running statistics against the PyTorch
      suffix computed in float64 (see suffix.check_suffix for why float64);
    * loss and the weights after one SGD step (lr) against the stage's ORT training
      artifacts from the same state: the two device backends must agree (issue 6: ≤ 1e-4).
    """
    import onnxruntime

    from device_runner.backends._ort import inference_options
    from onnxruntime.training.api import CheckpointState, Module

    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn([batch_size, *feature_shape], generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    with np.load(graph.state_path) as data:
        state = {n: data[n] for n in data.files}
    session = onnxruntime.InferenceSession(str(graph.path), inference_options(),
                                           providers=["CPUExecutionProvider"])
    feeds = {n: state[n] for n in graph.inputs[:-2]}
    feeds[graph.inputs[-2]], feeds[graph.inputs[-1]] = x.numpy(), y.numpy()
    out = dict(zip(graph.outputs, session.run(None, feeds)))

    reference = TrainableSuffix(model, k, masks).double().train()
    reference.apply_masks()
    ref_loss = F.cross_entropy(reference(x.double())[0], y)
    ref_loss.backward()
    ref_grads = {n: p.grad.numpy() for n, p in reference.named_parameters()}
    buffers = dict(reference.named_buffers())

    ckpt = CheckpointState.load_checkpoint(str(artifacts_folder / "checkpoint"))
    module = Module(str(artifacts_folder / "training_model.onnx"), ckpt, str(artifacts_folder / "eval_model.onnx"))
    module.train()
    ort_loss = float(module(x.numpy(), y.numpy().astype(np.int64))[0])
    step_weights, ort_weights = [], []
    for name in graph.parameters:
        w = state[name].astype(np.float64)
        step_weights.append(w - lr * out[name + GRAD_SUFFIX])
        ort_weights.append(w - lr * ckpt.parameters[name].grad)
    return {
        "step_graph_loss_rel": abs(float(out[LOSS_OUTPUT]) - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12),
        "step_graph_grads_rel": _norm_rel([(out[n + GRAD_SUFFIX], ref_grads[n]) for n in graph.parameters]),
        "step_graph_weights_rel": _norm_rel([(state[n] - lr * out[n + GRAD_SUFFIX],
                                              state[n].astype(np.float64) - lr * ref_grads[n])
                                             for n in graph.parameters]),
        "step_graph_running_rel": max((float(np.abs(out[n + NEW_SUFFIX] - buffers[n].numpy()).max())
                                       / max(float(np.abs(buffers[n].numpy()).max()), 1e-12)
                                       for n in graph.running_stats), default=0.0),
        "step_graph_vs_ort_loss_rel": abs(float(out[LOSS_OUTPUT]) - ort_loss) / max(abs(ort_loss), 1e-12),
        "step_graph_vs_ort_weights_rel": _norm_rel(list(zip(step_weights, ort_weights))),
    }
