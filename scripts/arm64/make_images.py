"""A small learnable ImageFolder (class sub-folders of PNGs), the same recipe as the
image_dir fixture of tests/test_device_runner.py: a bright stripe per class on noise."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, classes: int = 10, per_class: int = 8, size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            q = size // 4
            image[(label % 4) * q:(label % 4) * q + q, :, label % 3] = 250
            image[:, (label // 4) * (size // 3):(label // 4) * (size // 3) + 3, :] = 200
            Image.fromarray(image).save(folder / f"{i:03d}.png")


if __name__ == "__main__":
    make_images(Path(sys.argv[1]), per_class=int(sys.argv[2]) if len(sys.argv) > 2 else 8)
