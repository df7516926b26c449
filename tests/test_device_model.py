"""Using the model a device run trained: evaluate, predict, export-model (torch-free CLIs).

One tiny run per module (the session bundle, digits, 2 epochs with a stage change, so the
model has the bundle prefix, one bridge of device-frozen weights and a suffix); every CLI
call runs where ``import torch`` fails.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_device_runner import config, quiet, run_cli, torch_blocker  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def run_dir(bundle_dir, tmp_path_factory):
    from device_runner.loop import start

    out = tmp_path_factory.mktemp("model") / "run"
    runner = start(config(bundle_dir, out, epochs=2, freeze_at=(1, 2), max_per_class=20), log=quiet)
    report = runner.run()
    assert report["status"] == "finished" and runner.stage_k == 15 and runner.frozen_params
    return out


def _folder(root, labels, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for label in labels:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _files(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _cli(args, blocker, tmp_path):
    log = tmp_path / "imports.log"
    result = run_cli(args, blocker, log)
    assert not log.exists(), f"device_runner tried to import {log.read_text()}"
    return result


def test_evaluate_reproduces_the_runs_held_out_accuracy(run_dir, torch_blocker, tmp_path):
    result = _cli(["evaluate", str(run_dir), "--json"], torch_blocker, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads(result.stdout)
    last = json.loads((run_dir / "report.json").read_text())["history"][-1]
    assert evaluation["top1"] == pytest.approx(last["val_acc"], abs=1e-12)
    assert evaluation["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert evaluation["top5"] >= evaluation["top1"] and evaluation["top5_k"] == 5
    matrix = np.array(evaluation["confusion"]["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == evaluation["images"]
    assert sum(c["images"] for c in evaluation["per_class"]) == evaluation["images"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(evaluation["top1"])
    assert evaluation["images_per_s"] > 0 and evaluation["peak_rss_mb"] > 0
    saved = json.loads((run_dir / "evaluate-held-out.json").read_text())
    assert saved["top1"] == evaluation["top1"]


def test_evaluate_matches_class_folders_by_name(run_dir, tmp_path):
    from device_runner.evaluate import evaluate

    data = _folder(tmp_path / "shots", ["3", "7"])
    before = _files(run_dir)
    evaluation = evaluate(run_dir, f"imagefolder:{data}", save=False)
    assert [(c["class"], c["index"], c["images"]) for c in evaluation["per_class"]] == [("3", 3, 3), ("7", 7, 3)]
    assert np.array(evaluation["confusion"]["matrix"])[[0, 1, 2, 4, 5, 6, 8, 9]].sum() == 0
    assert _files(run_dir) == before  # --no-save and a read-only model: nothing written


def test_evaluate_refuses_an_unknown_class_folder(run_dir, torch_blocker, tmp_path):
    data = _folder(tmp_path / "shots", ["3", "cat"])
    result = _cli(["evaluate", str(run_dir), "--data", f"imagefolder:{data}"], torch_blocker, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cat" in lines[0]
    assert not (run_dir / "evaluate-shots.json").exists()


def test_predict_gives_sorted_top_k_per_image(run_dir, torch_blocker, tmp_path):
    from device_runner.predict import read_image
    from device_runner.trained_model import TrainedModel

    data = _folder(tmp_path / "photos", ["a", "b"], per_class=2)
    (data / "b" / "broken.png").write_bytes(b"not an image")
    result = _cli(["predict", str(run_dir), str(data), "--top-k", "4", "--json"], torch_blocker, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    rows = out["predictions"]
    assert [r["image"] for r in rows] == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    assert out["skipped_unreadable"] == ["b/broken.png"]
    model = TrainedModel(run_dir)
    for row in rows:
        probabilities = [t["probability"] for t in row["top"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1.0 + 1e-9 and row["latency_ms"] > 0
        logits = model.logits(read_image(data / row["image"], model.input_size)[None])[0]
        assert row["label"] == model.classes[int(np.argmax(logits))]


def test_export_model_is_one_graph_equal_to_the_run(run_dir, torch_blocker, tmp_path):
    import onnx
    import onnxruntime

    from device_runner.export_model import PARITY_LIMIT, masked_weights
    from device_runner.trained_model import TrainedModel

    path = tmp_path / "model.onnx"
    result = _cli(["export-model", str(run_dir), "--out", str(path), "--json"], torch_blocker, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["parity_max_abs"] <= PARITY_LIMIT and "held-out" in summary["parity_data"]
    assert summary["bytes"] == path.stat().st_size < summary["dense_bytes"]
    assert summary["sparse_tensors"] > 0 and summary["sparse_saved_bytes"] > 0

    exported = onnx.load(str(path))
    onnx.checker.check_model(exported)
    assert exported.ir_version <= 10 and [i.name for i in exported.graph.input] == ["image"]
    assert not any(n.op_type == "Cast" for n in exported.graph.node)  # masks multiplied in, not applied
    model = TrainedModel(run_dir)
    # Fresh images the export never saw, on plain onnxruntime.
    images = np.random.default_rng(7).integers(0, 256, (33, 3, 16, 16), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": images.astype(np.float32)})[0]
    assert np.max(np.abs(got - model.logits(images))) <= PARITY_LIMIT
    # Device-trained weights with masks applied: masked positions exactly zero, the rest as trained.
    weights = masked_weights(exported)
    state = {**model.frozen_params, **model.suffix_parameters()}
    masks = [n for n in state if n.endswith("_mask")]
    assert any(n.startswith("blocks.14.") for n in masks) and any(n.startswith("blocks.16.") for n in masks)
    for mask in masks:
        weight, keep = mask[: -len("_mask")], state[mask] != 0
        assert np.all(weights[weight][~keep] == 0)
        np.testing.assert_array_equal(weights[weight][keep], state[weight][keep])
    for bn in [n for n in state if n.endswith("running_var")]:
        np.testing.assert_array_equal(weights[bn], state[bn])


def test_export_refuses_a_graph_that_does_not_match(run_dir, tmp_path, monkeypatch):
    from onnx import numpy_helper

    from device_runner import export_model as module
    from device_runner.errors import ExportError

    compose = module.compose

    def wrong(model):  # one BatchNorm bias off by 0.5: the graph is valid, its logits are not the run's
        composed = compose(model)
        tensor = next(t for t in composed.graph.initializer if t.name == "blocks.16.2.bias")
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(0.5), tensor.name))
        return composed

    monkeypatch.setattr(module, "compose", wrong)
    with pytest.raises(ExportError, match="differ from the run's"):
        module.export_model(run_dir, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_report_html_draws_the_latest_confusion_matrix(run_dir, tmp_path):
    from device_runner.evaluate import evaluate

    scored = evaluate(run_dir, "digits")
    result = run_cli(["report", str(run_dir), "--html", str(tmp_path / "r.html")])
    assert result.returncode == 0, result.stderr[-2000:]
    # the terminal summary says what the device learned: held-out before/after and the evaluation
    assert "before" in result.stdout and f"evaluate digits" in result.stdout
    assert f"top-1 {scored['top1']:.4f}" in result.stdout
    page = (tmp_path / "r.html").read_text()
    assert "evaluate: digits" in page and page.count("data:image/png;base64") == 2
