"""device_runner on a format-2 bundle (one weight store, per-block programs): a stage at every
block boundary, runs that freeze where the host plan says without torch, exact resume at a
freeze, cached features equal to recomputed ones, prune-and-grow, and backend choice.

Uses the session's ``bundle_v2_dir`` (conftest.py: resnet32 at width 0.25, 16x16, 17 blocks).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_device_runner import run_cli, torch_blocker  # noqa: F401  (a fixture)

from device_runner.bundle import load_bundle
from device_runner.errors import BundleError

EPOCHS = 3


def config(bundle, out, **overrides):
    from device_runner.run_config import RunConfig

    base = dict(bundle=str(bundle), profile="generic-x86", data="digits", out=str(out), epochs=EPOCHS,
                max_per_class=20, lr=0.05, seed=0, threads=2, batch_size=16)
    base.update(overrides)
    return RunConfig(**base)


def quiet(line):
    pass


def _copy_with(bundle_v2_dir: Path, folder: Path, edit) -> Path:
    """A copy of the bundle whose manifest ``edit(manifest)`` changed (files untouched)."""
    copy = folder / "bundle"
    shutil.copytree(bundle_v2_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _planned_starts(bundle_v2_dir: Path, epochs: int) -> list[list[int]]:
    """The host plan's freeze epochs on a device run of ``epochs`` epochs, by hand."""
    spfde = json.loads((bundle_v2_dir / "manifest.json").read_text())["spfde"]
    scale = epochs / spfde["epochs"]
    return [[0, 0]] + [[k, max(1, round(epoch * scale))]
                       for k, epoch in enumerate(spfde["freezing"]["freeze_epochs"], start=1)]


def test_every_block_boundary_is_a_stage(bundle_v2_dir):
    bundle = load_bundle(bundle_v2_dir)
    assert bundle.format_version == 2 and bundle.weights_path.is_file()
    n = bundle.num_blocks
    assert [s.k for s in bundle.stages] == list(range(n)) and len(bundle.blocks) == n
    for stage in bundle.stages:
        suffix = bundle.blocks[stage.k:]
        assert stage.feature_shape == bundle.blocks[stage.k].input_shape
        assert stage.parameters == tuple(p for b in suffix for p in b.parameters)
        assert stage.masks == tuple((f"{w}_mask", w) for b in suffix for w in b.masks)
        assert "onnxruntime" in stage.backends
        assert stage.prefix_onnx is stage.training_model is stage.step_model is None
    assert all(b.infer.is_file() and b.backward_first.is_file() for b in bundle.blocks)


def test_every_program_must_be_in_the_file_table(bundle_v2_dir, tmp_path):
    rel = json.loads((bundle_v2_dir / "manifest.json").read_text())["blocks"][3]["backward_first"]
    copy = _copy_with(bundle_v2_dir, tmp_path, lambda m: m["files"].pop(rel))
    # (blocks of one structure share programs: the first block naming the file is reported)
    with pytest.raises(BundleError, match=rf"block \d+ names {re.escape(rel)}, which the manifest's file table"):
        load_bundle(copy)
    store = copy / "weights.safetensors"
    data = bytearray(store.read_bytes())
    data[-1] ^= 0xFF
    store.write_bytes(bytes(data))
    copy = _copy_with(copy, tmp_path / "again", lambda m: None)
    shutil.copy(bundle_v2_dir / "manifest.json", copy / "manifest.json")
    with pytest.raises(BundleError, match="weights.safetensors does not match its sha256"):
        load_bundle(copy)


def test_run_freezes_at_the_planned_boundaries_without_torch(bundle_v2_dir, torch_blocker, tmp_path):  # noqa: F811
    log, out = tmp_path / "imports.log", tmp_path / "run"
    result = run_cli(["--bundle", str(bundle_v2_dir), "--profile", "generic-x86", "--data", "digits",
                      "--max-per-class", "20", "--epochs", str(EPOCHS), "--out", str(out)], torch_blocker, log)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not log.exists(), f"device_runner tried to import {log.read_text()}"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    starts = _planned_starts(bundle_v2_dir, EPOCHS)
    assert report["schedule"]["stage_starts"] == starts
    # Each epoch trains the last stage due by then: the plan froze several blocks at once.
    due = [max(k for k, start in starts if start <= epoch) for epoch in range(EPOCHS)]
    assert [s["stage"] for s in report["stages"]] == sorted(set(due)) and len(set(due)) > 2
    assert [e["message"].split(":")[0] for e in report["events"] if e["kind"] == "stage"] == \
        [f"stage {k - 1} -> {k}" for k, _ in starts[1:] if k <= due[-1]]
    assert "block chain" in report["backends"]["suffix"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if line["type"] == "epoch"]
    assert [e["stage"] for e in epochs] == due
    assert all(e["masked_nonzero"] == 0 for e in epochs)
    exported = run_cli(["export-model", str(out), "--out", str(tmp_path / "model.onnx")], torch_blocker, log)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "parity with the run's model" in exported.stdout


def test_the_device_chooses_its_own_boundaries(bundle_v2_dir, tmp_path):
    """--stages picks boundaries the host plan never reaches (here past its last frozen block),
    --freeze-at their epochs; boundaries outside 0..head are refused before anything is written."""
    from device_runner.loop import start

    n = load_bundle(bundle_v2_dir).num_blocks
    planned = [k for k, _ in _planned_starts(bundle_v2_dir, EPOCHS)]
    chosen = (planned[-1] + 1, n - 1)
    report = start(config(bundle_v2_dir, tmp_path / "run", stages=chosen, freeze_at=(2,)), log=quiet).run()
    assert [list(s) for s in report["schedule"]["stage_starts"]] == [[chosen[0], 0], [chosen[1], 2]]
    assert [s["stage"] for s in report["stages"]] == list(chosen)
    for bad in ((3, n), (5, 4)):
        with pytest.raises(BundleError, match=rf"block boundaries 0\.\.{n - 1}"):
            start(config(bundle_v2_dir, tmp_path / f"bad{bad[0]}", stages=bad, freeze_at=(1,)), log=quiet)
        assert not (tmp_path / f"bad{bad[0]}" / "checkpoint.json").exists()


def test_an_executorch_prefix_is_refused_for_format_2(bundle_v2_dir, tmp_path):
    profile = tmp_path / "et.yaml"
    text = (Path(__file__).resolve().parents[1] / "profiles" / "generic-x86.yaml").read_text()
    profile.write_text(text.replace("prefix_backend: auto", "prefix_backend: executorch"))
    result = run_cli(["--bundle", str(bundle_v2_dir), "--profile", str(profile), "--data", "digits",
                      "--max-per-class", "20", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no .pte" in lines[0]


def test_resume_at_a_freeze_is_exact(bundle_v2_dir, tmp_path):
    """A run stopped right after a stage change and resumed ends with the uninterrupted run's
    weights, bit for bit: the frozen blocks' device-trained weights come back from the checkpoint."""
    from device_runner.loop import resume, start

    start(config(bundle_v2_dir, tmp_path / "whole"), log=quiet).run()
    runner = start(config(bundle_v2_dir, tmp_path / "cut"), log=quiet)

    def stop_after_freezing(line):
        if "stage 2 -> 3" in line:
            runner.stop.signal = 15

    runner.log = stop_after_freezing
    assert runner.run()["status"] == "stopped: interrupted"
    resumed = resume(tmp_path / "cut", log=quiet)
    assert resumed.stage_k >= 3 and {n.split(".")[1] for n in resumed.frozen_params} >= {"0", "1", "2"}
    assert resumed.run()["status"] == "finished"
    whole, cut = _final_state(tmp_path / "whole"), _final_state(tmp_path / "cut")
    assert sorted(whole) == sorted(cut)
    for name in whole:
        np.testing.assert_array_equal(cut[name], whole[name], err_msg=name)


def _final_state(out: Path) -> dict[str, np.ndarray]:
    folder = out / json.loads((out / "checkpoint.json").read_text())["folder"]
    arrays = {}
    for file in ("suffix_state.npz", "state.npz"):
        with np.load(folder / file) as data:
            arrays.update({k: data[k] for k in data.files if not k.startswith(("sieve/", "order"))})
    return arrays


def test_cached_features_are_the_recomputed_ones_after_a_freeze(bundle_v2_dir, tmp_path):
    """Starting at k=2 (blocks 0-1 frozen on the host), the cache fills; after the next freeze
    it is carried through the newly frozen block and equals the prefix chain's rounded output."""
    from device_runner.data import normalize
    from device_runner.loop import start

    copy = _copy_with(bundle_v2_dir, tmp_path, lambda m: m["source"].update(num_frozen=2))
    runner = start(config(copy, tmp_path / "run", cache="memory", cache_dtype="float16"), log=quiet)
    assert runner.stage_k == 2 and runner.cache.enabled
    runner.order = runner.train_idx[runner.rng.permutation(runner.sieve.active_indices)]
    runner._train_epoch(None)
    runner._enter_stage(1)
    assert runner.stage_k == 3
    idx = runner.order[:16]
    features, hits, *_ = runner.pipeline.features(idx)
    assert hits == idx.size
    x = normalize(runner.data.images[idx], runner.bundle.mean, runner.bundle.std)
    np.testing.assert_array_equal(features, runner.prefix.forward(x))


def test_a_stage_change_creates_at_most_one_session(bundle_v2_dir, tmp_path, monkeypatch):
    """Freezing a block costs no export and no bridge: of the bundle's program files only the
    new first block's backward_first (if no block of its structure had one) is loaded; the
    newly frozen blocks get constant-weight sessions, float32 and (when chosen) int8."""
    from device_runner.backends import block_chain
    from device_runner.loop import start

    runner = start(config(bundle_v2_dir, tmp_path / "run"), log=quiet)
    features, *_ = runner.pipeline.features(runner.train_idx[:8])
    runner.trainer.train_step(features, runner.data.labels[runner.train_idx[:8]])
    files, in_memory = [], []
    original = block_chain.onnxruntime.InferenceSession

    def counting(model, *a, **k):
        if isinstance(model, bytes):
            in_memory.append(1)
        elif Path(model).resolve().is_relative_to(Path(runner.bundle.root).resolve()):
            files.append(Path(model).name)     # (the int8 calibration runs from a temporary file)
        return original(model, *a, **k)

    monkeypatch.setattr(block_chain.onnxruntime, "InferenceSession", counting)
    for position in range(1, len(runner.starts)):
        files.clear()
        in_memory.clear()
        old_k = runner.stage_k
        runner._enter_stage(position)
        idx = runner.train_idx[:8]
        features, *_ = runner.pipeline.features(idx)
        runner.trainer.train_step(features, runner.data.labels[idx])
        runner.trainer.eval_step(features, runner.data.labels[idx])
        assert files in ([], ["backward_first.onnx"]), (runner.stage_k, files)
        frozen = runner.stage_k - old_k
        precision = runner.pipeline.precisions[-1]["precision"]
        # float32 sessions, int8 ones, and the quantizer's own (BatchNorm folding, calibration)
        assert len(in_memory) >= frozen * (2 if precision == "int8" else 1), (runner.stage_k, len(in_memory))


def test_dense_gradients_and_rigl_keep_masked_weights_zero(bundle_v2_dir, tmp_path):
    from device_runner import dst
    from device_runner.loop import start

    copy = _copy_with(bundle_v2_dir, tmp_path, lambda m: m["spfde"]["dst"].update(algorithm="rigl"))
    runner = start(config(copy, tmp_path / "run", delta_tau=1), log=quiet)
    trainer = runner.trainer
    before = {n: trainer.get_parameter(n) for n in trainer.parameter_names()}
    idx = runner.train_idx[:16]
    features, *_ = runner.pipeline.features(idx)
    dense = dst.dense_gradients(trainer, features, runner.data.labels[idx])
    for name in trainer.parameter_names():
        np.testing.assert_array_equal(trainer.get_parameter(name), before[name], err_msg=name)
    trainer.train_step(features, runner.data.labels[idx])
    for mask_name, weight in trainer.stage.masks:
        active = before[mask_name] > 0
        assert np.count_nonzero(dense[weight][~active]) >= 0.5 * (~active).sum(), weight
        np.testing.assert_allclose(dense[weight][active], trainer.gradient(weight)[active], rtol=1e-5, atol=1e-7)
        assert not np.any(trainer.gradient(weight)[~active])
    report = runner.run()
    assert report["status"] == "finished" and report["schedule"]["dst"] == "rigl"
    assert all(h["mask_update"] and h["regrown"] > 0 and h["masked_nonzero"] == 0 for h in report["history"][1:])


def test_both_suffix_backends_train_format_2_alike(bundle_v2_dir, tmp_path):
    """The same run on the ORT training build (each boundary's artifacts, checkpoint written from
    the weight store) and on the block chain: same freezing, same numbers to float rounding."""
    pytest.importorskip("onnxruntime.training")
    reports = {}
    for backend in ("onnxruntime-training", "onnxruntime"):
        out = tmp_path / backend
        result = run_cli(["--bundle", str(bundle_v2_dir), "--profile", "generic-x86", "--data", "digits",
                          "--max-per-class", "20", "--epochs", str(EPOCHS), "--suffix-backend", backend,
                          "--out", str(out)])
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        reports[backend] = ([line for line in lines if line["type"] == "epoch"],
                            json.loads((out / "report.json").read_text()))
    (ort_epochs, ort_report), (chain_epochs, chain_report) = reports["onnxruntime-training"], reports["onnxruntime"]
    assert "format 2" in ort_report["backends"]["suffix"]
    assert ort_report["schedule"]["stage_starts"] == chain_report["schedule"]["stage_starts"]
    assert [e["stage"] for e in ort_epochs] == [e["stage"] for e in chain_epochs]
    assert all(e["masked_nonzero"] == 0 for e in ort_epochs)
    for ort, chain in zip(ort_epochs, chain_epochs):
        assert abs(ort["val_loss"] - chain["val_loss"]) <= 1e-3 * abs(chain["val_loss"]), (ort, chain)


def test_backend_choice_for_format_2(bundle_v2_dir):
    from device_runner.backends import choose_suffix_backend
    from device_runner.backends.block_chain import BlockChainTrainer

    bundle = load_bundle(bundle_v2_dir)
    assert choose_suffix_backend("auto", bundle, [0, 3])[0] is BlockChainTrainer
    assert choose_suffix_backend("onnxruntime", bundle, [0, 3])[0] is BlockChainTrainer
    without = dataclasses.replace(bundle, stages=tuple(dataclasses.replace(s, backends=("onnxruntime",))
                                                       for s in bundle.stages))
    assert choose_suffix_backend("auto", without, [0])[0] is BlockChainTrainer
    with pytest.raises(BundleError, match=r"no ORT training artifacts for stage\(s\) \[0, 3\]"):
        choose_suffix_backend("onnxruntime-training", without, [0, 3])
    with pytest.raises(BundleError, match="unknown suffix_backend 'tensorflow'"):
        choose_suffix_backend("tensorflow", bundle, [0])
    from device_runner.backends import training_build_present
    if training_build_present():
        make, why = choose_suffix_backend("onnxruntime-training", bundle, [0, 3], threads=1)
        assert "format 2" in why and make.name == "onnxruntime-training (format 2)"
