"""Open an exported bundle: its typed manifest plus the files it lists with their sha256.

``read_manifest`` (manifest.py) is the only reader of ``manifest.json``: it checks the format
version and the JSON Schema. Before anything is loaded, ``load_bundle`` checks, in order:
the signature over the manifest's bytes (signing.py; required when trusted keys are
configured), that every listed path is relative, without ``..``, and resolves inside the
bundle folder after symlinks, that every file a backend opens is listed, and every listed
file's size and sha256. What this covers and what not: docs/trust.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import BundleError
from .files import sha256_file
from .manifest import (MANIFEST_NAME, BlockEntry, FileEntry, Manifest, ManifestV2, StageEntry,
                       read_manifest)
from .signing import NO_KEYS, load_trusted_keys, signature_status


def path_problem(root: Path, rel: str) -> str | None:
    """Why the manifest path ``rel`` may not be opened, or None: it must be relative, without
    ``..``, and resolve (after symlinks) to a file inside the bundle folder ``root``."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return f"{rel!r} is not a relative path inside the bundle"
    if ".." in pure.parts or ".." in PureWindowsPath(rel).parts:
        return f"{rel!r} climbs out of the bundle with '..'"
    try:
        real, inside = (Path(root) / rel).resolve(), Path(root).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        return f"{rel!r} cannot be resolved ({exc})"
    if real != inside and inside not in real.parents:
        return f"{rel} is a link to {real}, outside the bundle folder"
    return None


def path_problems(root: Path, files: dict[str, FileEntry]) -> list[str]:
    return [problem for rel in sorted(files) if (problem := path_problem(root, rel)) is not None]


def file_problems(root: Path, files: dict[str, FileEntry]) -> list[str]:
    """What is wrong with the files a manifest lists: a path outside the bundle, missing,
    wrong size or wrong sha256. A path outside the bundle is never opened."""
    problems = path_problems(root, files)
    for rel, entry in sorted(files.items()):
        file = Path(root) / rel
        if path_problem(root, rel) is not None:
            continue
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif file.stat().st_size != entry.bytes:
            problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {entry.bytes}")
        elif sha256_file(file) != entry.sha256:
            problems.append(f"{rel} does not match its sha256")
    return problems


@dataclass(frozen=True)
class Stage:
    """Stage ``k``: blocks ``[0, k)`` frozen (the prefix), blocks ``[k, n)`` trained.

    Format 1 gives each stage its own graphs (the path fields); format 2 has none: a stage
    there is only a boundary over the bundle's blocks (:func:`block_stage`).
    """

    k: int
    feature_shape: tuple[int, ...]
    parameters: tuple[str, ...]
    masks: tuple[tuple[str, str], ...]          # (mask name, weight name)
    backends: tuple[str, ...] = ("onnxruntime-training",)   # suffix backends this stage supports
    prefix_onnx: Path | None = None
    prefix_pte: Path | None = None
    pte_batch_size: int | None = None
    training_model: Path | None = None
    eval_model: Path | None = None
    checkpoint: Path | None = None
    batchnorms: tuple[dict, ...] = ()
    training_outputs: tuple[str, ...] = ()
    eval_outputs: tuple[str, ...] = ()
    step_model: Path | None = None                          # step.onnx (backend "onnxruntime")
    step_state: Path | None = None                          # its starting state (npz)


MASK_SUFFIX = "_mask"   # a masked weight's mask as the trainers name it: "<weight>_mask"


@dataclass(frozen=True)
class DeviceBlock:
    """Block ``index`` of a format-2 bundle: its four programs (absolute paths) and the names
    of the state they read; every block's programs exist once (spfde_edge/export/block_programs.py)."""

    index: int
    name: str
    input_shape: tuple[int, ...]                # per sample
    output_shape: tuple[int, ...]
    parameters: tuple[str, ...]                 # trainable, in program input order
    running_stats: tuple[str, ...]
    masks: tuple[str, ...]                      # its masked weights
    infer: Path
    train: Path
    backward: Path
    backward_first: Path
    backward_parameters: tuple[str, ...]
    backward_needs_input: bool
    saved: tuple[str, ...]

    def program(self, kind: str) -> Path:
        """``infer``, ``train``, ``backward`` or ``backward_first``."""
        return getattr(self, kind)


def block_stage(blocks: tuple[DeviceBlock, ...], k: int, ort_training_ks=()) -> Stage:
    """The format-2 stage at boundary ``k``: blocks ``[k, n)`` train, fed from the one weight copy."""
    suffix = blocks[k:]
    return Stage(
        k=k,
        feature_shape=blocks[k].input_shape,
        parameters=tuple(p for b in suffix for p in b.parameters),
        masks=tuple((w + MASK_SUFFIX, w) for b in suffix for w in b.masks),
        backends=("onnxruntime",) + (("onnxruntime-training",) if k in ort_training_ks else ()),
    )


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest | ManifestV2
    stages: tuple[Stage, ...]
    signature: str = NO_KEYS      # "signed by KEYID, verified", ... (signing.signature_status)
    blocks: tuple[DeviceBlock, ...] = ()   # format 2 only
    weights_path: Path | None = None       # format 2 only: weights.safetensors

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    @property
    def model_name(self) -> str:
        return self.manifest.model.name

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.model.classes)

    @property
    def input_size(self) -> int:
        return int(self.manifest.model.input.shape[-1])

    @property
    def mean(self) -> list[float]:
        return list(self.manifest.model.normalization.mean)

    @property
    def std(self) -> list[float]:
        return list(self.manifest.model.normalization.std)

    @property
    def num_blocks(self) -> int:
        return len(self.manifest.model.blocks)

    def stage(self, k: int) -> Stage:
        for stage in self.stages:
            if stage.k == k:
                return stage
        raise BundleError(f"bundle {self.root} has no stage {k} (it has "
                          f"{[s.k for s in self.stages]}); re-export with --stages")


def _stage(root: Path, entry: StageEntry) -> Stage:
    prefix, suffix, step = entry.prefix, entry.suffix, entry.suffix.step_graph
    return Stage(
        k=entry.stage,
        prefix_onnx=root / prefix.onnx if prefix else None,
        prefix_pte=root / prefix.pte if prefix else None,
        pte_batch_size=prefix.pte_batch_size if prefix else None,
        feature_shape=tuple(int(d) for d in entry.features.shape[1:]),
        training_model=root / suffix.training_model,
        eval_model=root / suffix.eval_model,
        checkpoint=root / suffix.checkpoint,
        parameters=suffix.parameters,
        masks=tuple((m.name, m.weight) for m in suffix.masks),
        batchnorms=tuple(dataclasses.asdict(b) for b in suffix.batchnorms),
        training_outputs=suffix.training_outputs,
        eval_outputs=suffix.eval_outputs,
        backends=suffix.backends,
        step_model=root / step.model if step else None,
        step_state=root / step.state if step else None,
    )


def _device_block(root: Path, entry: BlockEntry) -> DeviceBlock:
    return DeviceBlock(
        index=entry.index, name=entry.name,
        input_shape=tuple(int(d) for d in entry.input.shape[1:]),
        output_shape=tuple(int(d) for d in entry.output.shape[1:]),
        parameters=entry.parameters, running_stats=entry.running_stats, masks=entry.masks,
        infer=root / entry.infer, train=root / entry.train, backward=root / entry.backward,
        backward_first=root / entry.backward_first, backward_parameters=entry.backward_parameters,
        backward_needs_input=entry.backward_needs_input, saved=entry.saved)


def stage_files(entry: StageEntry) -> list[str]:
    """Every bundle path a backend may open for this stage (all must be listed in ``files``)."""
    prefix, suffix, step = entry.prefix, entry.suffix, entry.suffix.step_graph
    paths = [suffix.training_model, suffix.eval_model, suffix.optimizer_model, suffix.checkpoint]
    if prefix is not None:
        paths += [prefix.onnx, prefix.pte]
    if step is not None:
        paths += [step.model, step.state]
    return paths


def bundle_files(manifest: Manifest | ManifestV2) -> list[tuple[str, str]]:
    """(what, path) for every file a backend may open; all must be listed in ``files``."""
    if manifest.format_version == 1:
        return [(f"stage {e.stage}", rel) for e in manifest.stages for rel in stage_files(e)]
    paths = [("the weight store", manifest.weights.file)]
    paths += [(f"block {b.index}", rel) for b in manifest.blocks
              for rel in (b.infer, b.train, b.backward, b.backward_first)]
    paths += [(f"ORT training boundary {o.k}", rel) for o in manifest.ort_training
              for rel in (o.training_model, o.eval_model, o.optimizer_model)]
    return paths


def _v2_parts(root: Path, manifest: ManifestV2) -> tuple[tuple[DeviceBlock, ...], tuple[Stage, ...]]:
    """The blocks in order, and a stage at every block boundary."""
    blocks = tuple(sorted((_device_block(root, b) for b in manifest.blocks), key=lambda b: b.index))
    if [b.index for b in blocks] != list(range(len(manifest.model.blocks))):
        raise BundleError(f"bundle {root} has blocks {[b.index for b in blocks]} but its model has "
                          f"{len(manifest.model.blocks)}; re-export the bundle")
    ort_ks = {o.k for o in manifest.ort_training}
    return blocks, tuple(block_stage(blocks, k, ort_ks) for k in range(len(blocks)))


def _damaged(root: Path, problems: list[str], fix: str) -> BundleError:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return BundleError(f"bundle {root} is damaged: {'; '.join(problems[:3])}{more}; {fix} (nothing was loaded)")


def load_bundle(root: str | Path, verify: bool = True, trusted_keys: str | Path | None = None) -> Bundle:
    """Open the bundle in ``root``; nothing in it is loaded before it passes every check.

    ``trusted_keys``: a folder of ``*.pub`` keys; the bundle must then be signed by one of them.
    With ``verify`` every listed file's size and sha256 is checked too (paths and the file
    table are always checked: a manifest may not point outside its bundle).
    """
    root = Path(root)
    trusted = load_trusted_keys(Path(trusted_keys)) if trusted_keys is not None else None
    path = root / MANIFEST_NAME
    raw = path.read_bytes() if root.is_dir() and path.is_file() else None
    # The signature is checked on the very bytes that are parsed below.
    signature = signature_status(root, raw, trusted, trusted_keys) if raw is not None else NO_KEYS
    manifest = read_manifest(root, raw)
    files = manifest.files
    unsafe = path_problems(root, files)
    if unsafe:
        raise _damaged(root, unsafe, "re-export the bundle and copy files, not links")
    for what, rel in bundle_files(manifest):
        if rel not in files:
            raise BundleError(f"{what} names {rel}, which the manifest's file table "
                              "does not list (so its sha256 is not checked); re-export the bundle")
    if verify:
        problems = file_problems(root, files)
        if problems:
            raise _damaged(root, problems, "copy the bundle again")
    if manifest.format_version == 2:
        blocks, stages = _v2_parts(root, manifest)
        return Bundle(root=root, manifest=manifest, stages=stages, signature=signature, blocks=blocks,
                      weights_path=root / manifest.weights.file)
    stages = tuple(sorted((_stage(root, e) for e in manifest.stages), key=lambda s: s.k))
    return Bundle(root=root, manifest=manifest, stages=stages, signature=signature)
