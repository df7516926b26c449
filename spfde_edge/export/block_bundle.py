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
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from device_runner.errors import BundleError
from device_runner.manifest import BlockEntry, Flops, TensorSpec, WeightsEntry
from device_runner.weight_store import STORE_FILE, store_bytes_per_tensor, write_weights
from spfde_edge import cost

from .block_programs import (GRAD_INPUT, GRAD_OUTPUT, GRAD_SUFFIX, INPUT, NEW_SUFFIX, OUTPUT,
                             BlockPrograms, export_block, structure_key)
from .parity import ParityError, grads_summary
from .source import Source

BLOCKS_DIR = "blocks"

# Per-block programs against PyTorch in float64 (keys as in check_block). Gradients are held to
# the same bound as the step graph's: a wrong graph is off by O(1).
TOLERANCES_V2 = {
    "infer_rel": 1e-4,
    "train_output_rel": 1e-4,
    "running_rel": 1e-4,
    "grad_input_rel": 1e-3,
    "grads_rel": 1e-3,           # these three also pass per tensor within 10x PyTorch
                                 # float32's own error ("*_excess" <= 1, check_block)
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
    # PyTorch in float32, the host's own precision: where a gradient is a near-cancelling sum
    # (a BatchNorm bias behind a squeeze-and-excitation gate) float32 itself is 1e-2 off the
    # float64 value, and no float32 program can do better. Each tensor is held to
    # max(tolerance, 10 x PyTorch float32's own error) ("*_excess" <= 1).
    host = copy.deepcopy(model.blocks[index]).float().train()
    x32 = torch.from_numpy(xs).requires_grad_(True)
    (host(x32) * torch.from_numpy(grad_y)).sum().backward()
    ref_params, host_params = dict(reference.named_parameters()), dict(host.named_parameters())
    ref_buffers, host_buffers = dict(reference.named_buffers()), dict(host.named_buffers())
    running = [(out[n.removeprefix(local) + NEW_SUFFIX], host_buffers[n.removeprefix(local)],
                ref_buffers[n.removeprefix(local)]) for n in programs.running_stats]
    params = [(grads[n.removeprefix(local) + GRAD_SUFFIX], host_params[n.removeprefix(local)].grad,
               ref_params[n.removeprefix(local)].grad) for n in programs.parameters]
    grad_input = [(grads[GRAD_INPUT], x32.grad, x64.grad)]
    return {
        "infer_rel": _norm_rel(infer, expected),
        "train_output_rel": _norm_rel(out[OUTPUT], y.detach().numpy()),
        **_against_float64("running", running, TOLERANCES_V2["running_rel"]),
        **_against_float64("grad_input", grad_input, TOLERANCES_V2["grad_input_rel"]),
        **_against_float64("grads", params, TOLERANCES_V2["grads_rel"]),
    }


def check_block_on_halves(model, programs: BlockPrograms, x: torch.Tensor, seed: int) -> dict[str, float]:
    """check_block on ``x``; if that fails, on each half of ``x``, and the first that passes is kept
    (``parity_batch_part``: 0 the whole batch, 1 or 2 a half).

    A ReLU input within float32 rounding of 0 may fall on the other side of the kink in ONNX
    Runtime than in float64 PyTorch, and that one element's gradient then runs back through the
    block (resnet50's layer2.2: 1 of 524,288 outputs, 0.0 in float32 and 2.2e-8 in float64, moved
    every gradient by 3e-3). That is a property of the sample, not of the program: a wrong
    program fails on every sample, so a check that passes on other samples of the same batch
    passes."""
    parity = check_block(model, programs, x, seed)
    if _passes(parity) or x.shape[0] < 4:
        return {**parity, "parity_batch_part": 0}
    half = x.shape[0] // 2
    for part, sample in ((1, x[:half]), (2, x[half:])):
        retry = check_block(model, programs, sample, seed)
        if _passes(retry):
            return {**retry, "parity_batch_part": part}
    return {**parity, "parity_batch_part": 0}


def _passes(parity: dict[str, float]) -> bool:
    try:
        _check("", parity)
    except ParityError:
        return False
    return True


def _against_float64(kind: str, triples: list, tolerance: float) -> dict[str, float]:
    """(ONNX value, PyTorch float32, PyTorch float64) per tensor -> the ONNX error, PyTorch
    float32's own error, and the ONNX error over its allowance (see check_block)."""
    onnx_err, torch_err, excess, squared_error, squared_norm = 0.0, 0.0, 0.0, 0.0, 0.0
    for ours, host, exact in triples:
        exact = exact.detach().numpy()
        ours_rel, host_rel = _norm_rel(ours, exact), _norm_rel(host.detach().numpy(), exact)
        onnx_err, torch_err = max(onnx_err, ours_rel), max(torch_err, host_rel)
        excess = max(excess, ours_rel / max(tolerance, 10 * host_rel))
        squared_error += float(np.sum((np.asarray(ours, np.float64) - exact) ** 2))
        squared_norm += float(np.sum(exact.astype(np.float64) ** 2))
    return {f"{kind}_rel": onnx_err, f"{kind}_torch32_rel": torch_err, f"{kind}_excess": excess,
            f"{kind}_all_rel": math.sqrt(squared_error) / max(math.sqrt(squared_norm), 1e-30)}


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
                if key in parity and not parity[key] <= limit and not _within_float32(parity, key)]
    if failures:
        raise ParityError(f"{where} failed its parity checks ({'; '.join(failures)}); nothing was written")


def _within_float32(parity: dict[str, float], key: str) -> bool:
    """``key`` (``grads_rel``) has an allowance record (``grads_excess``, check_block) within 1."""
    return key.endswith("_rel") and parity.get(key[: -len("_rel")] + "_excess", math.inf) <= 1.0


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
    host = TrainableSuffix(model, k, masks={}).float().train()   # the host's own precision
    F.cross_entropy(host(features)[0], labels).backward()
    host_grads = {n: p.grad.numpy().ravel() for n, p in host.named_parameters()}
    del host
    reference = TrainableSuffix(model, k, masks={}).double().train()
    loss = F.cross_entropy(reference(features.double())[0], labels)
    loss.backward()
    grads = dict(reference.named_parameters())
    # Norm-relative over all gradients as one vector: a BatchNorm bias's gradient nearly
    # cancels in deep nets, so one tensor's ratio divides float32 rounding by almost
    # nothing (measured 1.7e-3 on resnet18's worst tensor against float64). Deep nets
    # (resnet50: 8.8e-3) are held to 10x PyTorch float32's own error, as check_block does.
    error = host_error = reference_norm = 0.0
    for name in artifacts.parameters:
        expected = grads[name].grad.numpy().ravel()
        error += float(np.sum((ort_grads.pop(name).astype(np.float64) - expected) ** 2))
        host_error += float(np.sum((host_grads.pop(name).astype(np.float64) - expected) ** 2))
        reference_norm += float(np.sum(expected ** 2))
    norm = max(math.sqrt(reference_norm), 1e-30)
    ort_rel, host_rel = math.sqrt(error) / norm, math.sqrt(host_error) / norm
    return {"ort_loss_rel": abs(ort_loss - loss.item()) / max(abs(loss.item()), 1e-12),
            "ort_grads_rel": ort_rel, "ort_grads_torch32_rel": host_rel,
            "ort_grads_excess": ort_rel / max(TOLERANCES_V2["ort_grads_rel"], 10 * host_rel)}


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

    produced = export_training_artifacts(model, list(range(len(model.blocks))), example[:ORT_PARITY_BATCH],
                                         tmp, opset)
    # BatchNorm over 4 samples on a 2x2 map is ill-conditioned, and a float32 ReLU/ReLU6 input on
    # the other side of a kink than in float64 moves one sample's gradient through every block
    # (timm's efficientnet_lite0 after one epoch: ORT 0.12 and float32 PyTorch 0.017 off float64
    # on one batch of 4; 6e-5 and 3e-5 on 8 samples). A wrong graph fails every batch, so the
    # first of these that passes is kept (``ort_parity_batch_part``): the first 4 samples (the
    # smallest memory: this check sets resnet18's export peak), the first 8, the next 8.
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (example.shape[0],), generator=generator)
    windows = [slice(0, ORT_PARITY_BATCH)] + [w for w in (slice(0, 2 * ORT_PARITY_BATCH),
                                                          slice(2 * ORT_PARITY_BATCH, 4 * ORT_PARITY_BATCH))
                                              if w.stop <= example.shape[0]]
    for part, window in enumerate(windows):
        attempt = check_boundary(model, produced[0], example[window], labels[window], tmp)
        attempt["ort_parity_batch_part"] = part
        if part == 0:
            parity = attempt
        if _passes(attempt):
            parity = attempt
            break
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


def _lowering_reason(exc: BaseException) -> str:
    """The operator a lowering failed on, from torch.export / torch.onnx's message, in one line."""
    text = f"{type(exc).__name__}: {exc}"
    op = re.search(r"aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"operator {op.group(0)} ({first[:160]})" if op else first[:200]


def _ort_boundaries_or_refuse(model, tmp: Path, example: torch.Tensor, options, num_classes: int):
    """export_ort_boundaries, with ONNX Runtime's gradient-builder failures as one line naming
    the operator and the block (its messages carry the node name ``/blocks.<i>/...``)."""
    try:
        return export_ort_boundaries(model, tmp, example, options.opset, num_classes, options.seed)
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc)
        op = re.search(r"has not been registered: (\w+) for node (\S+)", text)
        block = re.search(r"\bblocks\.(\d+)[/.]", text)     # node /blocks.3/… or module blocks.3.bn1
        where = (f"block {block.group(1)} ({model.block_names[int(block.group(1))]})" if block else "the model")
        what = (f"has no gradient for {op.group(1)}" if op
                else f"cannot build the gradient graph ({text.strip().splitlines()[-1][-160:]})")
        raise BundleError(f"ONNX Runtime training {what} in {where}; export with --no-ort-training (the "
                          "device then trains on the block chain, on any ONNX Runtime build) or replace "
                          "that layer") from exc


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
    if options.ort_training:
        ort_entries, ort_parity = _ort_boundaries_or_refuse(model, tmp, inputs[0], options,
                                                            len(source.classes))
        _check("the ONNX Runtime training artifacts", ort_parity)
        log(f"  ONNX Runtime training artifacts for {len(ort_entries)} boundaries (no weights) in "
            f"{time.perf_counter() - started:.1f} s (loss {ort_parity['ort_loss_rel']:.1e}, "
            f"grads {ort_parity['ort_grads_rel']:.1e}), peak RSS {_peak_rss_mb():.0f} MB")
        release_export_caches()
    else:
        ort_entries, ort_parity = [], {}
        log("  no ONNX Runtime training artifacts (--no-ort-training): the device trains on the block "
            "chain (suffix_backend onnxruntime or auto)")
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
            try:
                programs = export_block(model, index, inputs[index], tmp / rel)
            except KeyboardInterrupt:
                raise
            except BundleError as exc:
                raise BundleError(f"block {index} ({model.block_names[index]}): {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any lowering failure: one line naming the block
                raise BundleError(f"block {index} ({model.block_names[index]}) cannot be lowered to ONNX: "
                                  f"{_lowering_reason(exc)}; replace that layer (docs/models.md lists the "
                                  "supported ones)") from exc
            exported[key] = (rel, programs)
        lowered += programs.lowered
        parity = check_block_on_halves(model, programs, inputs[index][:parity_batch], options.seed)
        _check(f"block {index} ({model.block_names[index]})", parity)
        for key, value in parity.items():
            worst[key] = max(worst.get(key, 0.0), value)
        entries.append(_block_entry(model, programs, rel, source.masks, flops[index], parity))
        shared = "" if programs.lowered else f", programs shared with {rel}"
        log(f"  block {index:>2} {model.block_names[index]:<12} programs + parity in "
            f"{time.perf_counter() - started:.1f} s ({grads_summary(parity)}{shared}), "
            f"peak RSS {_peak_rss_mb():.0f} MB")
    worst["chain_logits_max_abs"] = check_chain(model, entries, tmp, inputs[0])
    _check("the chained blocks", worst)
    per_tensor = store_bytes_per_tensor(tmp / STORE_FILE)
    if sorted(per_tensor) != sorted(store.parameters + store.running_stats):
        raise RuntimeError("the weight store does not hold exactly the model's tensors")
    return store, entries, ort_entries, worst, lowered
