"""The bundle's typed manifest, built from the exported model and what each stage produced.

The types, the schema, the one writer and the one reader live in ``device_runner.manifest``
(the device imports them without torch); this module only fills them in.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

# One hasher: the device verifies exactly what the host wrote.
from device_runner.files import sha256_file
from device_runner.manifest import (BatchNormEntry, Block, Dst, FileEntry, Flops, Freezing,
                                    Layer, LrSchedule, Manifest, MaskEntry, ModelInfo, Normalization,
                                    PrefixEntry, Sieve, SourceInfo, Sparsity, Spfde, StageBytes,
                                    StageEntry, StepGraphEntry, SuffixEntry, TensorSpec)
from spfde_edge import cost

from . import prefix as prefix_io
from . import step_graph as step_io
from . import suffix as suffix_io
from .parity import TOLERANCES
from .source import Source

if TYPE_CHECKING:
    from .pipeline import ExportOptions

# What the exported graphs leave to the device (docs/bundle.md explains each).
DEVICE_TRAINING = {
    "optimizer_model": "SGD (ORT SGDOptimizerV2): w -= lr * grad; no momentum, no weight decay",
    "loss": "cross entropy, mean over the batch",
    "masks": "effective weight = weight * mask in the graph; masks are non-trainable "
             "checkpoint parameters '<weight>_mask' (uint8, 1 = active)",
    "batchnorm": "batch statistics in training; running statistics are non-trainable "
                 "checkpoint parameters that the device updates from the batch_mean/batch_var "
                 "training outputs: running = (1 - momentum) * running + momentum * batch",
}


@dataclass
class StageResult:
    """What exporting stage ``k`` into ``folder`` (relative to the bundle) produced."""

    k: int
    folder: str
    feature_shape: list[int]
    artifacts: suffix_io.SuffixArtifacts
    parity: dict[str, float]
    step: step_io.StepGraph | None


def file_table(root: Path, relative_paths: list[str]) -> dict[str, FileEntry]:
    """Every bundle file except the manifest itself, with its sha256 and size."""
    return {rel: FileEntry(sha256=sha256_file(root / rel), bytes=(root / rel).stat().st_size)
            for rel in sorted(relative_paths)}


def versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    import onnx
    import onnxruntime

    return {"spfde_edge": version("spfde-edge"), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "executorch": version("executorch")}


def _float32(name: str, shape: list) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(shape), dtype="float32")


def stage_entry(source: Source, result: StageResult, files: dict[str, FileEntry],
                profile: cost.ModelProfile, densities: dict, batch_size: int) -> StageEntry:
    model, k, rel, artifacts, step = source.model, result.k, result.folder, result.artifacts, result.step
    features = [batch_size, *result.feature_shape]
    prefix = None
    if k > 0:
        size = source.input_size
        prefix = PrefixEntry(pte=f"{rel}/{prefix_io.PTE_FILE}", onnx=f"{rel}/{prefix_io.ONNX_FILE}",
                             input=_float32(prefix_io.INPUT_NAME, [batch_size, 3, size, size]),
                             output=_float32(prefix_io.FEATURES_NAME, features),
                             pte_batch_size=batch_size)
    step_entry = None if step is None else StepGraphEntry(
        model=f"{rel}/{step_io.STEP_FILE}", state=f"{rel}/{step_io.STATE_FILE}", opset=step_io.STEP_OPSET,
        inputs=tuple(step.inputs), outputs=tuple(step.outputs), parameters=tuple(step.parameters),
        masks=tuple(step.masks), running_stats=tuple(step.running_stats))
    suffix = SuffixEntry(
        training_model=f"{rel}/training_model.onnx", eval_model=f"{rel}/eval_model.onnx",
        optimizer_model=f"{rel}/optimizer_model.onnx", checkpoint=f"{rel}/checkpoint",
        inputs=(_float32(suffix_io.FEATURES_INPUT, ["batch", *result.feature_shape]),
                TensorSpec(name=suffix_io.LABELS_INPUT, shape=("batch",), dtype="int64")),
        training_outputs=tuple(artifacts.training_outputs), eval_outputs=tuple(artifacts.eval_outputs),
        parameters=tuple(artifacts.parameters),
        masks=tuple(MaskEntry(name=m, weight=m[: -len(suffix_io.MASK_SUFFIX)]) for m in artifacts.masks),
        batchnorms=tuple(BatchNormEntry(**row) for row in artifacts.batchnorms),
        backends=("onnxruntime-training",) + ((step_io.BACKEND,) if step else ()),
        step_graph=step_entry)
    flops = cost.training_flops_per_sample(profile, densities, k)
    zeros = {name: int((~mask).sum()) for name, mask in source.masks.items()}
    prefix_zero_bytes = sum(4 * z for n, z in zeros.items() if model.block_of_parameter(n) < k)
    suffix_zero_bytes = sum(4 * z for n, z in zeros.items() if model.block_of_parameter(n) >= k)
    return StageEntry(
        stage=k, frozen_blocks=tuple(model.block_names[:k]), trainable_blocks=tuple(model.block_names[k:]),
        features=_float32(suffix_io.FEATURES_INPUT, features), prefix=prefix, suffix=suffix,
        flops_per_sample=Flops(
            prefix_forward=sum(b.forward for b in flops.per_block[:k]),
            suffix_forward=sum(b.forward for b in flops.per_block[k:]),
            suffix_backward=sum(b.backward_input + b.backward_weight for b in flops.per_block[k:])),
        bytes=StageBytes(
            total=sum(entry.bytes for p, entry in files.items() if p.startswith(rel + "/")),
            # zeros of sparse weights stored densely: twice in the prefix (.pte and .onnx),
            # once in the suffix checkpoint; the suffix's uint8 masks cost 1 B per weight.
            sparse_zeros=2 * prefix_zero_bytes + suffix_zero_bytes,
            masks=sum(source.masks[m.weight].numel() for m in suffix.masks)),
        parity=dict(result.parity))


def _sparsity(source: Source) -> Sparsity:
    model, config = source.model, source.config
    layers = []
    for name, param in model.named_parameters():
        if name.endswith(".weight") and param.dim() > 1:
            mask = source.masks.get(name)
            layers.append(Layer(name=name, block=model.block_of_parameter(name), shape=tuple(param.shape),
                                density=1.0 if mask is None else float(mask.float().mean()),
                                masked=mask is not None))
    total = sum(m.numel() for m in source.masks.values())
    active = sum(int(m.sum()) for m in source.masks.values())
    return Sparsity(target=config.sparsity, distribution=config.distribution,
                    overall=1.0 - active / total if total else 0.0, layers=tuple(layers))


def _spfde(source: Source) -> Spfde:
    config, plan = source.config, source.plan
    return Spfde(
        epochs=config.epochs, epochs_done=source.epoch, delta_tau=config.delta_tau,
        freezing=Freezing(freeze_epochs=tuple(plan.freeze_epochs), T_frz=plan.T_frz,
                          predicted_reduction=plan.reduction, num_frozen_now=source.num_frozen),
        sieve=Sieve(fraction=config.sieve, swap_fraction=config.sieve_swap),
        dst=Dst(algorithm=config.dst, update_fraction=config.update_fraction, lam=config.mest_lambda),
        lr_schedule=LrSchedule(base_lr=config.lr, warmup_epochs=config.warmup_epochs),
        momentum=config.momentum, weight_decay=config.weight_decay)


def model_info(source: Source, batch_size: int) -> ModelInfo:
    model, config, size = source.model, source.config, source.input_size
    return ModelInfo(
        name=config.model, width=config.width, cifar_stem=config.cifar_stem,
        num_classes=len(source.classes), classes=tuple(source.classes),
        input=_float32(prefix_io.INPUT_NAME, [batch_size, 3, size, size]),
        normalization=Normalization(mean=tuple(source.mean), std=tuple(source.std)),
        blocks=tuple(Block(index=i, name=n, parameters=sum(p.numel() for p in model.blocks[i].parameters()))
                     for i, n in enumerate(model.block_names)))


def _description(source: Source, options: ExportOptions, device_training: dict, tolerances: dict,
                 files: dict[str, FileEntry], batch_size: int, export_s: float) -> dict:
    """The fields every bundle format shares (``device_runner.manifest.BundleDescription``)."""
    return dict(
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        export_s=round(export_s, 3),
        model=model_info(source, batch_size),
        source=SourceInfo(checkpoint=source.checkpoint, epochs_done=source.epoch,
                          num_frozen=source.num_frozen),
        batch_size=batch_size,
        sparsity=_sparsity(source),
        spfde=_spfde(source),
        device_training=dict(device_training),
        tolerances=dict(tolerances),
        files=files,
        versions=versions(),
        export_options=dataclasses.asdict(options),
        train_config=source.config.to_dict(),
    )


def build_manifest(source: Source, options: ExportOptions, stages: list[StageEntry],
                   files: dict[str, FileEntry], batch_size: int, export_s: float) -> Manifest:
    return Manifest(stages=tuple(stages),
                    **_description(source, options, DEVICE_TRAINING, TOLERANCES, files, batch_size, export_s))


# -- format 2 ------------------------------------------------------------------------------

DEVICE_TRAINING_V2 = {
    "loss": "cross entropy, mean over the batch, in numpy on the last block's logits "
            "(device_runner/method/loss.py)",
    "masks": "not in any graph: masked weights are stored as exact zeros and the device "
             "multiplies each gradient by its mask before the SGD step (device_runner/method/sgd.py)",
    "batchnorm": "train.onnx returns each running statistic already updated "
                 "('<name>.new', PyTorch's momentum rule); infer.onnx uses the running statistics",
    "optimizer": "SGD with momentum and weight decay in numpy, per-block learning rates",
}


def build_manifest_v2(source: Source, options: ExportOptions, weights, blocks, ort_training,
                      parity: dict[str, float], tolerances: dict[str, float],
                      files: dict[str, FileEntry], batch_size: int, export_s: float):
    from device_runner.manifest import ManifestV2

    return ManifestV2(weights=weights, blocks=tuple(blocks), ort_training=tuple(ort_training),
                      parity=dict(parity),
                      **_description(source, options, DEVICE_TRAINING_V2, tolerances, files, batch_size,
                                     export_s))
