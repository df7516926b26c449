"""Export pipeline: source -> stages -> (prefix, suffix, parity) -> hashes -> manifest.

``export_bundle(ExportOptions)`` writes everything into a temporary folder beside the
output and renames it into place only when every stage passed its parity checks, so a
failed export never leaves a half-written bundle. ``inspect_bundle`` reads one back and
re-verifies every sha256.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from spfde_edge import cost
from spfde_edge.checkpoint import load_checkpoint
from spfde_edge.config import TrainConfig
from spfde_edge.freezing import FreezePlan, block_active_epochs, freeze_schedule
from spfde_edge.models import BlockModel, available_models, create_model
from spfde_edge.sparsity.masks import MaskSet

from . import manifest as manifest_io
from . import prefix as prefix_io
from . import step_graph as step_io
from . import suffix as suffix_io
from .manifest import BundleError, ParityError

# Fresh-model defaults: a sparse model with a freezing schedule, so that the bundle shows
# every part of SpFDE (the trainer's own defaults are dense and never freeze).
FRESH_SPARSITY = 0.9
FRESH_DISTRIBUTION = "erk"
FRESH_FREEZE_FLOPS = 0.3

# Parity measurements that must hold on every export (issue 3); keys as in check_prefix
# and check_suffix. The bundle is refused if any is exceeded.
TOLERANCES = {
    "pte_features_max_abs": 1e-4,
    "onnx_features_max_abs": 1e-4,
    "eval_logits_max_abs": 1e-4,
    "train_step_loss_rel": 1e-4,
    "train_step_weights_rel": 1e-4,
    "steps_loss_rel_max": 1e-4,
    "steps_weights_rel_max": 1e-4,
    "steps_running_stats_rel_max": 1e-4,
    "eval_after_steps_logits_max_abs": 1e-4,
    "masked_nonzero_after_steps": 0,
    "step_graph_loss_rel": 1e-4,
    "step_graph_weights_rel": 1e-4,
    # Gradients alone against float64: float32 accumulation through a deep stack of BatchNorms
    # was measured at 1.9e-3 on resnet32x2 from block 8 (ORT training's own: 7e-4); a wrong
    # graph is off by O(1) (a dropped 1/N gave 3-15). The weights after a step are held to 1e-4.
    "step_graph_grads_rel": 1e-2,
    "step_graph_running_rel": 1e-4,
    "step_graph_vs_ort_loss_rel": 1e-4,
    "step_graph_vs_ort_weights_rel": 1e-4,
}


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``python -m spfde_edge.export`` can be told; stored in the manifest."""

    model: str | None = None          # fresh model by name (or a check on --checkpoint's model)
    checkpoint: str | None = None     # runs/X/checkpoint.pt or runs/X
    out: str | None = None            # default export/<model>
    stages: str | None = None         # "k" or "a-b"; default from the freezing schedule
    batch_size: int | None = None     # device batch; default the run's batch size
    input_size: int | None = None     # default the run's (32 for a fresh model)
    num_classes: int | None = None    # fresh model only (default 10)
    width: float | None = None        # fresh model only
    cifar_stem: bool = True           # fresh model only
    sparsity: float | None = None     # fresh model only (default FRESH_SPARSITY)
    distribution: str | None = None   # fresh model only (default FRESH_DISTRIBUTION)
    freeze_flops: float | None = None  # fresh model only (default FRESH_FREEZE_FLOPS)
    epochs: int | None = None         # fresh model only: the schedule's length
    delta_tau: int | None = None      # fresh model only
    seed: int = 0                     # fresh model init and masks; parity batches
    parity_batch_size: int = 16       # suffix parity batch (capped at batch_size)
    force: bool = False               # replace a bundle of another model
    opset: int = 17
    step_graph: bool = True           # also write step.onnx (standard-ONNX step; aarch64 backend)
    parity_steps: int = 10
    parity_lr: float = 0.01


@dataclass
class Source:
    """The model to export with everything the manifest says about how it was made."""

    model: BlockModel
    masks: dict[str, torch.Tensor]
    config: TrainConfig
    plan: FreezePlan
    num_frozen: int
    epoch: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    checkpoint: str | None


_FRESH_ONLY = ("num_classes", "width", "sparsity", "distribution", "freeze_flops", "epochs",
               "delta_tau")


def _check_model_name(name: str) -> None:
    if name not in available_models():
        raise BundleError(f"unknown model '{name}'; known models: {', '.join(available_models())}")


def load_source(options: ExportOptions) -> Source:
    if options.checkpoint is not None:
        return _checkpoint_source(options)
    if options.model is None:
        raise BundleError("give --model NAME for a fresh model or --checkpoint PATH for a trained one")
    return _fresh_source(options)


def _checkpoint_source(options: ExportOptions) -> Source:
    given = [f"--{name.replace('_', '-')}" for name in _FRESH_ONLY
             if getattr(options, name) is not None]
    if given:
        raise BundleError(f"{', '.join(given)} only apply to a fresh model; a checkpoint "
                          "carries its own (drop them or drop --checkpoint)")
    state = load_checkpoint(Path(options.checkpoint))
    config = TrainConfig.from_dict(state["config"])
    if options.model is not None:
        _check_model_name(options.model)
        if options.model != config.model:
            raise BundleError(f"checkpoint {options.checkpoint} is for model '{config.model}', "
                              f"not '{options.model}'; drop --model or pick the right checkpoint")
    classes = [str(c) for c in state["classes"]]
    model = create_model(config.model, num_classes=len(classes), width=config.width,
                         cifar_stem=config.cifar_stem)
    if state.get("block_names", model.block_names) != model.block_names:
        raise BundleError(f"checkpoint blocks {state['block_names'][:3]}… do not match model "
                          f"'{config.model}'; it was written by another model definition")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise BundleError(f"checkpoint weights do not fit '{config.model}': "
                          f"{str(exc).splitlines()[0]}") from exc
    masks = {name: mask.to(torch.bool) for name, mask in state["masks"]["masks"].items()}
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise BundleError(f"checkpoint masks name weights that '{config.model}' lacks: {unknown[:3]}")
    plan_state = state["freeze_plan"]
    plan = FreezePlan(list(plan_state["freeze_epochs"]), plan_state.get("T_frz"),
                      float(plan_state.get("reduction", 0.0)))
    return Source(model=model.eval(), masks=masks, config=config, plan=plan,
                  num_frozen=int(state["num_frozen"]), epoch=int(state["epoch"]), classes=classes,
                  mean=[float(v) for v in state["mean"]], std=[float(v) for v in state["std"]],
                  input_size=int(state.get("input_size", config.input_size)),
                  checkpoint=str(options.checkpoint))


def _fresh_source(options: ExportOptions) -> Source:
    _check_model_name(options.model)
    defaults = TrainConfig()
    config = TrainConfig(
        model=options.model, width=options.width, cifar_stem=options.cifar_stem,
        input_size=options.input_size or defaults.input_size,
        batch_size=options.batch_size or defaults.batch_size,
        epochs=options.epochs or defaults.epochs, delta_tau=options.delta_tau or defaults.delta_tau,
        sparsity=FRESH_SPARSITY if options.sparsity is None else options.sparsity,
        distribution=options.distribution or FRESH_DISTRIBUTION,
        freeze_flops=FRESH_FREEZE_FLOPS if options.freeze_flops is None else options.freeze_flops,
        seed=options.seed).validate()
    num_classes = options.num_classes or 10
    # Same seeding as the trainer: init under a forked global RNG, masks from seed + 2.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(config.model, num_classes=num_classes, width=config.width,
                             cifar_stem=config.cifar_stem)
    maskset = MaskSet.random(model, config.sparsity, config.distribution,
                             torch.Generator().manual_seed(config.seed + 2))
    maskset.apply(model)
    profile = cost.profile_model(model, (3, config.input_size, config.input_size))
    densities = maskset.layer_density()
    plan = freeze_schedule(
        flops_fn=lambda k: cost.training_flops_per_sample(profile, densities, k).total,
        epochs=config.epochs, delta_tau=config.delta_tau, target_reduction=config.freeze_flops,
        max_frozen_fraction=config.max_frozen_fraction, num_blocks=len(model.blocks))
    return Source(model=model.eval(), masks=dict(maskset.masks), config=config, plan=plan,
                  num_frozen=0, epoch=0, classes=[str(i) for i in range(num_classes)],
                  mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], input_size=config.input_size,
                  checkpoint=None)


def resolve_stages(spec: str | None, source: Source) -> list[int]:
    """Stage k freezes blocks [0, k). Default: the current frozen point up to the last
    block the schedule freezes, so the device can keep freezing without the host."""
    num_blocks = len(source.model.blocks)
    if spec is None:
        return list(range(source.num_frozen, max(source.num_frozen, source.plan.num_frozen) + 1))
    try:
        low, _, high = spec.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        raise BundleError(f"--stages takes K or A-B (e.g. 4-6), got '{spec}'") from None
    if not 0 <= first <= last <= num_blocks - 1:
        raise BundleError(f"--stages {spec} is outside {source.config.model}: it has {num_blocks} "
                          f"blocks, so stages 0-{num_blocks - 1} (stage k freezes blocks before k; "
                          "the head always trains)")
    return list(range(first, last + 1))


def _identity(model: dict) -> str:
    """What makes two bundles the same model: architecture, width, stem and classes."""
    stem = "" if model.get("cifar_stem", True) else ", ImageNet stem"
    width = "default width" if model.get("width") is None else f"width {model.get('width')}"
    return f"{model.get('name')} ({width}, {model.get('num_classes')} classes{stem})"


def _check_out(out: Path, wanted: dict, force: bool) -> None:
    """Refuse to replace anything but an empty folder or a bundle of the same model."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return
    if not (out / manifest_io.MANIFEST_NAME).is_file():
        raise BundleError(f"--out {out} holds files that are not an spfde bundle; choose an empty "
                          "or new folder (--force only replaces bundles)")
    try:
        existing = _identity(manifest_io.read(out)["model"])
    except (BundleError, KeyError, TypeError):
        existing = "an unreadable bundle"
    if existing != _identity(wanted) and not force:
        raise BundleError(f"--out {out} holds a bundle of {existing}, not {_identity(wanted)}; "
                          "add --force to replace it or choose another --out")


def _versions() -> dict:
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


def _tensor(name: str, shape: list, dtype: str) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _check_parity(stage: int, parity: dict) -> None:
    failures = [f"{key} {parity[key]:.3g} > {limit}" for key, limit in TOLERANCES.items()
                if key in parity and not parity[key] <= limit]
    if failures:
        raise ParityError(f"stage {stage} failed its parity checks ({'; '.join(failures)}); "
                          "nothing was written")


def _stage_entry(source: Source, k: int, rel: str, files: dict, artifacts, parity: dict,
                 profile: cost.ModelProfile, densities: dict, batch_size: int,
                 feature_shape: list[int], step=None) -> dict:
    model = source.model
    flops = cost.training_flops_per_sample(profile, densities, k)
    prefix = None
    if k > 0:
        prefix = {"pte": f"{rel}/{prefix_io.PTE_FILE}", "onnx": f"{rel}/{prefix_io.ONNX_FILE}",
                  "input": _tensor(prefix_io.INPUT_NAME, [batch_size, 3, source.input_size, source.input_size], "float32"),
                  "output": _tensor(prefix_io.FEATURES_NAME, [batch_size, *feature_shape], "float32"),
                  "pte_batch_size": batch_size, "onnx_dynamic_batch": True}
    zeros = {name: int((~mask).sum()) for name, mask in source.masks.items()}
    prefix_zero_bytes = sum(4 * z for n, z in zeros.items() if model.block_of_parameter(n) < k)
    suffix_zero_bytes = sum(4 * z for n, z in zeros.items() if model.block_of_parameter(n) >= k)
    stage_files = [p for p in files if p.startswith(rel + "/")]
    return {
        "stage": k,
        "frozen_blocks": model.block_names[:k],
        "trainable_blocks": model.block_names[k:],
        "features": _tensor(suffix_io.FEATURES_INPUT, [batch_size, *feature_shape], "float32"),
        "prefix": prefix,
        "suffix": {
            "training_model": f"{rel}/training_model.onnx", "eval_model": f"{rel}/eval_model.onnx",
            "optimizer_model": f"{rel}/optimizer_model.onnx", "checkpoint": f"{rel}/checkpoint",
            "inputs": [_tensor(suffix_io.FEATURES_INPUT, ["batch", *feature_shape], "float32"),
                       _tensor(suffix_io.LABELS_INPUT, ["batch"], "int64")],
            "training_outputs": artifacts.training_outputs,
            "eval_outputs": artifacts.eval_outputs,
            "parameters": artifacts.parameters,
            "masks": [{"name": m, "weight": m[: -len(suffix_io.MASK_SUFFIX)]} for m in artifacts.masks],
            "batchnorms": artifacts.batchnorms,
            "backends": ["onnxruntime-training"] + ([step_io.BACKEND] if step else []),
            "step_graph": None if step is None else {
                "model": f"{rel}/{step_io.STEP_FILE}", "state": f"{rel}/{step_io.STATE_FILE}",
                "opset": step_io.STEP_OPSET, "inputs": step.inputs, "outputs": step.outputs,
                "parameters": step.parameters, "masks": step.masks, "running_stats": step.running_stats,
            },
        },
        "flops_per_sample": {
            "prefix_forward": sum(b.forward for b in flops.per_block[:k]),
            "suffix_forward": sum(b.forward for b in flops.per_block[k:]),
            "suffix_backward": sum(b.backward_input + b.backward_weight for b in flops.per_block[k:]),
        },
        "bytes": {
            "total": sum(files[p]["bytes"] for p in stage_files),
            # zeros of sparse weights stored densely: twice in the prefix (.pte and .onnx),
            # once in the suffix checkpoint; the suffix's uint8 masks cost 1 B per weight.
            "sparse_zeros": 2 * prefix_zero_bytes + suffix_zero_bytes,
            "masks": sum(source.masks[n[: -len(suffix_io.MASK_SUFFIX)]].numel()
                         for n in artifacts.masks),
        },
        "parity": parity,
    }


def _manifest(source: Source, options: ExportOptions, stages: list[dict], files: dict,
              batch_size: int, export_s: float) -> dict:
    model, config = source.model, source.config
    params = dict(model.named_parameters())
    layers = []
    for name, param in params.items():
        if name.endswith(".weight") and param.dim() > 1:
            mask = source.masks.get(name)
            layers.append({"name": name, "block": model.block_of_parameter(name),
                           "shape": list(param.shape),
                           "density": 1.0 if mask is None else float(mask.float().mean()),
                           "masked": mask is not None})
    total = sum(m.numel() for m in source.masks.values())
    active = sum(int(m.sum()) for m in source.masks.values())
    num_blocks = len(model.blocks)
    return {
        "format": manifest_io.BUNDLE_FORMAT,
        "format_version": manifest_io.BUNDLE_FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "export_s": round(export_s, 3),
        "model": {
            "name": config.model, "width": config.width, "cifar_stem": config.cifar_stem,
            "num_classes": len(source.classes), "classes": source.classes,
            "input": _tensor(prefix_io.INPUT_NAME, [batch_size, 3, source.input_size, source.input_size], "float32"),
            "normalization": {"mean": source.mean, "std": source.std,
                              "formula": "x = (pixel / 255 - mean[c]) / std[c]"},
            "blocks": [{"index": i, "name": n,
                        "parameters": sum(p.numel() for p in model.blocks[i].parameters())}
                       for i, n in enumerate(model.block_names)],
        },
        "source": {"checkpoint": source.checkpoint, "epochs_done": source.epoch,
                   "num_frozen": source.num_frozen},
        "batch_size": batch_size,
        "sparsity": {"target": config.sparsity, "distribution": config.distribution,
                     "overall": 1.0 - active / total if total else 0.0, "layers": layers},
        "spfde": {
            "epochs": config.epochs, "epochs_done": source.epoch, "delta_tau": config.delta_tau,
            "freezing": {"freeze_epochs": source.plan.freeze_epochs, "T_frz": source.plan.T_frz,
                         "predicted_reduction": source.plan.reduction,
                         "num_frozen_now": source.num_frozen},
            "sieve": {"fraction": config.sieve, "swap_fraction": config.sieve_swap},
            "dst": {"algorithm": config.dst, "update_fraction": config.update_fraction,
                    "update_every_epochs": config.delta_tau, "end_epoch": config.epochs,
                    "fraction_schedule": "update_fraction * 0.5 * (1 + cos(pi * epoch / end_epoch))"},
            "lr_schedule": {"type": "blockwise_cosine", "base_lr": config.lr, "warmup_epochs": 0.0,
                            "block_active_epochs": block_active_epochs(source.plan, num_blocks, config.epochs),
                            "formula": "lr_b(e) = 0.5 * base_lr * (1 + cos(pi * e / active_b)) "
                                       "for e < active_b, else 0"},
            "momentum": config.momentum, "weight_decay": config.weight_decay,
        },
        "device_training": {
            "optimizer_model": "SGD (ORT SGDOptimizerV2): w -= lr * grad; no momentum, no weight decay",
            "loss": "cross entropy, mean over the batch",
            "masks": "effective weight = weight * mask in the graph; masks are non-trainable "
                     "checkpoint parameters '<weight>_mask' (uint8, 1 = active)",
            "batchnorm": "batch statistics in training; running statistics are non-trainable "
                         "checkpoint parameters that the device updates from the batch_mean/batch_var "
                         "training outputs: running = (1 - momentum) * running + momentum * batch",
        },
        "stages": stages,
        "tolerances": TOLERANCES,
        "files": files,
        "versions": _versions(),
        "export_options": dataclasses.asdict(options),
        "train_config": config.to_dict(),
    }


def _replace_folder(tmp: Path, out: Path) -> None:
    """Swap the finished temporary folder into place (the old one is kept until then)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(options: ExportOptions, log: Callable[[str], None] = print) -> Path:
    """Export the bundle described by ``options``; returns its folder."""
    started = time.perf_counter()
    source = load_source(options)
    stages = resolve_stages(options.stages, source)
    out = Path(options.out or Path("export") / source.config.model)
    _check_out(out, {"name": source.config.model, "width": source.config.width,
                     "num_classes": len(source.classes), "cifar_stem": source.config.cifar_stem},
               options.force)
    batch_size = options.batch_size or source.config.batch_size
    if batch_size < 1:
        raise BundleError(f"--batch-size must be at least 1, got {batch_size}")
    size = source.input_size if options.input_size is None else options.input_size
    if size < 1:
        raise BundleError(f"--input-size must be positive, got {size}")
    source.input_size = size
    model = source.model
    profile = cost.profile_model(model, (3, size, size))
    densities = {n: float(m.float().mean()) for n, m in source.masks.items()}
    generator = torch.Generator().manual_seed(options.seed)
    example = torch.randn(batch_size, 3, size, size, generator=generator)
    log(f"exporting {source.config.model} ({'checkpoint ' + source.checkpoint if source.checkpoint else 'fresh'}), "
        f"stages {stages[0]}-{stages[-1]}, batch {batch_size}, input {size}x{size} -> {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        entries, stage_data = [], []
        for k in stages:
            stage_started = time.perf_counter()
            rel = f"stage_{k:02d}"
            folder = tmp / rel
            folder.mkdir()
            prefix = prefix_io.baked_prefix(model, source.masks, k)
            with torch.no_grad():
                features = prefix(example) if k > 0 else example
            feature_shape = list(features.shape[1:])
            parity = {}
            if k > 0:
                log(f"  stage {k}: prefix {model.block_names[0]}..{model.block_names[k - 1]} -> .pte, .onnx")
                prefix_io.export_prefix_pte(prefix, example, folder / prefix_io.PTE_FILE)
                prefix_io.export_prefix_onnx(prefix, example, folder / prefix_io.ONNX_FILE, options.opset)
                parity.update(prefix_io.check_prefix(prefix, folder, example))
            log(f"  stage {k}: suffix {model.block_names[k]}..{model.block_names[-1]} -> ORT training artifacts")
            artifacts = suffix_io.export_suffix(model, source.masks, k, features, folder, options.opset)
            # The suffix takes any batch; a small one keeps the float64 reference cheap.
            parity.update(suffix_io.check_suffix(
                model, source.masks, k, folder, artifacts,
                min(batch_size, options.parity_batch_size), feature_shape,
                len(source.classes), steps=options.parity_steps, lr=options.parity_lr, seed=options.seed))
            step = None
            if options.step_graph:
                log(f"  stage {k}: suffix -> standard-ONNX training step (step.onnx)")
                step = step_io.export_step_graph(model, source.masks, k, features, folder, len(source.classes))
                parity.update(step_io.check_step_graph(
                    model, source.masks, k, step, folder, min(batch_size, options.parity_batch_size),
                    feature_shape, len(source.classes), lr=options.parity_lr, seed=options.seed))
            _check_parity(k, parity)
            _check_ir_versions(folder)
            stage_data.append((k, rel, artifacts, parity, feature_shape, step))
            log(f"  stage {k}: parity ok ({_parity_line(parity)}), {time.perf_counter() - stage_started:.1f} s")
        relative = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = manifest_io.file_table(tmp, relative)
        for k, rel, artifacts, parity, feature_shape, step in stage_data:
            entries.append(_stage_entry(source, k, rel, files, artifacts, parity, profile, densities,
                                        batch_size, feature_shape, step))
        manifest = _manifest(source, options, entries, files, batch_size, time.perf_counter() - started)
        manifest_io.write(tmp, manifest)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(summary(manifest, out))
    return out


def _check_ir_versions(folder: Path) -> None:
    """ORT training 1.19 loads ONNX IR <= 10 and opsets <= 21."""
    import onnx

    for path in sorted(folder.glob("*.onnx")):
        proto = onnx.load(path, load_external_data=False)
        opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if proto.ir_version > 10 or opset > 21:
            raise BundleError(f"{path.name} has IR {proto.ir_version} / opset {opset}; "
                              "ONNX Runtime 1.19 needs IR <= 10 and opset <= 21 (use --opset 17)")


def _parity_line(parity: dict) -> str:
    keys = ["pte_features_max_abs", "onnx_features_max_abs", "eval_logits_max_abs",
            "train_step_loss_rel", "train_step_weights_rel", "eval_after_steps_logits_max_abs",
            "step_graph_vs_ort_weights_rel"]
    short = {"step_graph_vs_ort_weights_rel": "step.onnx","pte_features_max_abs": "pte", "onnx_features_max_abs": "onnx",
             "eval_logits_max_abs": "eval", "train_step_loss_rel": "loss",
             "train_step_weights_rel": "weights", "eval_after_steps_logits_max_abs": "eval+bn"}
    return " ".join(f"{short[k]} {parity[k]:.1e}" for k in keys if k in parity)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def summary(manifest: dict, root: Path) -> str:
    """The table printed after an export and by ``--inspect``."""
    lines = [f"bundle {root}: {_identity(manifest['model'])}, {len(manifest['stages'])} stage(s), "
             f"{len(manifest['files'])} files, {_mb(sum(f['bytes'] for f in manifest['files'].values()))}, "
             f"exported in {manifest['export_s']:.1f} s"]
    lines.append(f"{'stage':>5} {'frozen':>6} {'features':>18} {'size':>10} {'zeros':>10} "
                 f"{'prefix GF':>9} {'suffix fwd+bwd GF':>17}  parity")
    for stage in manifest["stages"]:
        flops = stage["flops_per_sample"]
        lines.append(
            f"{stage['stage']:>5} {len(stage['frozen_blocks']):>6} "
            f"{'x'.join(str(d) for d in stage['features']['shape']):>18} "
            f"{_mb(stage['bytes']['total']):>10} {_mb(stage['bytes']['sparse_zeros']):>10} "
            f"{flops['prefix_forward'] / 1e9:>9.4f} "
            f"{(flops['suffix_forward'] + flops['suffix_backward']) / 1e9:>17.4f}  "
            f"{_parity_line(stage['parity'])}")
    return "\n".join(lines)


def inspect_bundle(root: Path) -> str:
    """Describe the bundle in ``root`` after re-verifying every file's sha256."""
    root = Path(root)
    manifest = manifest_io.read(root)
    problems = manifest_io.verify_files(root, manifest)
    if problems:
        raise BundleError(f"bundle {root} is damaged: {'; '.join(problems[:5])}; re-export it")
    model = manifest["model"]
    spfde = manifest["spfde"]
    lines = [summary(manifest, root), "",
             f"classes: {', '.join(model['classes'][:20])}{' …' if len(model['classes']) > 20 else ''}",
             f"input: {model['input']['shape']} {model['input']['dtype']}, mean {model['normalization']['mean']}, "
             f"std {model['normalization']['std']}",
             "blocks: " + ", ".join(f"{b['index']}:{b['name']}" for b in model["blocks"]),
             f"schedule: epochs {spfde['epochs']} (done {spfde['epochs_done']}), Δτ {spfde['delta_tau']}, "
             f"freeze epochs {spfde['freezing']['freeze_epochs']}, dst {spfde['dst']['algorithm']} "
             f"(update fraction {spfde['dst']['update_fraction']}), sieve {spfde['sieve']['fraction']}",
             f"sparsity: {manifest['sparsity']['overall']:.3f} over masked layers "
             f"(target {manifest['sparsity']['target']}, {manifest['sparsity']['distribution']})"]
    for layer in manifest["sparsity"]["layers"]:
        lines.append(f"  {layer['name']:<40} {'x'.join(map(str, layer['shape'])):>16} "
                     f"density {layer['density']:.3f}{'' if layer['masked'] else ' (dense)'}")
    lines.append("files (sha256 verified):")
    for rel, entry in manifest["files"].items():
        lines.append(f"  {rel:<36} {entry['bytes']:>12,d} B  {entry['sha256'][:16]}…")
    versions = manifest["versions"]
    lines.append("exported with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)
