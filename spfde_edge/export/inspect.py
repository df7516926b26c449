"""``--inspect``: what a bundle holds, after the checks the device makes (signature, paths, sha256)."""
from __future__ import annotations

from pathlib import Path

from device_runner.bundle import load_bundle
from device_runner.manifest import Manifest

from .parity import grads_summary, parity_line


def model_identity(name: str, width: float | None, num_classes: int, cifar_stem: bool) -> str:
    """What makes two bundles the same model: architecture, width, stem and classes."""
    stem = "" if cifar_stem else ", ImageNet stem"
    return f"{name} ({'default width' if width is None else f'width {width}'}, {num_classes} classes{stem})"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def summary_v2(manifest, root: Path) -> str:
    """Format 2: the weight store, then one row per block (every row is a freezing boundary)."""
    model, weights = manifest.model, manifest.weights
    identity = model_identity(model.name, model.width, model.num_classes, model.cifar_stem)
    total = sum(f.bytes for f in manifest.files.values())
    programs = total - weights.bytes
    lines = [f"bundle {root}: {identity}, format 2, {len(manifest.blocks)} blocks (freezing at any "
             f"boundary), {len(manifest.files)} files, {_mb(total)}, exported in {manifest.export_s:.1f} s",
             f"weights: {weights.file} {_mb(weights.bytes)} (dense {_mb(weights.dense_bytes)}; "
             f"{len(weights.masked)} masked layers as values + 1-bit masks); programs {_mb(programs)}, "
             f"no weights in them",
             f"{'block':>5} {'name':<12} {'input':>14} {'programs':>10} {'fwd GF':>8} {'train GF':>9}  parity"]
    for block in manifest.blocks:
        size = sum(manifest.files[p].bytes for p in (block.infer, block.train, block.backward, block.backward_first))
        flops = block.flops_per_sample
        lines.append(f"{block.index:>5} {block.name:<12} {'x'.join(str(d) for d in block.input.shape[1:]):>14} "
                     f"{_mb(size):>10} {flops.prefix_forward / 1e9:>8.4f} "
                     f"{(flops.suffix_forward + flops.suffix_backward) / 1e9:>9.4f}  "
                     f"infer {block.parity['infer_rel']:.1e} {grads_summary(block.parity)}")
    return "\n".join(lines)


def summary(manifest: Manifest, root: Path) -> str:
    """The table printed after an export and by ``--inspect``."""
    if getattr(manifest, "format_version", 1) == 2:
        return summary_v2(manifest, root)
    model = manifest.model
    identity = model_identity(model.name, model.width, model.num_classes, model.cifar_stem)
    lines = [f"bundle {root}: {identity}, {len(manifest.stages)} stage(s), {len(manifest.files)} files, "
             f"{_mb(sum(f.bytes for f in manifest.files.values()))}, exported in {manifest.export_s:.1f} s"]
    lines.append(f"{'stage':>5} {'frozen':>6} {'features':>18} {'size':>10} {'zeros':>10} "
                 f"{'prefix GF':>9} {'suffix fwd+bwd GF':>17}  parity")
    for stage in manifest.stages:
        flops = stage.flops_per_sample
        lines.append(
            f"{stage.stage:>5} {len(stage.frozen_blocks):>6} "
            f"{'x'.join(str(d) for d in stage.features.shape):>18} "
            f"{_mb(stage.bytes.total):>10} {_mb(stage.bytes.sparse_zeros):>10} "
            f"{flops.prefix_forward / 1e9:>9.4f} "
            f"{(flops.suffix_forward + flops.suffix_backward) / 1e9:>17.4f}  "
            f"{parity_line(stage.parity)}")
    return "\n".join(lines)


def inspect_bundle(root: Path, trusted_keys: Path | None = None) -> str:
    """Describe the bundle in ``root`` after the device's own checks (``load_bundle``): its
    signature (against ``trusted_keys`` when given), paths inside the bundle, every sha256."""
    root = Path(root)
    bundle = load_bundle(root, verify=True, trusted_keys=trusted_keys)
    manifest = bundle.manifest
    model, spfde, sparsity = manifest.model, manifest.spfde, manifest.sparsity
    lines = [summary(manifest, root), "",
             f"classes: {', '.join(model.classes[:20])}{' …' if len(model.classes) > 20 else ''}",
             f"input: {list(model.input.shape)} {model.input.dtype}, mean {list(model.normalization.mean)}, "
             f"std {list(model.normalization.std)}",
             "blocks: " + ", ".join(f"{b.index}:{b.name}" for b in model.blocks),
             f"schedule: epochs {spfde.epochs} (done {spfde.epochs_done}), Δτ {spfde.delta_tau}, "
             f"freeze epochs {list(spfde.freezing.freeze_epochs)}, dst {spfde.dst.algorithm} "
             f"(update fraction {spfde.dst.update_fraction}, λ {spfde.dst.lam}), sieve {spfde.sieve.fraction}",
             f"sparsity: {sparsity.overall:.3f} over masked layers "
             f"(target {sparsity.target}, {sparsity.distribution})"]
    for layer in sparsity.layers:
        lines.append(f"  {layer.name:<40} {'x'.join(map(str, layer.shape)):>16} "
                     f"density {layer.density:.3f}{'' if layer.masked else ' (dense)'}")
    lines.append(f"signature: {bundle.signature}")
    lines.append("files (inside the bundle, sha256 verified):")
    for rel, entry in manifest.files.items():
        lines.append(f"  {rel:<36} {entry.bytes:>12,d} B  {entry.sha256[:16]}…")
    lines.append("exported with " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    return "\n".join(lines)
