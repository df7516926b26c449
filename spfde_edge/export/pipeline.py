"""Export pipeline: source -> stages -> (prefix, suffix, step graph, parity) -> hashes -> manifest.

``export_bundle(ExportOptions)`` writes everything into a temporary folder beside the
output and renames it into place only when every stage passed its parity checks, so a
failed export never leaves a half-written bundle.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from device_runner import signing
from device_runner.errors import BundleError
from device_runner.manifest import MANIFEST_NAME, read_manifest, write_manifest
from spfde_edge import cost
from spfde_edge.models import folder_name

from . import manifest as manifest_io
from . import prefix as prefix_io
from . import step_graph as step_io
from . import suffix as suffix_io
from .inspect import model_identity, summary
from .parity import check_ir_versions, check_parity, grads_summary, parity_line
from .source import Source, load_source, resolve_stages, without_dropout


OPSETS = (14, 20)   # --opset range: lowest tested, highest the TorchScript exporter writes


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
    init_from: str | None = None      # fresh model only: pretrained weights (--init-from)
    bn_momentum: float | None = None  # fresh model only: BatchNorm momentum (--bn-momentum)
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
    bundle_format: int = 2            # 1: a graph set per stage (--stages); 2: one weight store +
                                      # per-block programs, every boundary (block_bundle.py)
    ort_training: bool = True         # format 2: also the ORT training artifacts (--no-ort-training)

    def validate(self) -> "ExportOptions":
        """Refuse values that cannot work (BundleError naming the option); ``None`` means the
        checkpoint's value or the fresh-model default, never a stand-in for a bad value."""
        checks = [
            (self.batch_size is None or self.batch_size >= 1,
             f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.input_size is None or self.input_size >= 1,
             f"--input-size must be at least 1 pixel, got {self.input_size}"),
            (self.num_classes is None or self.num_classes >= 2,
             f"--num-classes must be at least 2 (a classifier needs two classes), got {self.num_classes}"),
            (self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.delta_tau is None or self.delta_tau >= 1,
             f"--delta-tau must be at least 1 epoch, got {self.delta_tau}"),
            (OPSETS[0] <= self.opset <= OPSETS[1],
             f"--opset must be between {OPSETS[0]} and {OPSETS[1]} (the TorchScript ONNX exporter "
             f"and ONNX Runtime 1.19 both support these), got {self.opset}; the default is 17"),
            (self.parity_steps >= 1, f"--parity-steps must be at least 1 (every export checks "
                                     f"parity before writing a bundle), got {self.parity_steps}"),
            (self.parity_batch_size >= 1, f"parity_batch_size must be at least 1, got {self.parity_batch_size}"),
            (self.parity_lr > 0, f"parity_lr must be positive, got {self.parity_lr}"),
            (self.bundle_format in (1, 2), f"--bundle-format must be 1 or 2, got {self.bundle_format}"),
            (self.bundle_format == 1 or self.stages is None,
             "--stages chooses the stages of a format-1 bundle (add --bundle-format 1); a format-2 "
             "bundle, the default, holds every block boundary (drop --stages)"),
            (self.bundle_format == 2 or self.ort_training,
             "--no-ort-training applies to format 2 (format 1's stages always carry ORT training "
             "artifacts); drop it or export format 2"),
            (self.bundle_format == 1 or self.step_graph,
             "--no-step-graph applies to format 1 (its per-stage step.onnx); a format-2 bundle's "
             "block programs are its standard-ONNX step (drop --no-step-graph)"),
        ]
        for ok, message in checks:
            if not ok:
                raise BundleError(message)
        return self


def export_bundle(options: ExportOptions, log: Callable[[str], None] = print,
                  sign_key: str | Path | None = None) -> Path:
    """Export the bundle described by ``options``; returns its folder. With ``sign_key`` (an
    Ed25519 key from ``python -m device_runner keygen``) the manifest is signed before the
    bundle is renamed into place. The key is not an export option: it is not written anywhere."""
    started = time.perf_counter()
    options.validate()
    if sign_key is not None:
        signing.load_private_key(Path(sign_key))  # a bad key fails now, not after the export
    source = load_source(options)
    dropped = without_dropout(source.model)
    stages = resolve_stages(options.stages, source) if options.bundle_format == 1 else None
    out = Path(options.out or Path("export") / folder_name(source.config.model))
    _check_out(out, source, options.force)
    batch_size = source.config.batch_size if options.batch_size is None else options.batch_size
    size = source.input_size if options.input_size is None else options.input_size
    source.input_size = size
    example = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(options.seed))
    what = (f"stages {stages[0]}-{stages[-1]}" if stages is not None
            else f"format 2, {len(source.model.blocks)} blocks")
    log(f"exporting {source.config.model} ({'checkpoint ' + source.checkpoint if source.checkpoint else 'fresh'}), "
        f"{what}, batch {batch_size}, input {size}x{size} -> {out}")
    if dropped:
        log(f"  dropout off on the device ({', '.join(dropped)}): an identity in every exported graph")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if options.bundle_format == 2:
            manifest = _export_format_2(source, options, tmp, example, batch_size, log, started)
        else:
            results = [_export_stage(source, options, k, tmp, example, batch_size, log) for k in stages]
            relative = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
            files = manifest_io.file_table(tmp, relative)
            profile = cost.profile_model(source.model, (3, size, size))
            densities = {n: float(m.float().mean()) for n, m in source.masks.items()}
            entries = [manifest_io.stage_entry(source, result, files, profile, densities, batch_size)
                       for result in results]
            manifest = manifest_io.build_manifest(source, options, entries, files, batch_size,
                                                  time.perf_counter() - started)
        write_manifest(tmp, manifest)
        if sign_key is not None:
            # Signed last and inside the temporary folder: the signature covers the final manifest,
            # which covers every file, and no unsigned bundle is ever visible at ``out``.
            log(f"signed {MANIFEST_NAME} with key {signing.sign_manifest(tmp, Path(sign_key))}")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(summary(manifest, out))
    return out


def _export_format_2(source: Source, options: ExportOptions, tmp: Path, example: torch.Tensor,
                     batch_size: int, log: Callable[[str], None], started: float):
    """The weight store and every block's programs, checked, then the format-2 manifest."""
    from .block_bundle import TOLERANCES_V2, export_block_bundle

    parity_example = example[: min(batch_size, options.parity_batch_size)]
    weights, blocks, ort_training, parity, lowered = export_block_bundle(source, options, tmp, parity_example,
                                                                         batch_size, log)
    log(f"  {lowered} lowered programs for {len(blocks)} blocks; parity ok "
        f"(chain logits {parity['chain_logits_max_abs']:.1e}, {grads_summary(parity)})")
    relative = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = manifest_io.file_table(tmp, relative)
    return manifest_io.build_manifest_v2(source, options, weights, blocks, ort_training, parity, TOLERANCES_V2,
                                         files, batch_size, time.perf_counter() - started)


def _export_stage(source: Source, options: ExportOptions, k: int, tmp: Path, example: torch.Tensor,
                  batch_size: int, log: Callable[[str], None]) -> manifest_io.StageResult:
    """Stage k into ``tmp/stage_kk``: prefix graphs, suffix artifacts, step graph, parity."""
    started = time.perf_counter()
    model, masks, num_classes = source.model, source.masks, len(source.classes)
    rel = f"stage_{k:02d}"
    folder = tmp / rel
    folder.mkdir()
    prefix = prefix_io.baked_prefix(model, masks, k)
    with torch.no_grad():
        features = prefix(example) if k > 0 else example
    feature_shape = list(features.shape[1:])
    # The suffix takes any batch; a small one keeps the float64 reference cheap.
    parity_batch = min(batch_size, options.parity_batch_size)
    parity = {}
    if k > 0:
        log(f"  stage {k}: prefix {model.block_names[0]}..{model.block_names[k - 1]} -> .pte, .onnx")
        prefix_io.export_prefix_pte(prefix, example, folder / prefix_io.PTE_FILE)
        prefix_io.export_prefix_onnx(prefix, example, folder / prefix_io.ONNX_FILE, options.opset)
        parity.update(prefix_io.check_prefix(prefix, folder, example))
    log(f"  stage {k}: suffix {model.block_names[k]}..{model.block_names[-1]} -> ORT training artifacts")
    artifacts = suffix_io.export_suffix(model, masks, k, features, folder, options.opset)
    parity.update(suffix_io.check_suffix(model, masks, k, folder, artifacts, parity_batch, feature_shape,
                                         num_classes, steps=options.parity_steps, lr=options.parity_lr,
                                         seed=options.seed))
    step = None
    if options.step_graph:
        log(f"  stage {k}: suffix -> standard-ONNX training step (step.onnx)")
        step = step_io.export_step_graph(model, masks, k, features, folder, num_classes)
        parity.update(step_io.check_step_graph(model, masks, k, step, folder, parity_batch, feature_shape,
                                               num_classes, lr=options.parity_lr, seed=options.seed))
    check_parity(k, parity)
    check_ir_versions(folder)
    log(f"  stage {k}: parity ok ({parity_line(parity)}), {time.perf_counter() - started:.1f} s")
    return manifest_io.StageResult(k=k, folder=rel, feature_shape=feature_shape, artifacts=artifacts,
                                   parity=parity, step=step)


def _check_out(out: Path, source: Source, force: bool) -> None:
    """Refuse to replace anything but an empty folder or a bundle of the same model."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"--out {out} is a file; choose a folder")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise BundleError(f"--out {out} holds files that are not an spfde bundle; choose an empty "
                          "or new folder (--force only replaces bundles)")
    config = source.config
    wanted = model_identity(config.model, config.width, len(source.classes), config.cifar_stem)
    try:
        model = read_manifest(out).model
        existing = "a bundle of " + model_identity(model.name, model.width, model.num_classes,
                                                   model.cifar_stem)
    except BundleError:
        existing = "a bundle this version cannot read"
    if existing != wanted and not force:
        raise BundleError(f"--out {out} holds {existing}, not {wanted}; "
                          "add --force to replace it or choose another --out")


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
