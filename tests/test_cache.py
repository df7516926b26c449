"""The feature cache's stored dtypes: each round-trips within its documented error
(device_runner/cache.py, docs/device.md) and buys the documented capacity."""
from __future__ import annotations

import numpy as np
import pytest

from device_runner.cache import (CACHE_DTYPES, FLOAT16_MAX, FeatureCache, bytes_per_sample,
                                 capacity_samples, decode, encode)

SHAPE = (16, 8, 8)  # (channels, height, width) like a resnet32 x0.25 stage boundary


def relu_features(n: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Post-ReLU activations: about half exact zeros, a heavy tail, and a few large outliers."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(0.0, 1.0, (n, *shape)), 0.0) * rng.lognormal(0.0, 0.5, (n, shape[0], 1, 1))
    flat = x.reshape(-1)
    outliers = rng.choice(flat.size, size=max(1, flat.size // 2000), replace=False)
    flat[outliers] = rng.uniform(20.0, 200.0, outliers.size)
    return x.astype(np.float32)


def int8_bound(features: np.ndarray) -> np.ndarray:
    """scale/2 per element, scale = max|x|/127 per sample and channel (the documented bound)."""
    scale = np.abs(features).max(axis=(2, 3), keepdims=True) / 127.0
    return np.broadcast_to(scale / 2, features.shape)


@pytest.mark.parametrize("location", ["memory", "disk"])
@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_cached_features_come_back_within_documented_error(tmp_path, location, dtype):
    features = np.concatenate([relu_features(12, seed=1),
                               np.random.default_rng(2).normal(0, 1, (4, *SHAPE)).astype(np.float32)])
    cache = FeatureCache(20, SHAPE, location, max_mb=1, directory=tmp_path, dtype=dtype)
    idx = np.arange(2, 18)
    cache.put(idx, features)
    back = cache.get(idx)
    assert back.dtype == np.float32 and back.shape == features.shape
    error = np.abs(back - features)
    if dtype == "float32":
        np.testing.assert_array_equal(back, features)
    elif dtype == "float16":
        normal = np.abs(features) >= 2**-14
        assert np.max(error[normal] / np.abs(features[normal])) <= 2**-11
        assert np.max(error[~normal]) <= 2**-25
        assert np.array_equal(back == 0, features == 0)  # ReLU zeros stay exact
    else:
        assert np.all(error <= int8_bound(features) * (1 + 1e-6))
        assert np.all(back[features == 0] == 0)  # ReLU zeros stay exact (small values may round to 0)
        # The bound is per channel: an outlier costs its own channel only.
        quiet = np.abs(features).max(axis=(2, 3)) < 20
        assert np.max(error.max(axis=(2, 3))[quiet]) < 20 / 254


def test_float16_clips_beyond_its_range_and_keeps_nan():
    features = np.array([[1e5, -1e6, 3.0, np.nan]], dtype=np.float32)
    back = decode(*encode(features, "float16"))
    assert back[0, :2].tolist() == [FLOAT16_MAX, -FLOAT16_MAX]
    assert abs(back[0, 2] - 3.0) == 0 and np.isnan(back[0, 3])


def test_int8_all_zero_channel_and_flat_features():
    features = relu_features(3, seed=4)
    features[:, 5] = 0.0
    back = decode(*encode(features, "int8"))
    assert np.all(back[:, 5] == 0)
    flat = relu_features(5, seed=5, shape=(40, 1, 1)).reshape(5, 40)  # 1-D: one scale per sample
    values, scales = encode(flat, "int8")
    assert scales.shape == (5, 1)
    assert np.all(np.abs(decode(values, scales) - flat) <= scales / 2 * (1 + 1e-6))


def test_capacity_ratios():
    f32 = bytes_per_sample(SHAPE, "float32")
    assert f32 / bytes_per_sample(SHAPE, "float16") == 2
    assert f32 / bytes_per_sample(SHAPE, "int8") == 4 * 1024 / (1024 + 4 * 16)  # 3.76: the scales cost a little
    assert bytes_per_sample((32, 16, 16), "float32") / bytes_per_sample((32, 16, 16), "int8") > 3.9
    assert capacity_samples(SHAPE, "float16", 256) == 2 * capacity_samples(SHAPE, "float32", 256)
    assert capacity_samples(SHAPE, "int8", 256) >= 3.7 * capacity_samples(SHAPE, "float32", 256)


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_cache_off_in_float32_is_on_in_float16_and_int8(tmp_path, location):
    """A max_mb that holds N float32 samples holds 2N float16 (and more int8) samples: a
    dataset of 2N samples, cache off today, is cached."""
    n = 100
    max_mb = n * bytes_per_sample(SHAPE, "float32") / 2**20
    assert FeatureCache(n, SHAPE, location, max_mb, tmp_path, "float32").enabled
    off = FeatureCache(2 * n, SHAPE, location, max_mb, tmp_path, "float32")
    assert not off.enabled and "float32" in off.location
    for dtype in ("float16", "int8"):
        cache = FeatureCache(2 * n, SHAPE, location, max_mb, tmp_path, dtype)
        assert cache.enabled and cache.location == location
        cache.put(np.arange(2 * n), relu_features(2 * n))
        assert cache.samples_cached == 2 * n and cache.size_mb <= max_mb
    assert FeatureCache(3 * n, SHAPE, location, max_mb, tmp_path, "int8").enabled


@pytest.mark.parametrize("location", ["memory", "disk"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_transform_and_drop_keep_dtype_and_files(tmp_path, location, dtype):
    features = relu_features(6, seed=3)
    cache = FeatureCache(6, SHAPE, location, max_mb=1, directory=tmp_path, dtype=dtype)
    cache.put(np.arange(6), features)
    before = cache.get(np.arange(6))
    cache.transform(lambda f: f[:, :8, ::2, ::2] * 2, feature_shape=(8, 4, 4))  # a stage change
    assert cache.dtype == dtype and cache.feature_shape == (8, 4, 4)
    expected = before[:, :8, ::2, ::2] * 2
    tolerance = 2**-11 * np.abs(expected) if dtype == "float16" else int8_bound(expected) * (1 + 1e-6)
    assert np.all(np.abs(cache.get(np.arange(6)) - expected) <= tolerance)
    files = sorted(p.name.split(".", 1)[1] for p in tmp_path.glob("features-*"))
    if location == "disk":  # the old stage's files are gone; int8 keeps its scales beside the values
        assert files == ([f"{dtype}.npy"] if dtype == "float16" else ["int8.npy", "scales.npy"])
    else:
        assert files == []
    cache.drop()
    assert not cache.enabled and not list(tmp_path.glob("features-*"))


def test_dtype_from_profile_and_cli_survives_resume():
    """The cache is not checkpointed; a resumed run rebuilds it from the stored RunConfig,
    so --cache-dtype must come back from the checkpoint (older ones without it get the profile's)."""
    from device_runner.errors import ProfileError
    from device_runner.profile import load_profile
    from device_runner.run_config import RunConfig

    assert load_profile("raspberry-pi-4").cache_dtype == "float16"
    config = RunConfig(bundle="b", profile="raspberry-pi-4", cache_dtype="int8")
    resumed = RunConfig.from_dict(config.to_dict())
    assert load_profile(resumed.profile, resumed.profile_overrides()).cache_dtype == "int8"
    old = {k: v for k, v in config.to_dict().items() if k != "cache_dtype"}
    assert RunConfig.from_dict(old).profile_overrides() == {}
    with pytest.raises(ProfileError, match="dtype"):
        load_profile("raspberry-pi-4", {"cache.dtype": "bfloat16"})
