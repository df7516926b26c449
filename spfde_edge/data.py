"""Datasets held in memory as uint8 tensors, so every sample has a stable integer index.

The data sieve (SpFDE §3.3) counts forgetting events per sample and parks samples in a
removed-queue, so it must name samples by index; batches are therefore assembled by
indexing one ``N×3×H×W`` uint8 tensor instead of going through a DataLoader, which for
32×32 images is also the fastest option on a 2-core CPU.

Datasets, chosen by name in :func:`load_dataset`:

* ``cifar10`` / ``cifar100``: torchvision's copies; validation is carved from the train split.
* ``imagefolder``: any folder of class sub-folders; decoded once and cached as ``.npz``.
* ``digits``: the UCI 8×8 handwritten digits shipped in ``device_runner/datasets`` (no download).
* ``synthetic``: deterministic coloured patterns for tests and smoke runs.

Augmentation and batching work on tensors with an explicit ``torch.Generator``, so the data
order and the crops of an epoch are reproduced exactly from the generator's state.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from device_runner.datasets import digits as shipped_digits
from device_runner.files import atomic_write

DEFAULT_CACHE_DIR = Path("~/.cache/spfde_edge")
# Where cifar10/cifar100 look when no data_dir is given.
DEFAULT_DATA_DIR = DEFAULT_CACHE_DIR / "datasets"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Bump when the cached array layout or the decoding changes, so old caches are not reused.
_CACHE_FORMAT = 1
# Below this many files a worker pool costs more to start than it saves.
_POOL_MIN_FILES = 2000
_DECODE_CHUNK = 500
SYNTHETIC_CLASSES = 10


class DataError(ValueError):
    """A dataset cannot be found, read or split as asked; the message says how to fix it."""


@dataclass
class ImageData:
    """Samples ``images[i]`` (uint8, 3×H×W) with class ``labels[i]``; ``i`` is the sample index."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(
                f"images must be a uint8 N×3×H×W tensor, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must be an int64 tensor of length {self.images.shape[0]}, got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DatasetSplit:
    """Train and validation samples plus what the model and the normaliser need to know.

    ``mean`` and ``std`` are per channel, in [0, 1] units, computed on ``train`` only.
    """

    train: ImageData
    val: ImageData
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    name: str


@dataclass
class _Request:
    """The options of one :func:`load_dataset` call, handed to the per-dataset loader."""

    data_dir: Path | None
    download: bool
    input_size: int
    seed: int
    synthetic_size: int
    cache_dir: Path


@dataclass
class _Pool:
    """Every sample a loader produced, before the train/validation split."""

    images: np.ndarray  # uint8 N×3×S×S
    labels: np.ndarray  # int64 N
    classes: list[str]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    input_size: int = 32,
    val_fraction: float = 0.1,
    seed: int = 0,
    synthetic_size: int = 512,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetSplit:
    """Load dataset ``name`` (see :data:`DATASETS`) resized to ``input_size``×``input_size``.

    The validation split is stratified: within each class, a permutation drawn from
    ``numpy.random.default_rng(seed)`` sends ``round(val_fraction * class_size)`` samples
    to ``val`` and the rest to ``train``. The same dataset, ``seed`` and ``val_fraction``
    always give the same split. Both splits keep the samples in their original order.
    ``seed`` also fixes the ``synthetic`` data itself.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if input_size < 1:
        raise DataError(f"input_size must be a positive number of pixels, got {input_size}")
    request = _Request(
        data_dir=Path(data_dir).expanduser() if data_dir is not None else None,
        download=download,
        input_size=input_size,
        seed=seed,
        synthetic_size=synthetic_size,
        cache_dir=Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser(),
    )
    pool = DATASETS[name](request)
    if np.unique(pool.labels).size < 2:
        raise DataError(f"dataset {name!r} holds readable samples of one class only; training a "
                        "classifier needs at least 2 classes: add a sub-folder of images per class")
    train_index, val_index = stratified_split(pool.labels, val_fraction, seed)
    if len(train_index) == 0:
        raise DataError(f"dataset {name!r} has no training samples left after the split")
    train = _image_data(pool, train_index)
    mean, std = channel_stats(train.images)
    return DatasetSplit(
        train=train,
        val=_image_data(pool, val_index),
        num_classes=len(pool.classes),
        classes=list(pool.classes),
        mean=mean,
        std=std,
        input_size=input_size,
        name=name,
    )


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) index arrays; each class sends ``round(val_fraction*n)`` to val."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        num_val = int(round(val_fraction * len(members)))
        val_parts.append(rng.permutation(members)[:num_val])
    is_val = np.zeros(len(labels), dtype=bool)
    if val_parts:
        is_val[np.concatenate(val_parts)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_subset(data: ImageData, count: int, seed: int) -> ImageData:
    """A seeded, class-balanced subset of ``count`` samples (for short runs and benchmarks)."""
    if not 0 < count <= len(data):
        raise DataError(f"--train-subset must be in 1..{len(data)}, got {count}")
    _, keep = stratified_split(data.labels.numpy(), count / len(data), seed)
    return ImageData(data.images[keep].clone(), data.labels[keep].clone())


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 ``N×3×H×W`` images, in [0, 1] units.

    Counting the 256 possible values per channel is exact and avoids a float copy of the
    whole dataset (600 MB for CIFAR-10).
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _image_data(pool: _Pool, index: np.ndarray) -> ImageData:
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(pool.images[index])),
        labels=torch.from_numpy(pool.labels[index].astype(np.int64)),
    )


def _resize_uint8(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bilinear resize of uint8 N×C×H×W images to size×size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        part = torch.from_numpy(images[start : start + chunk]).float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)
        out[start : start + chunk] = part.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


# --- cifar10 / cifar100 ---------------------------------------------------------------------


def _load_cifar(request: _Request, dataset_cls: type, title: str) -> _Pool:
    root = request.data_dir if request.data_dir is not None else DEFAULT_DATA_DIR.expanduser()
    try:
        dataset = dataset_cls(root=str(root), train=True, download=request.download)
    except (RuntimeError, OSError) as error:
        if request.download:
            raise DataError(
                f"could not download {title} into {root} ({error}); check the internet "
                "connection or point --data-dir at an existing copy"
            ) from error
        raise DataError(
            f"{title} not found under {root}; pass --download (needs internet) or point "
            "--data-dir at it"
        ) from error
    images = np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return _Pool(
        images=_resize_uint8(images, request.input_size),
        labels=np.asarray(dataset.targets, dtype=np.int64),
        classes=list(dataset.classes),
    )


def _load_cifar10(request: _Request) -> _Pool:
    from torchvision.datasets import CIFAR10

    return _load_cifar(request, CIFAR10, "CIFAR-10")


def _load_cifar100(request: _Request) -> _Pool:
    from torchvision.datasets import CIFAR100

    return _load_cifar(request, CIFAR100, "CIFAR-100")


# --- imagefolder ----------------------------------------------------------------------------


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """Classes (sorted sub-folder names) and ``(relative path, label, size, mtime_ns)`` rows.

    Hidden folders (``.ipynb_checkpoints``...) are not classes; files whose extension is not
    an image extension are skipped, as torchvision's ImageFolder does.
    """
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; point --data-dir at a folder with one "
            "sub-folder of images per class"
        )
    classes = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DataError(
            f"image folder {root} has no class sub-folders; put each class's images in "
            f"{root}/<class name>/"
        )
    if len(classes) < 2:  # refused before anything is decoded or cached
        raise DataError(
            f"image folder {root} has one class sub-folder ({classes[0]}); training a classifier "
            f"needs at least 2 classes: add a sub-folder of images per class"
        )
    files = []
    for label, class_name in enumerate(classes):
        rows = []
        with os.scandir(root / class_name) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    stat = entry.stat()
                    relative = f"{class_name}/{entry.name}"
                    rows.append((relative, label, stat.st_size, stat.st_mtime_ns))
        if not rows:
            raise DataError(
                f"class folder {root / class_name} holds no images ({', '.join(IMAGE_EXTENSIONS)});"
                " add images or remove the folder"
            )
        files.extend(sorted(rows))
    return classes, files


def _cache_key(root: Path, files: list[tuple[str, int, int, int]], input_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"format={_CACHE_FORMAT}\nroot={root}\nsize={input_size}\n".encode())
    for relative, label, size, mtime_ns in files:
        digest.update(f"{relative}\t{label}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_image(path: str, input_size: int) -> np.ndarray:
    """One image as uint8 3×S×S: RGB, resized with bilinear when its size differs."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (input_size, input_size):
                image = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path} ({error}); replace or delete the file") from None


def _decode_chunk(job: tuple[list[str], int]) -> np.ndarray:
    paths, input_size = job
    return np.stack([_decode_image(path, input_size) for path in paths])


def _decode_all(root: Path, relative_paths: list[str], input_size: int) -> np.ndarray:
    paths = [str(root / relative) for relative in relative_paths]
    jobs = [
        (paths[start : start + _DECODE_CHUNK], input_size)
        for start in range(0, len(paths), _DECODE_CHUNK)
    ]
    images = np.empty((len(paths), 3, input_size, input_size), dtype=np.uint8)
    workers = min(os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(paths), desc=f"decoding {root}", unit="img") as progress:
        if workers > 1 and len(paths) >= _POOL_MIN_FILES:
            with multiprocessing.Pool(workers) as pool:
                chunks = pool.imap(_decode_chunk, jobs)
                start = 0
                for chunk in chunks:
                    images[start : start + len(chunk)] = chunk
                    start += len(chunk)
                    progress.update(len(chunk))
        else:
            for index, path in enumerate(paths):
                images[index] = _decode_image(path, input_size)
                progress.update(1)
    return images


def _read_cache(path: Path) -> _Pool | None:
    """The cached pool, or None when missing or unreadable (then it is simply rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            return _Pool(
                images=cached["images"],
                labels=cached["labels"].astype(np.int64),
                classes=[str(c) for c in cached["classes"]],
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, pool: _Pool) -> None:
    """Write atomically: a crash mid-write leaves no half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.savez(handle, images=pool.images, labels=pool.labels,
                                               classes=np.array(pool.classes)))


def _load_imagefolder(request: _Request) -> _Pool:
    if request.data_dir is None:
        raise DataError(
            "the imagefolder dataset needs --data-dir pointing at a folder of class folders"
        )
    root = request.data_dir.resolve()
    classes, files = _list_image_folder(root)
    key = _cache_key(root, files, request.input_size)
    cache_path = request.cache_dir / f"imagefolder-{key}.npz"
    cached = _read_cache(cache_path)
    if cached is not None:
        return cached
    pool = _Pool(
        images=_decode_all(root, [row[0] for row in files], request.input_size),
        labels=np.array([row[1] for row in files], dtype=np.int64),
        classes=classes,
    )
    _write_cache(cache_path, pool)
    return pool


# --- digits and synthetic -------------------------------------------------------------------


def _load_digits(request: _Request) -> _Pool:
    pixels, labels = shipped_digits()
    # Values are 0..16; scale to the 0..255 range of every other dataset.
    gray = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[:, None]
    gray = _resize_uint8(gray, request.input_size)
    return _Pool(
        images=np.ascontiguousarray(np.repeat(gray, 3, axis=1)),
        labels=labels,
        classes=[str(d) for d in range(10)],
    )


def _load_synthetic(request: _Request) -> _Pool:
    """``synthetic_size`` samples of 10 classes, fixed by ``seed``.

    Each class is a sum of low-frequency coloured sinusoids (at most 2 cycles per image) on
    a nearly grey base, so classes differ by pattern rather than by mean colour; each sample
    rolls its class pattern by up to size/4 pixels and adds Gaussian noise (sigma 60). A
    nearest-class-mean probe scores about 75-85% on held-out samples (chance: 10%).
    """
    size = request.input_size
    rng = np.random.default_rng(request.seed)
    coords = np.arange(size) * (2 * np.pi / size)
    patterns = np.empty((SYNTHETIC_CLASSES, 3, size, size))
    for label in range(SYNTHETIC_CLASSES):
        base = rng.uniform(123, 133, size=3)
        for channel in range(3):
            wave = np.zeros((size, size))
            for _ in range(3):
                fy, fx = rng.integers(0, 3, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                angle = fy * coords[:, None] + fx * coords[None, :] + phase
                wave += rng.uniform(8, 24) * np.cos(angle)
            patterns[label, channel] = base[channel] + wave
    labels = rng.permutation(np.arange(request.synthetic_size) % SYNTHETIC_CLASSES)
    max_shift = max(1, size // 4)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(request.synthetic_size, 2))
    noise = rng.normal(0.0, 60.0, size=(request.synthetic_size, 3, size, size))
    images = np.empty((request.synthetic_size, 3, size, size), dtype=np.uint8)
    for index, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
        sample = np.roll(patterns[label], (int(dy), int(dx)), axis=(1, 2)) + noise[index]
        images[index] = np.clip(np.round(sample), 0, 255).astype(np.uint8)
    return _Pool(
        images=images,
        labels=labels.astype(np.int64),
        classes=[f"class_{label}" for label in range(SYNTHETIC_CLASSES)],
    )


DATASETS: dict[str, Callable[[_Request], _Pool]] = {
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagefolder": _load_imagefolder,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
}


# --- augmentation and batching --------------------------------------------------------------


def augment_batch(
    images_uint8: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Standard CIFAR augmentation per sample: random crop after zero padding, random h-flip.

    Draws, in order, the row offsets, the column offsets and (if ``flip``) the flip coins
    from ``generator``, so the same generator state gives the same batch.
    """
    n, _, height, width = images_uint8.shape
    device = images_uint8.device
    span = 2 * pad + 1
    rows_off = torch.randint(0, span, (n,), generator=generator, device=generator.device).to(device)
    cols_off = torch.randint(0, span, (n,), generator=generator, device=generator.device).to(device)
    padded = F.pad(images_uint8, (pad, pad, pad, pad)) if pad > 0 else images_uint8
    rows = rows_off[:, None] + torch.arange(height, device=device)
    cols = torch.arange(width, device=device).expand(n, width)
    if flip:
        coins = torch.rand(n, generator=generator, device=generator.device).to(device) < 0.5
        cols = torch.where(coins[:, None], cols.flip(1), cols)
    cols = cols + cols_off[:, None]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images_uint8.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(
    images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel, for a 3×H×W image or an N×3×H×W batch."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
    return (images_uint8.float() / 255.0 - mean_t) / std_t


def iterate_batches(
    data: ImageData,
    indices: np.ndarray | torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    augment: bool,
    mean: Sequence[float],
    std: Sequence[float],
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch over ``indices``: batches ``(x float32, y int64, idx int64)``.

    ``idx`` are the dataset indices of the batch's samples (what the sieve records). With a
    ``generator`` the order is a permutation drawn from it now, and augmentation draws from
    it batch by batch; without one the order is ``indices`` as given. Arguments are checked
    here, not at the first ``next()``.
    """
    order = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
    order = order.to(torch.int64).reshape(-1)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if augment and generator is None:
        raise DataError("augment=True needs a torch.Generator for the random crops and flips")
    if len(order) and (int(order.min()) < 0 or int(order.max()) >= len(data)):
        raise DataError(
            f"indices must lie in [0, {len(data)}), got {int(order.min())}..{int(order.max())}"
        )
    if generator is not None:
        permutation = torch.randperm(len(order), generator=generator, device=generator.device)
        order = order[permutation.cpu()]
    return _batches(data, order, batch_size, generator, augment, mean, std, drop_last)


def _batches(
    data: ImageData,
    order: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    augment: bool,
    mean: Sequence[float],
    std: Sequence[float],
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    end = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        images = data.images[idx]
        if augment:
            images = augment_batch(images, generator)
        yield normalize(images, mean, std), data.labels[idx], idx
