"""Phase 7 of scripts/arm64_check.sh, run on x86-64 and inside the arm64 rootfs: the int8
frozen prefix (device_runner/backends/frozen_segment.py) built and run on this machine.

Blocks [0, k) of a format-2 bundle become a FrozenSegment, quantized to int8 on the first
CALIBRATION images of the shipped digits (as a run calibrates on its first training samples),
then float32 and int8 features of the next HELD_OUT images are written to OUT (.npz) with the
int8 error; the script fails if that error is above the documented INT8_FEATURE_REL_ERROR.
compare_int8.py then puts the two machines' files side by side.

    python scripts/arm64/int8_features.py BUNDLE K OUT.npz
"""
from __future__ import annotations

import platform
import sys

import numpy as np

from device_runner.backends.frozen_segment import INT8_FEATURE_REL_ERROR, FrozenSegment
from device_runner.bundle import load_bundle
from device_runner.data import load_data, normalize
from device_runner.model_state import ModelState

CALIBRATION, HELD_OUT = 128, 256


def main(bundle_dir: str, k: int, out: str) -> int:
    bundle = load_bundle(bundle_dir, verify=False)
    if not 0 < k < len(bundle.blocks):
        print(f"error: k={k} is not a block boundary of this {len(bundle.blocks)}-block bundle", file=sys.stderr)
        return 2
    data = load_data("digits", bundle.input_size, bundle.classes)
    images = normalize(data.images[:CALIBRATION + HELD_OUT], bundle.mean, bundle.std)
    segment = FrozenSegment(bundle.blocks[:k], ModelState.load(bundle.weights_path), threads=1)
    seconds = segment.quantize(images[:CALIBRATION])
    held_out = images[CALIBRATION:]
    exact = segment.forward_exact(held_out)
    segment.use("int8")
    int8 = segment.forward(held_out)
    error = float(np.linalg.norm(int8 - exact) / np.linalg.norm(exact))
    np.savez(out, float32=exact, int8=int8, error=error, machine=platform.machine())
    print(f"{platform.machine()}: blocks 0..{k - 1} quantized in {seconds:.1f} s; int8 vs float32 "
          f"features on {HELD_OUT} unseen digits: relative error {error:.4f} "
          f"(documented bound {INT8_FEATURE_REL_ERROR})")
    if not error <= INT8_FEATURE_REL_ERROR:
        print(f"error: int8 features are {error:.4f} from float32, above the documented "
              f"{INT8_FEATURE_REL_ERROR}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
