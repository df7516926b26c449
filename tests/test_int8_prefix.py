"""The frozen prefix as constant-weight sessions, float32 or static int8 (backends/frozen_segment.py).

On the shared format-2 test bundle (resnet32 x0.25, 16x16) and the shipped digits, with real
ONNX Runtime sessions and ONNX Runtime's quantization tool; no torch on the device side.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from test_device_v2 import config, quiet


def _digits(bundle, count: int, offset: int = 0):
    from device_runner.data import load_data, normalize

    data = load_data("digits", bundle.input_size, bundle.classes)
    return normalize(data.images[offset:offset + count], bundle.mean, bundle.std), data.labels[offset:offset + count]


def _segment_and_chain(bundle_v2_dir, k: int):
    from device_runner.backends.block_chain import BlockSessions, InferChain
    from device_runner.backends.frozen_segment import FrozenSegment
    from device_runner.bundle import load_bundle
    from device_runner.model_state import ModelState

    bundle = load_bundle(bundle_v2_dir)
    state = ModelState.load(bundle.weights_path)
    return bundle, FrozenSegment(bundle.blocks[:k], state, 1), InferChain(bundle.blocks[:k], state, BlockSessions(1))


def test_float32_segment_computes_what_the_block_programs_compute(bundle_v2_dir):
    bundle, segment, chain = _segment_and_chain(bundle_v2_dir, 8)
    x, _ = _digits(bundle, 64)
    exact, fed = segment.forward_exact(x), chain.forward(x)
    np.testing.assert_allclose(exact, fed, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(segment.forward(x), exact)        # float32 until int8 is chosen
    assert segment.name.endswith("(float32)")


def test_int8_segment_stays_within_its_documented_error(bundle_v2_dir):
    from device_runner.backends.frozen_segment import INT8_FEATURE_REL_ERROR

    bundle, segment, _ = _segment_and_chain(bundle_v2_dir, 8)
    calibration, _ = _digits(bundle, 64)
    held_out, _ = _digits(bundle, 256, offset=64)            # samples the ranges never saw
    seconds = segment.quantize(calibration)
    assert 0 < seconds < 60
    exact = segment.forward_exact(held_out)
    segment.use("int8")
    int8 = segment.forward(held_out)
    error = np.linalg.norm(int8 - exact) / np.linalg.norm(exact)
    assert 1e-4 < error <= INT8_FEATURE_REL_ERROR, error     # really int8, and within the documented bound
    np.testing.assert_array_equal(segment.forward_exact(held_out), exact)   # evaluation stays float32
    assert segment.name.endswith("(int8)")
    again = _segment_and_chain(bundle_v2_dir, 8)[1]          # same weights and samples: the same model
    again.quantize(calibration)
    again.use("int8")
    np.testing.assert_array_equal(again.forward(held_out), int8)


@pytest.mark.parametrize("top1_int8, expected", [(89.6, "int8"), (89.4, "float32"), (91.0, "int8")])
def test_auto_keeps_int8_only_within_half_a_point(bundle_v2_dir, top1_int8, expected):
    from device_runner.backends.frozen_segment import choose_precision

    bundle, segment, _ = _segment_and_chain(bundle_v2_dir, 4)
    calibration, _ = _digits(bundle, 32)
    record = choose_precision(segment, "auto", calibration,
                              lambda: 90.0 if segment.precision == "float32" else top1_int8)
    assert record["precision"] == expected == segment.precision
    assert record["top1_float32"] == 90.0 and record["top1_int8"] == top1_int8
    assert record["blocks"] == [0, 3] and "auto" in record["why"]


def test_profile_choices_float32_and_int8(bundle_v2_dir):
    from device_runner.backends.frozen_segment import choose_precision

    bundle, segment, _ = _segment_and_chain(bundle_v2_dir, 4)
    calibration, _ = _digits(bundle, 32)
    record = choose_precision(segment, "float32", calibration, lambda: pytest.fail("float32 measures nothing"))
    assert record["precision"] == "float32" and "quantize_s" not in record
    record = choose_precision(segment, "int8", calibration, lambda: 50.0 if segment.precision == "float32" else 10.0)
    assert record["precision"] == "int8" == segment.precision and record["top1_change"] == -40.0
    record = choose_precision(segment, "auto", calibration, lambda: None)   # no held-out samples
    assert record["precision"] == "float32" and "no held-out" in record["why"]


def test_a_run_records_the_choice_and_a_resume_rebuilds_the_same_prefix(bundle_v2_dir, tmp_path):
    from device_runner.loop import resume, start

    out = tmp_path / "run"
    runner = start(config(bundle_v2_dir, out, prefix_precision="int8", stages=(6, 10), freeze_at=(1,)), log=quiet)
    assert [r["precision"] for r in runner.pipeline.precisions] == ["int8"]
    assert any(e["kind"] == "prefix_precision" for e in runner.events)
    end_epoch = runner._end_epoch

    def stop_after_the_stage_change():        # as Ctrl-C would: the run can be resumed
        end_epoch()
        if runner.epoch == 2:
            runner.stop(2)

    runner._end_epoch = stop_after_the_stage_change
    assert runner.run()["status"] == "stopped: interrupted"
    assert [r["blocks"] for r in runner.pipeline.precisions] == [[0, 5], [6, 9]]
    x = runner.pipeline.data.images[runner.train_idx[:16]]
    from device_runner.data import normalize

    x = normalize(x, runner.bundle.mean, runner.bundle.std)
    features = runner.pipeline.prefix.forward(x)
    exact = runner.pipeline.prefix.forward(x, rounded=False)
    assert not np.array_equal(features, exact)               # training reads int8 features
    again = resume(out, log=quiet)
    assert again.pipeline.precisions == runner.pipeline.precisions
    np.testing.assert_array_equal(again.pipeline.prefix.forward(x), features)
    np.testing.assert_array_equal(again.pipeline.prefix.forward(x, rounded=False), exact)


def test_float32_profile_builds_no_int8(bundle_v2_dir, tmp_path):
    from device_runner.loop import start

    runner = start(config(bundle_v2_dir, tmp_path / "run", prefix_precision="float32", stages=(6, 10)), log=quiet)
    (record,) = runner.pipeline.precisions
    assert record["precision"] == "float32" and "quantize_s" not in record
    assert runner.pipeline.prefix.base._int8 is None


def test_the_quantizer_does_not_import_torch():
    code = ("import sys; from device_runner.backends import quantize; quantize._quantization(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_segment_the_quantizer_refuses_stays_float32_under_auto(bundle_v2_dir, monkeypatch):
    from device_runner.backends import quantize
    from device_runner.backends.frozen_segment import choose_precision
    from device_runner.errors import RunError

    bundle, segment, _ = _segment_and_chain(bundle_v2_dir, 4)
    calibration, _ = _digits(bundle, 32)

    def refuse(model, calibration):
        raise ValueError("unsupported operator Foo\nsecond line")

    monkeypatch.setattr(quantize, "int8_model", refuse)
    record = choose_precision(segment, "auto", calibration, lambda: 50.0)
    assert record["precision"] == "float32" == segment.precision
    assert record["why"] == "auto: int8 quantization failed (ValueError: unsupported operator Foo); float32 kept"
    with pytest.raises(RunError, match="blocks 0..3 cannot be quantized to int8.*--prefix-precision float32"):
        choose_precision(segment, "int8", calibration, lambda: 50.0)


def test_the_arm64_checks_int8_scripts_compare_two_machines_files(bundle_v2_dir, tmp_path):
    """scripts/arm64/int8_features.py + compare_int8.py (phase 7 of scripts/arm64_check.sh), run
    twice here: the same machine agrees with itself, and a file whose int8 features are off by
    more than the documented error makes the comparison fail."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}
    outs = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for out in outs:
        made = subprocess.run([sys.executable, "scripts/arm64/int8_features.py", str(bundle_v2_dir), "8", str(out)],
                              cwd=repo, env=env, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-2000:]
        assert "documented bound 0.06" in made.stdout
    compare = [sys.executable, "scripts/arm64/compare_int8.py", str(outs[0])]
    same = subprocess.run(compare + [str(outs[1])], cwd=repo, env=env, capture_output=True, text=True)
    assert same.returncode == 0 and "100.0 % of values identical" in same.stdout, same.stdout + same.stderr
    off = dict(np.load(outs[1]))
    off["int8"] = off["int8"] + 0.2 * np.abs(off["float32"]).max()
    np.savez(tmp_path / "off.npz", **off)
    failed = subprocess.run(compare + [str(tmp_path / "off.npz")], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "FAILED" in failed.stdout
