"""Benchmark scripts run end to end in --quick mode and write their JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _class_folders(data: Path, per_class: int) -> Path:
    """Ten class folders of random 32x32 PNGs (``per_class`` each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(10):
        folder = data / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return data


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_accuracy_vs_cost_quick(tmp_path, capsys):
    result = load("accuracy_vs_cost").main(["--quick", "--out", str(tmp_path)])
    rows = {r["row"]: r for r in result["table"]}
    assert set(rows) == {"dense", "sparse", "spfde-20+20"}
    assert rows["sparse"]["flops_vs_sparse"] == 1.0
    assert rows["dense"]["train_flops"] > rows["sparse"]["train_flops"] > rows["spfde-20+20"]["train_flops"]
    assert rows["spfde-20+20"]["sieve_reduction"] == pytest.approx(0.2, abs=0.02)
    assert json.loads((tmp_path / "results.json").read_text())["table"] == result["table"]
    assert "spfde-20+20" in capsys.readouterr().out


@pytest.mark.slow
def test_wall_vs_flops_quick(tmp_path, capsys):
    result = load("wall_vs_flops").main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["table"] == result["table"]
    rows = result["table"]
    freeze = sorted((r for r in rows if r["kind"] == "freeze"), key=lambda r: r["num_frozen"])
    base = freeze[0]
    assert base["num_frozen"] == 0 and base["sieve"] == 0
    assert base["cpu_ratio"] == 1.0 and base["wall_ratio"] == 1.0 and base["flops_ratio_sparse"] == 1.0 and base["flops_ratio_dense"] == 1.0
    assert len(freeze) >= 3 and freeze[-1]["num_frozen"] == result["num_blocks"] - 1
    for count in ("sparse", "dense"):  # freezing more blocks always saves FLOPs
        per_sample = [r[f"train_flops_per_sample_{count}"] for r in freeze]
        assert all(a > b for a, b in zip(per_sample, per_sample[1:]))
        # the frozen prefix still runs forward (a third of training at most), so k = n - 1 keeps more
        assert freeze[-1][f"flops_ratio_{count}"] > 1 / 3
    for r in rows:
        for clock in ("cpu", "wall"):
            assert r[f"{clock}_ratio"] > 0 and r[f"{clock}_ratio_paired"] > 0 and r[f"{clock}_step_s"] > 0
            assert r[f"{clock}_s_min"] <= r[f"{clock}_s_median"] <= r[f"{clock}_s_max"]
            assert len(r[f"{clock}_s_all"]) == result["config"]["rounds"]
        # the sparse count is never above the dense one; sieving scales samples, not per-sample FLOPs
        assert r["train_flops_per_sample_sparse"] < r["train_flops_per_sample_dense"]
        assert r["samples"] == round(64 * (1 - r["sieve"]))
        assert r["epoch_flops_sparse"] == pytest.approx(r["train_flops_per_sample_sparse"] * r["samples"])
    sieve = [r for r in rows if r["kind"] == "sieve"]
    assert sieve and all(r["flops_ratio_sparse"] == pytest.approx(1 - r["sieve"], abs=0.01) for r in sieve)
    assert {"cpu_freeze_vs_sparse_flops", "wall_sieve_vs_dense_flops"} <= set(result["fits"])
    assert result["fits"]["cpu_freeze_vs_sparse_flops"]["slope"] is not None
    assert "CPU ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_own_models_quick(tmp_path, capsys):
    """benchmarks/own_models.py on a generated class-folder set: every step (host training,
    export, host evaluation, device training, device evaluation) runs and the table is filled."""
    data = _class_folders(tmp_path / "images", 40)
    result = load("own_models").main(["--quick", "--models", "docs/examples/tiny_cnn.py:tiny_cnn",
                                      "--data-dir", str(data), "--work", str(tmp_path / "work"),
                                      "--out", str(tmp_path / "out")])
    (row,) = result["table"]
    assert row["model"] == "docs/examples/tiny_cnn.py:tiny_cnn"
    assert row["bundle_mb"] > 0 and 0.0 <= row["host_top1"] <= 1.0 and 0.0 <= row["device_top1"] <= 1.0
    assert row["device_stages"] and row["device_stages"][0]["step_p50_ms"] > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["table"] == result["table"]


def test_profile_step_puts_the_step_on_named_operators(bundle_v2_dir, tmp_path, capsys):
    """benchmarks/profile_step.py on the shared format-2 bundle: ONNX Runtime's profiler per
    program and operator, torch.profiler per aten operator, and the wall times beside them."""
    result = load("profile_step").main(["--bundle", str(bundle_v2_dir), "--k", "12", "--batch", "16",
                                        "--steps", "2", "--warmup", "1", "--threads", "1",
                                        "--out", str(tmp_path)])
    kernels = {(kind, op): ms for kind, op, ms in result["ort_kernels"]}
    assert kernels[("train", "Conv")] > 0 and kernels[("backward", "Conv")] > 0
    assert {kind for kind, _ in kernels} == {"train", "backward", "backward_first"}
    assert 0 < result["ort_kernel_ms"] <= result["ort_model_run_ms"] <= result["chain_profiled_ms"]
    assert "aten::convolution_backward" in dict(result["torch_ops"])
    assert result["chain_ms"] > 0 and result["torch_ms"] > 0 and len(result["chain_ms_all"]) == 2
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["ort_kernels"] == result["ort_kernels"]
    assert "| train | Conv |" in capsys.readouterr().out


@pytest.mark.slow
def test_int8_prefix_quick(tmp_path, capsys):
    """benchmarks/int8_prefix.py on a generated class-folder set: host training, export, then
    the prefix fed / float32 / int8 timed and its top-1 measured at both split points."""
    from device_runner.backends.frozen_segment import INT8_FEATURE_REL_ERROR

    data = _class_folders(tmp_path / "images", 45)
    result = load("int8_prefix").main(["--quick", "--data-dir", str(data), "--work", str(tmp_path / "work"),
                                       "--out", str(tmp_path / "out")])
    rows = result["rows"]
    assert [r["k"] for r in rows] == [8, 11]
    for row in rows:
        assert row["fed_ms"] > 0 and row["float32_ms"] > 0 and row["int8_ms"] > 0
        assert row["calibration_samples"] == 128 and row["test_images"] == 100
        assert 0 < row["feature_rel_error"] <= INT8_FEATURE_REL_ERROR
        assert row["float32_vs_fed_rel_error"] < 1e-4
        assert abs(row["top1_change"] - (row["top1_int8"] - row["top1_float32"])) < 1e-9
    assert "| resnet32 x0.5 | 8 |" in capsys.readouterr().out


def test_sparse_products_quick(tmp_path, capsys):
    """benchmarks/sparse_products.py: every suffix layer's CSR products compute what the dense
    ones do (so the timings compare the same work) and the JSON carries both timings."""
    result = load("sparse_products").main(["--quick", "--out", str(tmp_path)])
    case = result["cases"][0]
    layers = [row for row in case["layers"] if "skipped" not in row]
    assert {row["kind"] for row in layers} == {"conv 3x3 s1", "conv 3x3 s2", "conv 1x1 s2", "linear"}
    for row in layers:
        assert row["forward_rel_error"] < 1e-5, row
        assert row.get("input_grad_rel_error", 0.0) < 1e-5, row
        assert row["dense_forward_ms"] > 0 and row["sparse_forward_ms"] > 0
        assert row["best_ms"] <= min(row["dense_ms"], row["sparse_ms"]) + 1e-9
    assert 0 <= case["best_saving"] < 1
    assert json.loads((tmp_path / "results.json").read_text())["cases"][0]["density"] == 0.1
    assert "the faster of each" in capsys.readouterr().out


def test_weight_gradient_forms_quick(tmp_path, capsys):
    """benchmarks/weight_gradient_forms.py: the four ONNX forms of a weight gradient (the
    exporter's taps among them) agree with PyTorch's before they are timed, strided ones too."""
    result = load("weight_gradient_forms").main(["--quick", "--out", str(tmp_path)])
    rows = result["cases"][0]["rows"]
    assert {row["shape"].split()[-1] for row in rows} == {"s1", "s2"}
    for row in rows:
        for form in ("taps", "padded_taps", "im2col", "convolution"):
            assert row[f"{form}_rel_error"] < 1e-5, (form, row)
            assert row[f"{form}_ms"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["cases"][0]["totals_ms"]["taps"] > 0
    assert "relative to taps" in capsys.readouterr().out
