"""``manifest.json``: the one typed, versioned contract between the host export and the device.

The dataclasses below are the whole manifest. ``write_manifest`` (host) and ``read_manifest``
(device and host) are the only writer and reader, and both check the JSON against
``manifest.schema.json`` beside this file, so a manifest either matches these types exactly
or is refused with the JSON path that is wrong. Field meanings: docs/bundle.md; paths inside
the manifest are relative to the bundle folder. Torch-free: the device imports this file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from .errors import BundleError

FORMAT = "spfde-bundle"
FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2)         # 1: a graph set per stage; 2: per-block programs + one weight store
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SCHEMA_V2_PATH = Path(__file__).with_name("manifest.v2.schema.json")
REEXPORT = "re-export the bundle with python -m spfde_edge.export"

DST_LAM = 1.0   # MEST's λ in the prune score |w| + λ|g| when the run did not set one


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]     # a string names a dynamic axis ("batch")
    dtype: str                       # "float32" or "int64"


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]          # per channel: x = (pixel / 255 - mean[c]) / std[c]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Block:
    index: int
    name: str
    parameters: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    width: float | None
    cifar_stem: bool
    num_classes: int
    classes: tuple[str, ...]
    input: TensorSpec
    normalization: Normalization
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class SourceInfo:
    checkpoint: str | None           # None for a fresh model
    epochs_done: int
    num_frozen: int


@dataclass(frozen=True)
class Layer:
    name: str
    block: int
    shape: tuple[int, ...]
    density: float
    masked: bool


@dataclass(frozen=True)
class Sparsity:
    target: float
    distribution: str
    overall: float                   # over the masked layers
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Freezing:
    freeze_epochs: tuple[int, ...]   # block i is frozen from epoch freeze_epochs[i]
    T_frz: int | None
    predicted_reduction: float
    num_frozen_now: int


@dataclass(frozen=True)
class Sieve:
    fraction: float                  # of the training set kept in the removed queue
    swap_fraction: float             # of the removed queue exchanged per update


@dataclass(frozen=True)
class Dst:
    """Prune-and-grow every ``Spfde.delta_tau`` epochs until ``Spfde.epochs``; the updated
    fraction decays by a cosine from ``update_fraction`` (docs/bundle.md)."""

    algorithm: str                   # mest, rigl, set or static
    update_fraction: float
    lam: float = DST_LAM


@dataclass(frozen=True)
class LrSchedule:
    """Each block's cosine reaches 0 when it freezes (``method.schedule.block_active_epochs``
    of ``Freezing.freeze_epochs``)."""

    base_lr: float
    type: str = "blockwise_cosine"
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class Spfde:
    """The schedule to continue, in host epochs."""

    epochs: int
    epochs_done: int
    delta_tau: int                   # Δτ: epochs between DST updates and between sieve updates
    freezing: Freezing
    sieve: Sieve
    dst: Dst
    lr_schedule: LrSchedule
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class PrefixEntry:
    pte: str
    onnx: str
    input: TensorSpec
    output: TensorSpec
    pte_batch_size: int
    onnx_dynamic_batch: bool = True


@dataclass(frozen=True)
class MaskEntry:
    name: str                        # "<weight>_mask", uint8, 1 = active
    weight: str


@dataclass(frozen=True)
class BatchNormEntry:
    name: str
    running_mean: str
    running_var: str
    batch_mean_output: str
    batch_var_output: str
    momentum: float


@dataclass(frozen=True)
class StepGraphEntry:
    model: str                       # step.onnx
    state: str                       # its starting state (npz)
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    parameters: tuple[str, ...]
    masks: tuple[str, ...]
    running_stats: tuple[str, ...]


@dataclass(frozen=True)
class SuffixEntry:
    training_model: str
    eval_model: str
    optimizer_model: str
    checkpoint: str
    inputs: tuple[TensorSpec, ...]   # features, labels
    training_outputs: tuple[str, ...]
    eval_outputs: tuple[str, ...]
    parameters: tuple[str, ...]
    masks: tuple[MaskEntry, ...]
    batchnorms: tuple[BatchNormEntry, ...]
    backends: tuple[str, ...]        # device suffix backends this stage supports
    step_graph: StepGraphEntry | None


@dataclass(frozen=True)
class Flops:
    prefix_forward: float
    suffix_forward: float
    suffix_backward: float


@dataclass(frozen=True)
class StageBytes:
    total: int
    sparse_zeros: int
    masks: int


@dataclass(frozen=True)
class StageEntry:
    """Stage ``stage``: blocks before it frozen (the prefix), the rest trained (the suffix)."""

    stage: int
    frozen_blocks: tuple[str, ...]
    trainable_blocks: tuple[str, ...]
    features: TensorSpec
    prefix: PrefixEntry | None       # None for stage 0
    suffix: SuffixEntry
    flops_per_sample: Flops
    bytes: StageBytes
    parity: dict[str, float]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class BundleDescription:
    """What every bundle format says about itself: the model, where it came from, the SpFDE
    schedule to continue, the parity bounds, the file table and the versions that made it."""

    created_utc: str
    export_s: float
    model: ModelInfo
    source: SourceInfo
    batch_size: int
    sparsity: Sparsity
    spfde: Spfde
    device_training: dict[str, str]
    tolerances: dict[str, float]
    files: dict[str, FileEntry]
    versions: dict[str, str]
    export_options: dict
    train_config: dict

    format_version = 0   # set by each format below

    def to_dict(self) -> dict:
        """The JSON form, format and version first."""
        return {"format": FORMAT, "format_version": self.format_version, **_plain(self)}

    @classmethod
    def from_dict(cls, data: dict):
        """The typed form of a manifest that already passed ``validate``."""
        return _build(cls, {k: v for k, v in data.items() if k not in ("format", "format_version")})


@dataclass(frozen=True)
class Manifest(BundleDescription):
    """Bundle format 1: a graph set per freezing stage."""

    stages: tuple[StageEntry, ...]

    format_version = 1


# -- format 2: every block once, the weights once ------------------------------------------

@dataclass(frozen=True)
class BlockEntry:
    """Block ``index`` as standard-ONNX programs (spfde_edge/export/block_programs.py); its
    parameters and running statistics are graph inputs fed from the weight store."""

    index: int
    name: str
    input: TensorSpec
    output: TensorSpec
    parameters: tuple[str, ...]          # trainable, in train/infer input order
    running_stats: tuple[str, ...]
    masks: tuple[str, ...]               # the block's masked weights (their masks are in the store)
    infer: str                           # (x, parameters, running) -> y, eval mode
    train: str                           # (x, parameters, running) -> (y, running .new, saved ...)
    backward: str                        # (backward_parameters, x?, saved, grad_y) -> (.grad ..., grad_x)
    backward_first: str                  # the same without grad_x
    backward_parameters: tuple[str, ...]
    backward_needs_input: bool
    saved: tuple[str, ...]
    flops_per_sample: Flops              # prefix_forward: this block's forward; suffix_*: its training
    parity: dict[str, float]


@dataclass(frozen=True)
class WeightsEntry:
    file: str                            # weights.safetensors (device_runner/weight_store.py)
    parameters: tuple[str, ...]
    running_stats: tuple[str, ...]
    masked: tuple[str, ...]
    bytes: int
    dense_bytes: int                     # the same tensors stored dense, for comparison


@dataclass(frozen=True)
class OrtBoundary:
    """ONNX Runtime training artifacts of the suffix from block ``k``, without weights: the
    device builds their checkpoint from the weight store (backends/ort_checkpoint.py)."""

    k: int
    training_model: str
    eval_model: str
    optimizer_model: str
    parameters: tuple[str, ...]
    frozen: tuple[str, ...]
    training_outputs: tuple[str, ...]
    eval_outputs: tuple[str, ...]
    batchnorms: tuple[BatchNormEntry, ...]


@dataclass(frozen=True)
class ManifestV2(BundleDescription):
    """Bundle format 2: one weight store, each block's programs once, freezing at any boundary."""

    weights: WeightsEntry
    blocks: tuple[BlockEntry, ...]
    ort_training: tuple[OrtBoundary, ...]
    parity: dict[str, float]

    format_version = 2


def _plain(value):
    """Dataclasses and tuples as JSON dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(kind, value):
    """``value`` (JSON that matches the schema) as the annotated type ``kind``."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in args if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        return tuple(_build(args[0], v) for v in value)
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if kind is dict:
        return dict(value)
    return value


@functools.lru_cache(maxsize=2)
def _validator(version: int = FORMAT_VERSION):
    schema = json.loads((SCHEMA_V2_PATH if version == 2 else SCHEMA_PATH).read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def _json_path(parts) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return path or "(top level)"


def validate(data: dict, fix: str = REEXPORT) -> None:
    """Refuse ``data`` unless it matches the schema; the message names the JSON path."""
    version = data.get("format_version") if isinstance(data, dict) else None
    error = jsonschema.exceptions.best_match(_validator(2 if version == 2 else 1).iter_errors(data))
    if error is not None:
        message = " ".join(error.message.split())
        message = message if len(message) <= 160 else message[:157] + "..."
        raise BundleError(f"{MANIFEST_NAME} does not match the bundle schema at "
                          f"{_json_path(error.absolute_path)}: {message}; {fix}")


def write_manifest(root: Path, manifest: "Manifest | ManifestV2") -> Path:
    """Write ``manifest.json`` into ``root`` (checked against the schema first)."""
    data = manifest.to_dict()
    validate(data, fix="the exporter built a wrong manifest: report this as a bug")
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_manifest(root: Path, raw: bytes | None = None) -> "Manifest | ManifestV2":
    """The manifest of the bundle in ``root``; anything but this format version is refused.
    ``raw``: the manifest's bytes already read (and signature-checked) by the caller."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; export one with "
                          "python -m spfde_edge.export and copy the whole folder")
    if raw is None and not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST_NAME}; export one with "
                          "python -m spfde_edge.export and copy the whole folder")
    try:
        data = json.loads(path.read_bytes() if raw is None else raw, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise BundleError(f"{path} is not valid JSON ({exc}); copy the bundle again or "
                          f"{REEXPORT}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path} is not an spfde bundle manifest (format is not '{FORMAT}')")
    version = data.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise BundleError(f"{path} has bundle format version {version!r}; this spfde-edge reads "
                          f"{' and '.join(map(str, FORMAT_VERSIONS))}: {REEXPORT}, or update device_runner")
    validate(data)
    model = data["model"]
    if len(model["classes"]) != model["num_classes"]:
        raise BundleError(f"{path} names {len(model['classes'])} classes but model.num_classes is "
                          f"{model['num_classes']}; {REEXPORT}")
    return (ManifestV2 if version == 2 else Manifest).from_dict(data)


def _refuse_constant(name: str):
    """NaN and Infinity are not JSON; Python's reader would let them past every bound."""
    raise ValueError(f"{name} is not a JSON number")
