"""The device's own data: ``digits`` or ``imagefolder:PATH``, as uint8 arrays with stable indices.

Sample ``i`` is row ``i`` of ``images`` (N×3×H×W uint8) for the whole run, so the data
sieve can name samples by index and a resumed run sees the same samples. Images that
Pillow cannot decode are skipped and counted, never fatal. A held-out split (stratified,
fixed seed) is evaluated every epoch; it never enters training or the sieve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .datasets import digits
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DeviceData:
    images: np.ndarray              # N×3×H×W uint8
    labels: np.ndarray              # N int64, indices into the bundle's classes
    source: str
    skipped: list[str] = field(default_factory=list)   # unreadable files (relative paths)

    def __len__(self) -> int:
        return int(self.labels.size)


def _resize(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(gray_or_rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def load_digits(size: int, classes: list[str]) -> DeviceData:
    """The digits shipped in ``device_runner/datasets`` (no download, no scikit-learn)."""
    if len(classes) < 10:
        raise DataError(f"digits has 10 classes but the bundle's model has {len(classes)}; "
                        "export a model with --num-classes 10")
    pixels, labels = digits()
    # Pixels are 0..16; scale to 0..255 like every other image source.
    scaled = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([_resize(p, size) for p in scaled])
    return DeviceData(images=images, labels=labels, source="digits (shipped with device_runner)")


def _class_map(folders: list[str], classes: list[str], root: Path) -> dict[str, int]:
    if set(folders) <= set(classes):
        return {name: classes.index(name) for name in folders}
    if len(folders) <= len(classes) and all(c.isdigit() for c in classes):
        # A fresh bundle names classes 0..n-1: map the sorted folders onto them.
        return {name: i for i, name in enumerate(folders)}
    raise DataError(f"class folders of {root} ({', '.join(folders[:5])}…) do not match the "
                    f"bundle's {len(classes)} classes ({', '.join(classes[:5])}…); rename the "
                    "folders or export a model with the right classes")


def load_imagefolder(root: Path, size: int, classes: list[str], max_per_class: int | None = None) -> DeviceData:
    """``root/<class>/<image>``; unreadable or corrupt images are skipped and listed."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; use --data imagefolder:PATH with a "
                        "folder of class sub-folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders; put each class's images "
                        f"in {root}/<class name>/")
    mapping = _class_map(folders, classes, root)
    images, labels, skipped = [], [], []
    for name in folders:
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if max_per_class is not None:
            files = files[:max_per_class]
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    rgb = image.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
                skipped.append(str(file.relative_to(root)))
                continue
            images.append(_resize(np.asarray(rgb), size))
            labels.append(mapping[name])
    if not images:
        raise DataError(f"no readable images under {root} ({len(skipped)} unreadable); "
                        f"supported: {', '.join(IMAGE_EXTENSIONS)}")
    return DeviceData(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64),
                      source=f"imagefolder {root}", skipped=skipped)


def load_data(spec: str, size: int, classes: list[str], max_per_class: int | None = None) -> DeviceData:
    """The run's data; refused unless it holds at least two classes (one class teaches nothing
    and scores a meaningless accuracy of 1.0)."""
    data = _load(spec, size, classes, max_per_class)
    present = np.unique(data.labels)
    if present.size < 2:
        raise DataError(f"{data.source} holds readable images of one class only; "
                        "training a classifier needs at least 2 classes: add a sub-folder of "
                        "images per class")
    return data


def _load(spec: str, size: int, classes: list[str], max_per_class: int | None) -> DeviceData:
    if spec == "digits":
        data = load_digits(size, classes)
        if max_per_class is not None:
            keep = np.concatenate([np.flatnonzero(data.labels == c)[:max_per_class]
                                   for c in np.unique(data.labels)])
            data = DeviceData(data.images[np.sort(keep)], data.labels[np.sort(keep)], data.source)
        return data
    if spec.startswith("imagefolder:"):
        return load_imagefolder(Path(spec.split(":", 1)[1]).expanduser(), size, classes, max_per_class)
    raise DataError(f"unknown --data '{spec}'; use digits or imagefolder:PATH")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices; each class sends ``round(val_fraction * n)`` to val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(val_fraction * members.size))
        val.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(labels.size), val_idx).astype(np.int64)
    if train_idx.size == 0 or val_idx.size == 0:
        raise DataError(f"{labels.size} samples are too few to hold out {val_fraction:.0%}; "
                        "add images or change --val-fraction")
    return train_idx, val_idx


def normalize(images_uint8: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """float32 ``(x / 255 - mean) / std`` per channel (the bundle's normalization)."""
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images_uint8.astype(np.float32) / np.float32(255.0) - mean_a) / std_a
