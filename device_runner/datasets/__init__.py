"""Small datasets shipped with the package, so a demo needs no download and no extra install.

``digits``: the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and
C. Kaynak, 1998; CC BY 4.0), as scikit-learn distributes it: 1,797 8×8 images with pixels
0..16 and labels 0..9. Host (``--dataset digits``) and device (``--data digits``) read this
one file, so both see the same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_FILE = Path(__file__).with_name("digits.npz")


def digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels, labels)``: uint8 ``[1797, 8, 8]`` in 0..16 and int64 ``[1797]``."""
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        return data["pixels"], data["labels"].astype(np.int64)
