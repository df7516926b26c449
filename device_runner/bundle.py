"""Read an exported bundle: ``manifest.json`` plus the files it lists with their sha256.

The manifest (format ``spfde-bundle``, docs/bundle.md) is the only contract with the host.
This reader checks the format version, that every listed file is present with the listed
size and sha256, and that the fields the runner uses are there, before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError

FORMAT = "spfde-bundle"
FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_problems(root: Path, files: dict) -> list[str]:
    """What is wrong with the files a manifest lists: missing, wrong size or wrong sha256."""
    problems = []
    for rel, entry in sorted(files.items()):
        file = Path(root) / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(file) != entry["sha256"]:
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
    manifest: dict
    stages: tuple[Stage, ...]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["model"]["classes"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["model"]["input"]["shape"][-1])

    @property
    def mean(self) -> list[float]:
        return list(self.manifest["model"]["normalization"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.manifest["model"]["normalization"]["std"])

    @property
    def num_blocks(self) -> int:
        return len(self.manifest["model"]["blocks"])

    @property
    def spfde(self) -> dict:
        return self.manifest["spfde"]

    def stage(self, k: int) -> Stage:
        for stage in self.stages:
            if stage.k == k:
                return stage
        raise BundleError(f"bundle {self.root} has no stage {k} (it has "
                          f"{[s.k for s in self.stages]}); re-export with --stages")


def _need(mapping: dict, path: str):
    value = mapping
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BundleError(f"manifest lacks '{path}'; re-export the bundle with this "
                              "version of spfde_edge.export")
        value = value[key]
    return value


def _stage(root: Path, entry: dict) -> Stage:
    suffix = _need(entry, "suffix")
    prefix = entry.get("prefix")
    step = suffix.get("step_graph")
    return Stage(
        k=int(_need(entry, "stage")),
        prefix_onnx=root / prefix["onnx"] if prefix and prefix.get("onnx") else None,
        prefix_pte=root / prefix["pte"] if prefix and prefix.get("pte") else None,
        pte_batch_size=prefix.get("pte_batch_size") if prefix else None,
        feature_shape=tuple(int(d) for d in _need(entry, "features.shape")[1:]),
        training_model=root / _need(suffix, "training_model"),
        eval_model=root / _need(suffix, "eval_model"),
        checkpoint=root / _need(suffix, "checkpoint"),
        parameters=tuple(_need(suffix, "parameters")),
        masks=tuple((m["name"], m["weight"]) for m in _need(suffix, "masks")),
        batchnorms=tuple(_need(suffix, "batchnorms")),
        training_outputs=tuple(_need(suffix, "training_outputs")),
        eval_outputs=tuple(_need(suffix, "eval_outputs")),
        backends=tuple(suffix.get("backends", ["onnxruntime-training"])),
        step_model=root / _need(step, "model") if step else None,
        step_state=root / _need(step, "state") if step else None,
    )


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Open the bundle in ``root``; with ``verify`` every file's size and sha256 is checked."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; export one with "
                          "python -m spfde_edge.export and copy the whole folder to the device")
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST}; copy the whole export folder")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); copy the bundle again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an spfde bundle manifest (format is not '{FORMAT}')")
    version = manifest.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise BundleError(f"{path} has bundle format version {version!r}; this device_runner "
                          f"reads {', '.join(map(str, FORMAT_VERSIONS))}: update device_runner "
                          "or re-export with a matching spfde_edge")
    files = _need(manifest, "files")
    if verify:
        problems = file_problems(root, files)
        if problems:
            raise BundleError(f"bundle {root} is damaged: {'; '.join(problems[:3])}"
                              f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}; "
                              "copy the bundle again (nothing was trained)")
    for key in ("model.classes", "model.input.shape", "model.normalization.mean",
                "model.normalization.std", "model.blocks", "spfde.delta_tau",
                "spfde.lr_schedule.base_lr", "spfde.lr_schedule.block_active_epochs"):
        _need(manifest, key)
    stages = tuple(sorted((_stage(root, e) for e in _need(manifest, "stages")), key=lambda s: s.k))
    if not stages:
        raise BundleError(f"bundle {root} has no stages; re-export it")
    listed = {str(root / rel) for rel in files}
    for stage in stages:
        for file in (stage.training_model, stage.eval_model, stage.checkpoint, stage.step_model,
                     stage.step_state):
            if file is not None and str(file) not in listed:
                raise BundleError(f"stage {stage.k} names {file.name}, which the manifest's file "
                                  "table does not list; re-export the bundle")
    return Bundle(root=root, manifest=manifest, stages=stages)
