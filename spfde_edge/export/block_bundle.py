"""Bundle format 2: one sparse weight store, each block's programs once, parity, manifest.

``export_block_bundle`` fills a temporary folder that ``pipeline.export_bundle`` renames into
place, so a failed export leaves nothing behind:

    weights.safetensors          every weight once: active values + a 1-bit mask per masked layer
    blocks/<ii>/infer.onnx       per block structure, standard ONNX, parameters as inputs
    blocks/<ii>/train.onnx       (block_programs.py explains the four programs); blocks of the
    blocks/<ii>/backward.onnx    same structure (resnet32's layer1.1-1.4) share the folder of
    blocks/<ii>/backward_first.onnx   the first of them
    manifest.json                format_version 2

Export work is one lowering per block (``lowered`` counts them), so it grows with the number
of blocks, not with stages × depth; every block boundary is a possible freezing point.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from device_runner.manifest import BlockEntry, Flops, TensorSpec, WeightsEntry
from device_runner.weight_store import STORE_FILE, store_bytes_per_tensor, write_weights
from spfde_edge import cost

from .block_programs import (GRAD_INPUT, GRAD_OUTPUT, GRAD_SUFFIX, INPUT, NEW_SUFFIX, OUTPUT,
                             BlockPrograms, export_block, structure_key)
from .parity import ParityError
from .source import Source

BLOCKS_DIR = "blocks"

# Per-block programs against PyTorch in float64 (keys as in check_block). Gradients are held to
# the same bound as the step graph's: a wrong graph is off by O(1).
TOLERANCES_V2 = {
    "infer_rel": 1e-4,
    "train_output_rel": 1e-4,
    "running_rel": 1e-4,
    "grad_input_rel": 1e-3,
    "grads_rel": 1e-3,
    "chain_logits_max_abs": 1e-4,
    "ort_loss_rel": 1e-4,
    "ort_grads_rel": 1e-3,
}


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _norm_rel(a: np.ndarray, b: np.ndarray) -> float:
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def check_block(model: torch.nn.Module, programs: BlockPrograms, x: torch.Tensor, seed: int) -> dict[str, float]:
    """Block ``programs.index`` on ONNX Runtime against PyTorch in float64: eval forward,
    training forward (output and running statistics), and the backward of a random ``grad_y``."""
    index = programs.index
    state = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    xs = x.detach().cpu().numpy().astype(np.float32)
    local = f"blocks.{index}."
    feeds = {INPUT: xs, **{n.removeprefix(local): state[n] for n in programs.parameters + programs.running_stats}}
    reference = copy.deepcopy(model.blocks[index]).double()
    x64 = torch.from_numpy(xs).double()

    infer = _session(programs.path("infer")).run(None, feeds)[0]
    with torch.no_grad():
        expected = reference.eval()(x64).numpy()
    out = dict(zip([o.name for o in _session(programs.path("train")).get_outputs()],
                   _session(programs.path("train")).run(None, feeds)))
    grad_y = np.random.default_rng(seed + index).standard_normal(out[OUTPUT].shape).astype(np.float32)
    backward_feeds = {n.removeprefix(local): state[n] for n in programs.backward_parameters}
    if programs.backward_needs_input:
        backward_feeds[INPUT] = xs
    backward_feeds.update({n: out[n] for n in programs.saved})
    backward_feeds[GRAD_OUTPUT] = grad_y
    session = _session(programs.path("backward"))
    grads = dict(zip([o.name for o in session.get_outputs()], session.run(None, backward_feeds)))

    reference.train()
    x64.requires_grad_(True)
    y = reference(x64)
    (y * torch.from_numpy(grad_y).double()).sum().backward()
    ref_params = dict(reference.named_parameters())
    ref_buffers = dict(reference.named_buffers())
    return {
        "infer_rel": _norm_rel(infer, expected),
        "train_output_rel": _norm_rel(out[OUTPUT], y.detach().numpy()),
        "running_rel": max((_norm_rel(out[n.removeprefix(local) + NEW_SUFFIX], ref_buffers[n.removeprefix(local)].numpy())
                            for n in programs.running_stats), default=0.0),
        "grad_input_rel": _norm_rel(grads[GRAD_INPUT], x64.grad.numpy()),
        "grads_rel": max((_norm_rel(grads[n.removeprefix(local) + GRAD_SUFFIX], ref_params[n.removeprefix(local)].grad.numpy())
                          for n in programs.parameters), default=0.0),
    }


ORT_PARITY_BATCH = 4   # the float64 reference of a whole resnet18 at batch 16 took 0.5 GB


def release_export_caches() -> None:
    """Drop what a lowering left behind (operator registry, traced graphs) before the next."""
    import gc

    from .step_graph import _REGISTRY_CACHE

    _REGISTRY_CACHE.clear()
    torch._dynamo.reset()
    gc.collect()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _renamed(names: list[str], index: int) -> list[str]:
    """Another block's tensor names moved to block ``index`` (``blocks.<j>.x`` -> ``blocks.<index>.x``)."""
    return [f"blocks.{index}." + n.split(".", 2)[2] for n in names]


def _check(where: str, parity: dict[str, float]) -> None:
    failures = [f"{key} {parity[key]:.3g} > {limit}" for key, limit in TOLERANCES_V2.items()
                if key in parity and not parity[key] <= limit]
    if failures:
        raise ParityError(f"{where} failed its parity checks ({'; '.join(failures)}); nothing was written")


def _masked_model(source: Source) -> torch.nn.Module:
    """A copy of the model whose masked-out weights are exactly zero (what the store holds)."""
    model = copy.deepcopy(source.model).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            mask = source.masks.get(name)
            if mask is not None:
                param.mul_(mask.to(param.dtype))
    return model


def write_store(model: torch.nn.Module, masks: dict[str, torch.Tensor], path: Path) -> WeightsEntry:
    """Every parameter and running statistic once (num_batches_tracked is not device state)."""
    tensors = {n: t.detach().cpu().float().numpy() for n, t in model.state_dict().items()
               if not n.endswith("num_batches_tracked")}
    mask_arrays = {n: m.detach().cpu().numpy().astype(np.uint8) for n, m in masks.items()}
    size = write_weights(path, tensors, mask_arrays)
    parameters = tuple(n for n, _ in model.named_parameters())
    return WeightsEntry(file=path.name, parameters=parameters,
                        running_stats=tuple(n for n in tensors if n not in set(parameters)),
                        masked=tuple(sorted(mask_arrays)), bytes=size,
                        dense_bytes=sum(int(t.nbytes) for t in tensors.values()))


def _block_entry(model, programs: BlockPrograms, rel: str, masks: dict, flops: cost.BlockFlops,
                 parity: dict[str, float]) -> BlockEntry:
    def spec(name: str, shape: list[int]) -> TensorSpec:
        return TensorSpec(name=name, shape=("batch", *shape), dtype="float32")

    return BlockEntry(
        index=programs.index, name=model.block_names[programs.index],
        input=spec(INPUT, programs.input_shape), output=spec(OUTPUT, programs.output_shape),
        parameters=tuple(programs.parameters), running_stats=tuple(programs.running_stats),
        masks=tuple(n for n in programs.parameters if n in masks),
        infer=f"{rel}/infer.onnx", train=f"{rel}/train.onnx", backward=f"{rel}/backward.onnx",
        backward_first=f"{rel}/backward_first.onnx",
        backward_parameters=tuple(programs.backward_parameters),
        backward_needs_input=programs.backward_needs_input, saved=tuple(programs.saved),
        flops_per_sample=Flops(prefix_forward=flops.forward, suffix_forward=flops.forward,
                               suffix_backward=flops.backward_input + flops.backward_weight),
        parity=dict(parity))


def check_chain(model: torch.nn.Module, entries: list[BlockEntry], root: Path, example: torch.Tensor) -> float:
    """The blocks' infer programs chained end to end against the PyTorch model (eval mode):
    the largest logit difference. Each boundary's features are a prefix of this chain."""
    state = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    x = example.numpy().astype(np.float32)
    for entry in entries:
        local = f"blocks.{entry.index}."
        feeds = {INPUT: x, **{n.removeprefix(local): state[n] for n in entry.parameters + entry.running_stats}}
        x = _session(root / entry.infer).run(None, feeds)[0]
    with torch.no_grad():
        expected = model.eval()(example).numpy()
    return float(np.abs(x - expected).max())


def check_boundary(model: torch.nn.Module, artifacts, example: torch.Tensor, labels: torch.Tensor,
                   folder: Path) -> dict[str, float]:
    """One ORT training step at boundary ``artifacts.k`` from a checkpoint built the device's way
    (``write_checkpoint`` from the arrays), against the PyTorch suffix in float64.

    The two run one after the other, ORT first, and only ORT's float32 gradients outlive
    its session: together (a float64 copy of the model with its gradients beside ORT's
    training session) they set the export's peak memory (resnet18: +0.48 GB at boundary 0).
    """
    import gc

    from .suffix import TrainableSuffix

    k = artifacts.k
    with torch.no_grad():
        features = torch.nn.Sequential(*model.blocks[:k]).eval()(example)
    ort_loss, ort_grads = _ort_step(model, artifacts, features, labels, folder)
    gc.collect()
    reference = TrainableSuffix(model, k, masks={}).double().train()
    loss = F.cross_entropy(reference(features.double())[0], labels)
    loss.backward()
    grads = dict(reference.named_parameters())
    # Norm-relative over all gradients as one vector: a BatchNorm bias's gradient nearly
    # cancels in deep nets, so one tensor's ratio divides float32 rounding by almost
    # nothing (measured 1.7e-3 on resnet18's worst tensor against float64).
    error = reference_norm = 0.0
    for name in artifacts.parameters:
        expected = grads[name].grad.numpy().ravel()
        error += float(np.sum((ort_grads.pop(name).astype(np.float64) - expected) ** 2))
        reference_norm += float(np.sum(expected ** 2))
    return {"ort_loss_rel": abs(ort_loss - loss.item()) / max(abs(loss.item()), 1e-12),
            "ort_grads_rel": math.sqrt(error) / max(math.sqrt(reference_norm), 1e-30)}


def _ort_step(model: torch.nn.Module, artifacts, features: torch.Tensor, labels: torch.Tensor,
              folder: Path) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, gradient by parameter name) of one ORT training step at ``artifacts.k`` from a
    checkpoint written from the model's arrays; the session is gone when this returns."""
    import onnxruntime

    from device_runner.backends.ort_checkpoint import C, write_checkpoint

    state = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    path = folder / f"parity_checkpoint_{artifacts.k}"
    write_checkpoint(path, {n: state[n] for n in artifacts.parameters}, {n: state[n] for n in artifacts.frozen})
    try:
        checkpoint = C.load_checkpoint(str(path))
        options = onnxruntime.capi._pybind_state.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False   # its memory goes back before the reference runs
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        module = C.Module(str(artifacts.training_model), checkpoint, str(artifacts.eval_model), device, options)
        fetches = C.OrtValueVector()
        module.train_step([np.ascontiguousarray(features.numpy()), labels.numpy().astype(np.int64)], fetches)
        loss = float(fetches[0].numpy())
        grads = {n: checkpoint.get_parameter(n).grad.numpy().ravel() for n in artifacts.parameters}
        del fetches, module, checkpoint
        return loss, grads
    finally:
        path.unlink(missing_ok=True)


def export_ort_boundaries(model: torch.nn.Module, tmp: Path, example: torch.Tensor, opset: int,
                          num_classes: int, seed: int) -> tuple[list, dict[str, float]]:
    """Weightless ORT training artifacts for every block boundary (ort_artifacts.py), checked at
    the first boundary, which runs every block's training graph."""
    from device_runner.manifest import BatchNormEntry, OrtBoundary

    from .ort_artifacts import export_training_artifacts

    produced = export_training_artifacts(model, list(range(len(model.blocks))), example, tmp, opset)
    labels = torch.randint(0, num_classes, (example.shape[0],), generator=torch.Generator().manual_seed(seed))
    parity = check_boundary(model, produced[0], example, labels, tmp)
    entries = []
    for k, art in sorted(produced.items()):
        def rel(path: Path) -> str:
            return str(path.relative_to(tmp))

        entries.append(OrtBoundary(
            k=k, training_model=rel(art.training_model), eval_model=rel(art.eval_model),
            optimizer_model=rel(art.optimizer_model), parameters=tuple(art.parameters),
            frozen=tuple(art.frozen), training_outputs=tuple(art.training_outputs),
            eval_outputs=tuple(art.eval_outputs),
            batchnorms=tuple(BatchNormEntry(**row) for row in art.batchnorms)))
    return entries, parity


def export_block_bundle(source: Source, options, tmp: Path, example: torch.Tensor, batch_size: int,
                        log: Callable[[str], None]) -> tuple:
    """Write the store, every block's programs and the ORT boundaries into ``tmp``; returns
    (weights entry, block entries, ORT boundary entries, parity, lowered programs)."""
    model = _masked_model(source)
    model.eval()
    store = write_store(model, source.masks, tmp / STORE_FILE)
    log(f"  weights: {store.bytes / 2**20:.2f} MB in {STORE_FILE} "
        f"(dense {store.dense_bytes / 2**20:.2f} MB)")
    inputs = [example]
    with torch.no_grad():
        for block in model.blocks:
            inputs.append(block(inputs[-1]))
    size = source.input_size
    profile = cost.profile_model(model, (3, size, size))
    densities = {n: float(m.float().mean()) for n, m in source.masks.items()}
    flops = cost.training_flops_per_sample(profile, densities, 0).per_block
    parity_batch = inputs[0].shape[0]
    # The whole-model ORT lowering first: run after the block lowerings, whose memory the
    # allocator keeps, it added 0.45 GB to the export's peak RSS.
    started = time.perf_counter()
    ort_entries, ort_parity = export_ort_boundaries(model, tmp, inputs[0][:ORT_PARITY_BATCH], options.opset,
                                                    len(source.classes), options.seed)
    _check("the ONNX Runtime training artifacts", ort_parity)
    log(f"  ONNX Runtime training artifacts for {len(ort_entries)} boundaries (no weights) in "
        f"{time.perf_counter() - started:.1f} s (loss {ort_parity['ort_loss_rel']:.1e}, "
        f"grads {ort_parity['ort_grads_rel']:.1e}), peak RSS {_peak_rss_mb():.0f} MB")
    release_export_caches()
    entries, lowered, worst = [], 0, dict(ort_parity)
    exported: dict[str, tuple[str, BlockPrograms]] = {}   # structure key -> first block's programs
    for index in range(len(model.blocks)):
        started = time.perf_counter()
        key = structure_key(model, index, tuple(inputs[index].shape[1:]))
        if key in exported:
            rel, first = exported[key]
            programs = dataclasses.replace(first, index=index, parameters=_renamed(first.parameters, index),
                                           running_stats=_renamed(first.running_stats, index),
                                           backward_parameters=_renamed(first.backward_parameters, index),
                                           lowered=0)
        else:
            rel = f"{BLOCKS_DIR}/{index:02d}"
            programs = export_block(model, index, inputs[index], tmp / rel)
            exported[key] = (rel, programs)
        lowered += programs.lowered
        parity = check_block(model, programs, inputs[index][:parity_batch], options.seed)
        _check(f"block {index} ({model.block_names[index]})", parity)
        for key, value in parity.items():
            worst[key] = max(worst.get(key, 0.0), value)
        entries.append(_block_entry(model, programs, rel, source.masks, flops[index], parity))
        shared = "" if programs.lowered else f", programs shared with {rel}"
        log(f"  block {index:>2} {model.block_names[index]:<12} programs + parity in "
            f"{time.perf_counter() - started:.1f} s (grads {parity['grads_rel']:.1e}{shared}), "
            f"peak RSS {_peak_rss_mb():.0f} MB")
    worst["chain_logits_max_abs"] = check_chain(model, entries, tmp, inputs[0])
    _check("the chained blocks", worst)
    per_tensor = store_bytes_per_tensor(tmp / STORE_FILE)
    if sorted(per_tensor) != sorted(store.parameters + store.running_stats):
        raise RuntimeError("the weight store does not hold exactly the model's tensors")
    return store, entries, ort_entries, worst, lowered
