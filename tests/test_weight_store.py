"""The bundle's one sparse weight store, weights.safetensors (device_runner/weight_store.py):
exact round trip, size of a sparse weight, refusal of damaged or inconsistent files, and
that the device side reads it without torch."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from device_runner.errors import BundleError
from device_runner.weight_store import STORE_FILE, read_weights, store_bytes_per_tensor, write_weights

REPO = Path(__file__).resolve().parents[1]


def masked(rng: np.random.Generator, shape, density: float) -> tuple[np.ndarray, np.ndarray]:
    mask = (rng.random(shape) < density).astype(np.uint8)
    return rng.standard_normal(shape).astype(np.float32) * mask, mask


def header_bytes(path: Path) -> int:
    """8-byte length prefix plus the JSON header of a safetensors file."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    conv, conv_mask = masked(rng, (16, 8, 3, 3), 0.1)
    odd, odd_mask = masked(rng, (5, 3), 0.5)  # 15 entries: the packed mask has padding bits
    tensors = {
        "conv1.weight": conv,
        "fc.weight": rng.standard_normal((10, 32)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
        "bn1.weight": rng.random(16).astype(np.float32),
        "bn1.bias": rng.standard_normal(16).astype(np.float32),
        "bn1.running_mean": rng.standard_normal(16).astype(np.float32),
        "bn1.running_var": rng.random(16).astype(np.float32) + 0.5,
        "head.weight": odd,
    }
    masks = {"conv1.weight": conv_mask, "head.weight": odd_mask.astype(bool)}
    path = tmp_path / STORE_FILE
    written = write_weights(path, tensors, masks)
    assert written == path.stat().st_size

    back, back_masks = read_weights(path)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == np.float32 and back[name].shape == tensor.shape, name
        assert np.array_equal(back[name], tensor), name
    assert set(back_masks) == set(masks)
    for name, mask in masks.items():
        assert back_masks[name].dtype == np.uint8 and back_masks[name].shape == mask.shape, name
        assert np.array_equal(back_masks[name], mask.astype(np.uint8)), name

    # Stored once: the masked weight as values + packed mask, never as a dense copy.
    with open(path, "rb") as handle:
        handle.read(8)
        header = json.loads(handle.read(header_bytes(path) - 8))
    assert "conv1.weight" not in header and header["conv1.weight.values"]["shape"] == [int(conv_mask.sum())]
    assert header["conv1.weight.mask"]["shape"] == [conv_mask.size // 8]
    assert json.loads(header["__metadata__"]["shapes"]) == {"conv1.weight": [16, 8, 3, 3], "head.weight": [5, 3]}
    assert header["__metadata__"]["format"] == "spfde-weights"


def test_sparse_weight_is_small(tmp_path):
    rng = np.random.default_rng(1)
    weight, mask = masked(rng, (256, 256, 3, 3), 0.1)
    tensors = {"layer.weight": weight, "layer.bias": np.zeros(256, np.float32)}
    path = tmp_path / STORE_FILE
    write_weights(path, tensors, {"layer.weight": mask})

    size = path.stat().st_size
    active = int(mask.sum())
    assert size <= 4 * active + weight.size // 8 + 4 * 256 + 4096
    assert size < 0.2 * weight.nbytes

    sizes = store_bytes_per_tensor(path)
    assert sizes == {"layer.weight": 4 * active + weight.size // 8, "layer.bias": 4 * 256}
    assert 0 <= size - sum(sizes.values()) <= header_bytes(path)


def test_refuses_a_masked_weight_that_is_not_zero_where_masked(tmp_path):
    rng = np.random.default_rng(2)
    weight, mask = masked(rng, (8, 4), 0.5)
    weight.flat[np.flatnonzero(mask == 0)[0]] = 1e-30  # one tiny leftover is enough to refuse
    path = tmp_path / STORE_FILE
    with pytest.raises(ValueError, match="non-zero where its mask is 0"):
        write_weights(path, {"w": weight}, {"w": mask})
    with pytest.raises(ValueError, match="shape"):
        write_weights(path, {"w": weight * mask}, {"w": mask.T})
    with pytest.raises(ValueError, match="not in the model"):
        write_weights(path, {"w": weight * mask}, {"v": mask})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_truncated_file(tmp_path):
    rng = np.random.default_rng(3)
    weight, mask = masked(rng, (64, 32), 0.2)
    path = tmp_path / STORE_FILE
    write_weights(path, {"w": weight, "b": np.ones(64, np.float32)}, {"w": mask})
    path.write_bytes(path.read_bytes()[:-17])
    with pytest.raises(BundleError, match="copy the bundle again"):
        read_weights(path)
    with pytest.raises(BundleError):
        store_bytes_per_tensor(path)


def test_refuses_values_that_do_not_match_the_mask(tmp_path):
    rng = np.random.default_rng(4)
    _, mask = masked(rng, (6, 10), 0.3)
    active = int(mask.sum())
    metadata = {"format": "spfde-weights", "format_version": "1", "shapes": json.dumps({"fc.weight": [6, 10]})}
    path = tmp_path / STORE_FILE
    save_file({"fc.weight.values": np.ones(active + 1, np.float32),
               "fc.weight.mask": np.packbits(mask.ravel(), bitorder="little")}, str(path), metadata=metadata)
    with pytest.raises(BundleError, match=r"'fc\.weight' has \d+ values but its mask has \d+ active.*re-export"):
        read_weights(path)

    # The same file with the right count reads: the refusal above was about the count.
    save_file({"fc.weight.values": np.ones(active, np.float32),
               "fc.weight.mask": np.packbits(mask.ravel(), bitorder="little")}, str(path), metadata=metadata)
    tensors, masks = read_weights(path)
    assert np.array_equal(masks["fc.weight"], mask) and np.array_equal(tensors["fc.weight"], mask.astype(np.float32))


def test_refuses_missing_mask_wrong_format_and_wrong_dtype(tmp_path):
    path = tmp_path / STORE_FILE
    shapes = json.dumps({"w": [4]})
    save_file({"w.values": np.ones(2, np.float32)}, str(path),
              metadata={"format": "spfde-weights", "format_version": "1", "shapes": shapes})
    with pytest.raises(BundleError, match="'w' has no 'w.mask'"):
        read_weights(path)
    save_file({"b": np.ones(2, np.float32)}, str(path),
              metadata={"format": "spfde-weights", "format_version": "2", "shapes": "{}"})
    with pytest.raises(BundleError, match="format_version '2'.*re-export the bundle"):
        read_weights(path)
    save_file({"b": np.ones(2, np.float32)}, str(path))
    with pytest.raises(BundleError, match="format is None"):
        read_weights(path)
    save_file({"b": np.ones(2, np.float64)}, str(path),
              metadata={"format": "spfde-weights", "format_version": "1", "shapes": "{}"})
    with pytest.raises(BundleError, match="'b' is float64"):
        read_weights(path)
    with pytest.raises(BundleError, match="missing"):
        read_weights(tmp_path / "nope" / STORE_FILE)


def test_device_reads_it_without_torch(tmp_path):
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
from device_runner.weight_store import read_weights, write_weights
mask = (np.arange(24).reshape(2, 3, 4) % 3 == 0).astype(np.uint8)
weight = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * mask
bias = np.array([0.5, -1.5], np.float32)
path = {str(tmp_path / STORE_FILE)!r}
write_weights(path, {{"w": weight, "b": bias}}, {{"w": mask}})
tensors, masks = read_weights(path)
assert np.array_equal(tensors["w"], weight) and np.array_equal(tensors["b"], bias)
assert np.array_equal(masks["w"], mask)
assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / STORE_FILE).is_file()
