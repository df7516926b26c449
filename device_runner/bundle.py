"""Open an exported bundle: its typed manifest plus the files it lists with their sha256.

``read_manifest`` (manifest.py) is the only reader of ``manifest.json``: it checks the format
version and the JSON Schema. Here every listed file is checked for its size and sha256, and
each stage is turned into the paths and names the backends load, before anything is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .files import sha256_file
from .manifest import FileEntry, Manifest, StageEntry, read_manifest


def file_problems(root: Path, files: dict[str, FileEntry]) -> list[str]:
    """What is wrong with the files a manifest lists: missing, wrong size or wrong sha256."""
    problems = []
    for rel, entry in sorted(files.items()):
        file = Path(root) / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif file.stat().st_size != entry.bytes:
            problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {entry.bytes}")
        elif sha256_file(file) != entry.sha256:
            problems.append(f"{rel} does not match its sha256")
    return problems


@dataclass(frozen=True)
class Stage:
    """Stage ``k``: blocks ``[0, k)`` frozen (the prefix), blocks ``[k, n)`` trained."""

    k: int
    prefix_onnx: Path | None
    prefix_pte: Path | None
    pte_batch_size: int | None
    feature_shape: tuple[int, ...]
    training_model: Path
    eval_model: Path
    checkpoint: Path
    parameters: tuple[str, ...]
    masks: tuple[tuple[str, str], ...]          # (mask name, weight name)
    batchnorms: tuple[dict, ...]
    training_outputs: tuple[str, ...]
    eval_outputs: tuple[str, ...]
    backends: tuple[str, ...] = ("onnxruntime-training",)   # suffix backends this stage supports
    step_model: Path | None = None                          # step.onnx (backend "onnxruntime")
    step_state: Path | None = None                          # its starting state (npz)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    stages: tuple[Stage, ...]

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


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Open the bundle in ``root``; with ``verify`` every file's size and sha256 is checked."""
    root = Path(root)
    manifest = read_manifest(root)
    files = manifest.files
    if verify:
        problems = file_problems(root, files)
        if problems:
            raise BundleError(f"bundle {root} is damaged: {'; '.join(problems[:3])}"
                              f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}; "
                              "copy the bundle again (nothing was trained)")
    stages = tuple(sorted((_stage(root, e) for e in manifest.stages), key=lambda s: s.k))
    listed = {str(root / rel) for rel in files}
    for stage in stages:
        for file in (stage.prefix_onnx, stage.prefix_pte, stage.training_model, stage.eval_model,
                     stage.checkpoint, stage.step_model, stage.step_state):
            if file is not None and str(file) not in listed:
                raise BundleError(f"stage {stage.k} names {file.name}, which the manifest's file "
                                  "table does not list; re-export the bundle")
    return Bundle(root=root, manifest=manifest, stages=stages)
