"""Phase 7d of scripts/arm64_check.sh: the int8 frozen prefix on x86-64 and on arm64.

Each machine's int8 features must be within the documented INT8_FEATURE_REL_ERROR of the
*other* machine's float32 features (the float32 prefix is the reference a user trusts), and
the two float32 runs must agree to float32 rounding. How far the two int8 builds are apart
is reported: the int8 kernels differ between the architectures, so bit equality is not asked.

    python scripts/arm64/compare_int8.py X86.npz ARM64.npz
"""
from __future__ import annotations

import sys

import numpy as np

from device_runner.backends.frozen_segment import INT8_FEATURE_REL_ERROR

FLOAT32_REL = 1e-4


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(first: str, second: str) -> int:
    a, b = np.load(first), np.load(second)
    names = (str(a["machine"]), str(b["machine"]))
    checks = [
        (f"float32 {names[0]} vs float32 {names[1]}", rel(a["float32"], b["float32"]), FLOAT32_REL),
        (f"int8 {names[0]} vs float32 {names[0]}", float(a["error"]), INT8_FEATURE_REL_ERROR),
        (f"int8 {names[1]} vs float32 {names[1]}", float(b["error"]), INT8_FEATURE_REL_ERROR),
        (f"int8 {names[1]} vs float32 {names[0]}", rel(b["int8"], a["float32"]), INT8_FEATURE_REL_ERROR),
        (f"int8 {names[0]} vs float32 {names[1]}", rel(a["int8"], b["float32"]), INT8_FEATURE_REL_ERROR),
    ]
    failed = 0
    for what, value, bound in checks:
        ok = value <= bound
        failed += not ok
        print(f"   {what:40s} relative {value:.2e}  (bound {bound:g})  {'ok' if ok else 'FAILED'}")
    same = float(np.mean(a["int8"] == b["int8"]))
    print(f"   int8 {names[0]} vs int8 {names[1]}: relative {rel(a['int8'], b['int8']):.2e}, "
          f"{100 * same:.1f} % of values identical (reported, not checked)")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    sys.exit(main(sys.argv[1], sys.argv[2]))
