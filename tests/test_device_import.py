"""Bring a device run home (spfde_edge.import), merge a fleet (spfde_edge.merge), export the
trained model (export --from-device --format pte).

Device runs use resnet32 x0.25 at 16x16 with blocks 0..13 frozen by the host, in both bundle
formats: format 1 is the session bundle (conftest.py, a fresh model exported with stages
14-16), format 2 (the default) is exported from a host checkpoint that froze 14 blocks, so
its run stages are 14 and 15 and blocks 0..13 come from the weight store. 2 device epochs
with a stage change (14 -> 15 at epoch 1) on a few images per class, a few seconds each.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from device_runner.__main__ import main as device_main
from device_runner.datasets import digits
from device_runner.files import sha256_file
from device_runner.manifest import MANIFEST_NAME
from device_runner.trained_model import TrainedModel
from spfde_edge import trainer as trainer_mod
from spfde_edge.checkpoint import load_checkpoint
from spfde_edge.data import normalize
from spfde_edge.device_import import import_run, keep_largest, read_device_run
from spfde_edge.fleet import merge_layer, merge_runs

DEVICE_ARGS = ["--profile", "generic-x86", "--epochs", "2", "--threads", "1"]


def device_run(bundle: Path, data: str, out: Path, *extra: str, freeze_at: str | None = None) -> Path:
    """2 device epochs; by default stage 14 -> 15 at epoch 1 (format 1's stage 16 would start
    at the end)."""
    if _format(bundle) == 1:
        stages = ["--freeze-at", freeze_at or "1,2"]
    else:   # the host plan freezes no more blocks: the device chooses boundary 15 itself
        stages = ["--stages", "14,15", "--freeze-at", freeze_at or "1"]
    assert device_main(["--bundle", str(bundle), "--data", data, "--out", str(out), *stages,
                        *DEVICE_ARGS, *extra]) == 0
    return out


def _format(bundle: Path) -> int:
    return json.loads((bundle / MANIFEST_NAME).read_text())["format_version"]


@pytest.fixture(scope="module")
def bundle_v2_frozen14(tmp_path_factory) -> Path:
    """Format 2 exported from a host checkpoint (trainer layout) at epoch 26 of 30 with blocks
    0..13 frozen, all the plan freezes (runs freeze block 14 with ``--stages 14,15``)."""
    from spfde_edge.checkpoint import save_checkpoint
    from spfde_edge.config import TrainConfig
    from spfde_edge.export import ExportOptions, export_bundle
    from spfde_edge.models import create_model
    from spfde_edge.sparsity.masks import MaskSet

    config = TrainConfig(model="resnet32", width=0.25, input_size=16, batch_size=16, epochs=30, delta_tau=2,
                         sparsity=0.9, distribution="uniform", dataset="digits")
    torch.manual_seed(5)
    model = create_model("resnet32", num_classes=10, width=0.25)
    masks = MaskSet.random(model, 0.9, "uniform", torch.Generator().manual_seed(6))
    masks.apply(model)
    model.freeze_prefix(14)
    root = tmp_path_factory.mktemp("host")
    save_checkpoint(root / "checkpoint.pt", {
        "config": config.to_dict(), "model": model.state_dict(), "masks": masks.state_dict(),
        "num_frozen": 14, "epoch": 26,
        "freeze_plan": {"version": 1, "freeze_epochs": list(range(10, 24)), "T_frz": 10,
                        "reduction": 0.3},
        "block_names": model.block_names, "classes": [str(i) for i in range(10)],
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": 16})
    out = root / "bundle"
    export_bundle(ExportOptions(checkpoint=str(root / "checkpoint.pt"), out=str(out), bundle_format=2),
                  log=lambda line: None)
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["format1", "format2"])
def run_dir(request, tmp_path_factory) -> Path:
    if request.param == 2:
        return request.getfixturevalue("run_v2")
    return device_run(request.getfixturevalue("bundle_dir"), "digits", tmp_path_factory.mktemp("dev") / "run",
                      "--max-per-class", "20")


@pytest.fixture(scope="module")
def run_v2(bundle_v2_frozen14, tmp_path_factory) -> Path:
    return device_run(bundle_v2_frozen14, "digits", tmp_path_factory.mktemp("dev2") / "run",
                      "--max-per-class", "20")


@pytest.fixture(scope="module")
def fleet(bundle_v2_frozen14, tmp_path_factory) -> list[Path]:
    """Three simulated devices on disjoint, class-balanced digits (6, 9 and 12 images per class,
    so the runs train on different numbers of samples); the first stays at stage 14, the
    others move to stage 15."""
    root = tmp_path_factory.mktemp("fleet")
    pixels, labels = digits()
    runs, start = [], 0
    for device, count in enumerate((6, 9, 12)):
        for label in range(10):
            folder = root / f"data{device}" / str(label)
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == label)[start:start + count]:
                gray = (pixels[i].astype(np.float32) * 255 / 16).astype(np.uint8)
                Image.fromarray(np.stack([gray] * 3, -1)).save(folder / f"{i}.png")
        start += count
        runs.append(device_run(bundle_v2_frozen14, f"imagefolder:{root / f'data{device}'}", root / f"run{device}",
                               "--seed", str(device), "--val-fraction", "0.2",
                               freeze_at="2" if device == 0 else "1"))
    return runs


def host_logits_after_resume(out: Path, images: np.ndarray) -> tuple[np.ndarray, trainer_mod.Trainer]:
    """Logits of the host trainer that ``train --resume out`` builds, on uint8 images."""
    trainer = trainer_mod.resume(out)
    trainer.run_lock.release()
    trainer.model.eval()
    with torch.no_grad():
        x = normalize(torch.from_numpy(images), trainer.data.mean, trainer.data.std)
        return trainer.model(x).numpy(), trainer


def test_keep_largest_and_merge_layer_by_hand():
    assert keep_largest(np.array([[0.5, 2.0], [2.0, 0.1]]), 2).tolist() == [[False, True], [True, False]]
    assert keep_largest(np.array([1.0, 1.0, 1.0]), 2).tolist() == [True, True, False]  # ties: lower index
    w1, m1 = np.array([1.0, 0.0, 4.0, 0.0]), np.array([1, 0, 1, 0], bool)
    w2, m2 = np.array([3.0, 2.0, 0.0, 0.0]), np.array([1, 1, 0, 0], bool)
    weight, mask = merge_layer([w1, w2], [m1, m2], [0.25, 0.75], active=2)
    # scores: 0.25|w1| + 0.75|w2| = [2.5, 1.5, 1.0, 0]: keep positions 0 and 1
    assert mask.tolist() == [True, True, False, False]
    # position 0: both active -> weighted average; position 1: only member 2 -> its value
    assert weight.tolist() == [pytest.approx(0.25 * 1 + 0.75 * 3), 2.0, 0.0, 0.0]


def test_round_trip_host_equals_device(run_dir, tmp_path):
    out = import_run(run_dir, tmp_path / "home", log=lambda line: None)
    trained = TrainedModel(run_dir)
    held_out = trained.held_out()
    device = trained.logits(held_out.images)
    host, trainer = host_logits_after_resume(out, held_out.images)
    assert np.abs(host - device).max() <= 1e-4
    assert (host.argmax(1) == device.argmax(1)).all()
    # The host trainer holds what the device had: its stage frozen, exact sparsity, the bundle's
    # normalisation, and the plan's epoch (2 device epochs ran the rest of the 30-epoch plan).
    assert trainer.model.num_frozen == trained.stage_k == 15
    trainer.masks.check(trainer.model)
    assert trainer.data.mean == tuple(trained.bundle.mean)
    assert trainer.epoch == 30
    record = json.loads((out / "import.json").read_text())
    assert record["samples"] == sum(h["samples"] for h in trained.history) > 0
    assert record["bundle_manifest_sha256"] == sha256_file(trained.bundle.root / MANIFEST_NAME)


def test_resume_continues_spfde_on_the_host(run_dir, tmp_path):
    from spfde_edge.train import main as train_main

    out = import_run(run_dir, tmp_path / "home", epochs=31, log=lambda line: None)
    before = load_checkpoint(out)
    assert train_main(["--resume", str(out), "--threads", "1"]) == 0
    after = load_checkpoint(out)
    assert (before["epoch"], after["epoch"]) == (30, 31)
    assert after["num_frozen"] == 15
    trainable = "blocks.16.2.weight"  # the head trained on the host
    assert not torch.equal(before["model"][trainable], after["model"][trainable])
    frozen = "blocks.14.conv1.weight"  # trained on the device, then frozen there: never moves again
    assert torch.equal(before["model"][frozen], after["model"][frozen])
    for name, mask in after["masks"]["masks"].items():
        assert int((~mask).sum()) == after["masks"]["target_zeros"][name]


def test_import_errors_are_one_line(tmp_path, capsys):
    from importlib import import_module

    assert import_module("spfde_edge.import").main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "checkpoint" in err[0]


def test_merge_of_three_devices(fleet, tmp_path):
    members = [read_device_run(run) for run in fleet]
    samples = np.array([m.samples for m in members], dtype=np.float64)
    assert len(set(samples)) == 3  # different amounts of data: a real weighting
    alphas = samples / samples.sum()
    out = merge_runs(fleet, tmp_path / "merged", log=lambda line: None)
    merged = load_checkpoint(out)
    state, masks = merged["model"], merged["masks"]
    # the earliest common frozen point: block 14 froze on two devices but trained on to the end on one
    assert [m.num_frozen for m in members] == [14, 15, 15]
    assert merged["num_frozen"] == 14
    compared = 0
    for name, mask in masks["masks"].items():
        # exact sparsity per layer
        assert int((~mask).sum()) == masks["target_zeros"][name], name
        weight = state[name].numpy()
        assert (weight[~mask.numpy()] == 0).all()
        if int(name.split(".")[1]) < 14:
            continue  # bundle blocks: identical in every run
        member_w = [m.model.state_dict()[name].numpy() for m in members]
        member_m = [m.masks[name].numpy() for m in members]
        everywhere = np.logical_and.reduce(member_m) & mask.numpy()
        average = sum(a * w for a, w in zip(alphas, member_w))
        np.testing.assert_allclose(weight[everywhere], average[everywhere], rtol=1e-5, atol=1e-7)
        compared += int(everywhere.sum())
        score = sum(a * np.abs(w) for a, w in zip(alphas, member_w))
        assert score[mask.numpy()].min() >= score[~mask.numpy()].max()
    assert compared > 0
    for stat in ("blocks.14.bn1.running_mean", "blocks.15.bn1.running_var", "blocks.16.2.bias"):
        average = sum(a * m.model.state_dict()[stat].double() for a, m in zip(alphas, members))
        torch.testing.assert_close(state[stat].double(), average, rtol=1e-6, atol=1e-7)
    record = json.loads((out / "import.json").read_text())
    assert record["samples"] == int(samples.sum()) and len(record["runs"]) == 3

    # ... and it exports as the next round's bundle: stages from the merged model's 14 frozen
    # blocks, blocks 0..13 as they were in every run.
    from device_runner.bundle import load_bundle
    from device_runner.model_state import ModelState
    from device_runner.schedule import run_stage_ks
    from spfde_edge.export import ExportOptions, export_bundle
    bundle = export_bundle(ExportOptions(checkpoint=str(out), out=str(tmp_path / "round2")), log=lambda line: None)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2 and manifest["source"]["checkpoint"] == str(out)
    assert run_stage_ks(load_bundle(bundle))[0] == 14
    stored = ModelState.load(bundle / "weights.safetensors").weights
    for name, value in state.items():
        if name in stored:
            np.testing.assert_array_equal(stored[name].reshape(value.shape), value.numpy(), err_msg=name)


def test_merge_refuses_runs_of_different_bundles(bundle_v2_frozen14, run_v2, tmp_path, capsys):
    """A copy of the bundle with one file changed (and its manifest entry updated) is another
    bundle, even when the changed file is one the runs never load (boundary 16's artifacts)."""
    other = tmp_path / "other"
    shutil.copytree(bundle_v2_frozen14, other)
    rel = "ort/k16/optimizer_model.onnx"
    changed = other / rel
    changed.write_bytes(changed.read_bytes() + b"-changed")
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["files"][rel] = {"sha256": sha256_file(changed), "bytes": changed.stat().st_size}
    (other / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    other_run = device_run(other, "digits", tmp_path / "other-run", "--max-per-class", "8",
                           "--suffix-backend", "onnxruntime")
    from spfde_edge.merge import main as merge_main
    assert merge_main([str(run_v2), str(other_run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge runs of one bundle" in err[0]
    assert not (tmp_path / "merged" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_from_device_pte(run_v2, tmp_path):
    """The whole trained model as one XNNPACK .pte (real ExecuTorch lowering, about a minute)."""
    pytest.importorskip("executorch")
    from spfde_edge.export.__main__ import main as export_main
    from spfde_edge.export.prefix import run_pte

    out = tmp_path / "model.pte"
    assert export_main(["--from-device", str(run_v2), "--format", "pte", "--out", str(out)]) == 0
    trained = TrainedModel(run_v2)
    images = trained.held_out().images[:1]
    logits = run_pte(out, torch.from_numpy(images).float())
    assert np.abs(logits - trained.logits(images)).max() <= 1e-4
