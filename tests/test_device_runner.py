"""device_runner on a small real bundle: torch-free runs, budgets, stages, DST, resume, errors.

One session-scoped bundle (resnet32 at width 0.25, 16x16 input, stages 14-16) is exported
with the exporter's Python API. Its ExecuTorch lowering is replaced by a stub file: it takes
40-90 s per stage on two cores and the runner uses ONNX Runtime for the prefix here anyway
(profile ``prefix_backend: auto`` without a torch-free ExecuTorch). Everything else in the
bundle, the manifest and its sha256 table, is the exporter's real output.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
STAGES = (14, 15, 16)


# bundle_dir (the session's small exported bundle) is in conftest.py, shared with test_trust.py.


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """10 classes x 12 learnable 16x16 PNGs (a bright quadrant/stripe per class) + 1 corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(10):
        folder = root / str(label)
        folder.mkdir()
        for i in range(12):
            image = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
            image[(label % 4) * 4:(label % 4) * 4 + 4, :, label % 3] = 250
            image[:, (label // 4) * 5:(label // 4) * 5 + 3, :] = 200
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


@pytest.fixture(scope="session")
def torch_blocker(tmp_path_factory) -> Path:
    """A folder that makes ``import torch``/``torchvision``/``sklearn``/``spfde_edge`` fail, logging each try."""
    folder = tmp_path_factory.mktemp("blocker")
    body = ("import os\n"
            "with open(os.environ['IMPORT_LOG'], 'a') as log:\n"
            "    log.write(__name__ + '\\n')\n"
            "raise ImportError(__name__ + ' is blocked in this test')\n")
    (folder / "torch.py").write_text(body)
    (folder / "torchvision.py").write_text(body)
    (folder / "sklearn.py").write_text(body)  # --data digits ships with the package
    (folder / "spfde_edge").mkdir()
    (folder / "spfde_edge" / "__init__.py").write_text(body)
    return folder


def run_cli(args: list[str], blocker: Path | None = None, log: Path | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    path = [str(REPO)] if blocker is None else [str(blocker), str(REPO)]
    if args and args[0] != "report" and "--resume" not in args:
        args = [*args, "--threads", "2"]
    env["PYTHONPATH"] = os.pathsep.join(path)
    if log is not None:
        env["IMPORT_LOG"] = str(log)
    return subprocess.run([sys.executable, "-m", "device_runner", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def config(bundle_dir, out, **overrides):
    from device_runner.run_config import RunConfig

    base = dict(bundle=str(bundle_dir), profile="generic-x86", data="digits", out=str(out), epochs=3,
                max_per_class=20, freeze_at=(1, 2), lr=0.05, seed=0, threads=2)
    base.update(overrides)
    return RunConfig(**base)


def quiet(line):
    pass


# --- torch-free, end to end ------------------------------------------------------------------

def test_runs_end_to_end_where_torch_cannot_be_imported(bundle_dir, image_dir, torch_blocker, tmp_path):
    log = tmp_path / "imports.log"
    out = tmp_path / "run"
    result = run_cli(["--bundle", str(bundle_dir), "--profile", "generic-x86",
                      "--data", f"imagefolder:{image_dir}", "--epochs", "3", "--freeze-at", "1,2",
                      "--out", str(out)], torch_blocker, log)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not log.exists(), f"device_runner tried to import {log.read_text()}"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    assert [s["stage"] for s in report["stages"]] == list(STAGES)
    assert report["backends"]["prefix"].startswith("onnxruntime")
    assert "onnxruntime-training" in report["backends"]["suffix"]
    assert report["data"]["skipped_unreadable"] == 1
    assert report["data"]["skipped_examples"] == ["3/broken.png"]
    for stage in report["stages"]:
        assert stage["latency_ms"]["train"]["p50"] > 0 and stage["peak_rss_mb"] > 0
        assert stage["energy_per_sample_mj"] > 0 and stage["samples_per_s"] > 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines if l["type"] == "epoch"] == [1, 2, 3]
    assert "per-stage latency" in result.stdout
    html = run_cli(["report", str(out), "--html"])
    assert html.returncode == 0, html.stderr
    assert "data:image/png;base64" in (out / "report.html").read_text()


# --- SpFDE on the device ----------------------------------------------------------------------

def test_stage_transition_keeps_weights_and_function(bundle_dir, tmp_path):
    from device_runner.loop import start

    runner = start(config(bundle_dir, tmp_path / "run", epochs=2, freeze_at=(1, 2)), log=quiet)
    runner.order = runner.train_idx[runner.rng.permutation(runner.sieve.active_indices)]
    runner._train_epoch(None)
    before_params = {n: runner.trainer.get_parameter(n) for n in runner.trainer.parameter_names()}
    before_eval = runner.evaluate()
    old_logits = runner.trainer.eval_step(*_val_batch(runner))[1]
    runner._enter_stage(1)
    assert runner.stage_k == 15
    for name in runner.trainer.parameter_names():
        np.testing.assert_array_equal(runner.trainer.get_parameter(name), before_params[name])
    for name, value in runner.frozen_params.items():
        np.testing.assert_array_equal(value, before_params[name])
        assert name.startswith("blocks.14.")
    assert runner.trainer.momentum_buffers and all(n.startswith(("blocks.15.", "blocks.16."))
                                                    for n in runner.trainer.momentum_buffers)
    # The model as a whole computes the same function: the newly frozen block runs with the
    # device-trained weights (bridge), not the bundle's host weights.
    new_logits = runner.trainer.eval_step(*_val_batch(runner))[1]
    np.testing.assert_allclose(new_logits, old_logits, atol=1e-4)
    assert runner.evaluate()["val_acc"] == pytest.approx(before_eval["val_acc"])
    host = runner.bundle.stage(15)
    from device_runner.backends.ort_prefix import OrtPrefix
    from device_runner.data import normalize
    x = normalize(runner.data.images[runner.val_idx[:8]], runner.bundle.mean, runner.bundle.std)
    host_features = OrtPrefix(host.prefix_onnx, 1).forward(x)
    assert np.abs(runner.prefix.forward(x) - host_features).max() > 1e-4, \
        "after training, block 14's features must differ from the host's prefix"


def _val_batch(runner):
    idx = runner.val_idx[:16]
    features, *_ = runner._features(idx)
    return features, runner.data.labels[idx]


def _bundle_with_algorithm(bundle_dir, folder, algorithm):
    """A copy of the test bundle whose plan names another DST algorithm (manifest edit only)."""
    copy = folder / f"bundle-{algorithm}"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["spfde"]["dst"]["algorithm"] = algorithm
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("algorithm", ["mest", "rigl", "set"])
def test_prune_and_grow_runs_the_bundles_algorithm_with_exact_sparsity(algorithm, bundle_dir, tmp_path):
    """Update epochs 1 and 2 (Δτ 1) change masks the way the algorithm says; every layer ends
    each epoch at its exact target count, and the report names the algorithm really used."""
    from device_runner import dst
    from device_runner.loop import start

    source = bundle_dir if algorithm == "mest" else _bundle_with_algorithm(bundle_dir, tmp_path, algorithm)
    runner = start(config(source, tmp_path / "run", epochs=3, freeze_at=(5, 6), delta_tau=1), log=quiet)
    masks = {m: runner.trainer.get_parameter(m) for m, _ in runner.trainer.stage.masks}
    report = runner.run()
    assert report["status"] == "finished" and report["schedule"]["dst"] == algorithm
    history = report["history"]
    assert [h["mask_update"] for h in history] == [False, True, True]
    for record in history[1:]:
        assert record["dst"] == algorithm and record["regrown"] > 0
        # MEST grows at the start and prunes as many back at the end; SET/RigL swap at the start.
        assert record["pruned"] == (record["regrown"] if algorithm == "mest" else 0)
    changed = 0
    for mask_name, weight_name in runner.trainer.stage.masks:
        mask = runner.trainer.get_parameter(mask_name)
        assert mask.sum() == masks[mask_name].sum(), f"{mask_name} changed its active count"
        assert np.count_nonzero(runner.trainer.get_parameter(weight_name)[mask == 0]) == 0
        changed += int((mask != masks[mask_name]).sum())
    assert changed > 0
    assert dst.sparsity_report(runner.trainer)["masked_nonzero"] == 0


def test_unknown_algorithm_in_the_bundle_is_refused(bundle_dir, tmp_path):
    from device_runner.errors import BundleError
    from device_runner.loop import start

    with pytest.raises(BundleError, match="unknown DST algorithm 'grasp'"):
        start(config(_bundle_with_algorithm(bundle_dir, tmp_path, "grasp"), tmp_path / "run"), log=quiet)


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-training"])
def test_dense_gradients_open_every_mask_and_leave_no_trace(backend, bundle_dir, tmp_path):
    """RigL's growth signal: the gradient of weight * mask at inactive positions too; equal to
    the ordinary gradient where active; masks and BatchNorm statistics restored."""
    from device_runner import dst
    from device_runner.loop import start

    runner = start(config(bundle_dir, tmp_path / "run", epochs=1, suffix_backend=backend), log=quiet)
    trainer = runner.trainer
    before = {n: trainer.get_parameter(n) for n in trainer.parameter_names()}
    features, labels = _val_batch(runner)
    dense = dst.dense_gradients(trainer, features, labels)
    for name in trainer.parameter_names():
        np.testing.assert_array_equal(trainer.get_parameter(name), before[name], err_msg=name)
    trainer.train_step(features, labels)
    for mask_name, weight_name in trainer.stage.masks:
        active = before[mask_name] > 0.5
        assert np.count_nonzero(dense[weight_name][~active]) > 0.5 * (~active).sum(), weight_name
        np.testing.assert_allclose(dense[weight_name][active], trainer.gradient(weight_name)[active],
                                   rtol=1e-4, atol=1e-6, err_msg=weight_name)


def test_feature_cache_serves_later_epochs(bundle_dir, tmp_path):
    from device_runner.loop import start

    runner = start(config(bundle_dir, tmp_path / "run", epochs=2, freeze_at=(5, 6)), log=quiet)
    report = runner.run()
    stage = report["stages"][0]
    assert stage["cache"]["hit_samples"] > 0
    assert report["cache"]["location"] == "memory"
    assert report["cache"]["dtype"] == "float16" and report["cache"]["samples_cached"] > 0
    idx = runner.train_idx[:5]
    from device_runner.data import normalize
    direct = runner.prefix.forward(normalize(runner.data.images[idx], runner.bundle.mean, runner.bundle.std),
                                   rounded=False)
    # float16 storage: relative error at most 2^-11 (docs/device.md, Feature cache).
    np.testing.assert_allclose(runner.cache.get(idx), direct, rtol=2**-11, atol=2**-24)
    none = start(config(bundle_dir, tmp_path / "nocache", epochs=1, freeze_at=(5, 6), cache="none"), log=quiet)
    assert none.run()["stages"][0]["cache"]["hit_samples"] == 0


def test_nan_loss_rolls_back_and_lowers_lr(bundle_dir, tmp_path, monkeypatch):
    from device_runner.backends.ort_training import SuffixTrainer
    from device_runner.loop import start

    runner = start(config(bundle_dir, tmp_path / "run", epochs=2, freeze_at=(5, 6)), log=quiet)
    real = SuffixTrainer.train_step
    calls = {"n": 0}

    def flaky(self, features, labels):
        calls["n"] += 1
        loss, logits = real(self, features, labels)
        return (float("nan"), logits) if calls["n"] == 3 else (loss, logits)

    monkeypatch.setattr(SuffixTrainer, "train_step", flaky)
    report = runner.run()
    assert report["status"] == "finished"
    assert [e["kind"] for e in report["events"]].count("nan") == 1
    assert report["schedule"]["lr_scale"] == 0.5
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    # Nothing skipped: every epoch trained its whole active set after the rollback.
    active = runner.sieve.active_indices.size
    assert report["stages"][0]["samples"] == 2 * active


# --- budgets ----------------------------------------------------------------------------------

def test_memory_budget_picks_smaller_batch_and_is_respected(bundle_dir, tmp_path, monkeypatch):
    """The tiny test model needs ~10 KB per sample, below RSS noise; the planner is fed
    measurements with 2 MB per sample on top of the real RSS, the run is then real."""
    from device_runner import budget
    from device_runner.loop import Runner, start

    monkeypatch.setattr(Runner, "measure_peak", lambda self, batch, steps=1: budget.rss_mb() + 2.0 * batch)
    budget_mb = (budget.rss_mb() + 2.0 * 16 + 10) / 0.9
    runner = start(config(bundle_dir, tmp_path / "tight", epochs=1, freeze_at=(5, 6),
                          memory_budget_mb=budget_mb), log=quiet)
    assert runner.batch_size == 16
    report = runner.run()
    assert report["status"] == "finished"
    assert report["peak_rss_mb"] <= budget_mb
    assert not [e for e in report["events"] if e["kind"] == "budget_exceeded"]


def test_memory_pressure_drops_cache_then_halves_batch(bundle_dir, tmp_path, monkeypatch):
    from device_runner import budget
    from device_runner.loop import start

    runner = start(config(bundle_dir, tmp_path / "run", epochs=1, freeze_at=(5, 6), batch_size=8,
                          memory_budget_mb=4000), log=quiet)
    assert runner.cache.enabled
    monkeypatch.setattr(budget, "peak_rss_mb", lambda: 0.97 * 4000)
    report = runner.run()
    messages = [e["message"] for e in report["events"] if e["kind"] == "memory"]
    assert "feature cache dropped" in messages[0]
    assert "batch halved to 4" in messages[1] and "batch halved to 2" in messages[2]
    assert report["stages"][0]["batch_sizes"][:3] == [1, 2, 4] or min(report["stages"][0]["batch_sizes"]) == 1
    assert not runner.cache.enabled


def test_plan_batch_arithmetic():
    from device_runner.budget import plan_batch
    from device_runner.errors import BudgetError

    plan = plan_batch({2: 104.0, 8: 116.0}, budget_mb=200.0, headroom=0.1, max_batch=128)
    # base 100 MB + 2 MB/sample; usable 180 MB -> 40 samples -> largest power of two 32.
    assert (plan.base_mb, plan.per_sample_mb, plan.batch_size) == (100.0, 2.0, 32)
    assert plan_batch({2: 104.0, 8: 116.0}, 200.0, 0.1, 16).batch_size == 16
    assert plan_batch({2: 104.0, 8: 116.0}, 200.0, 0.1, 128, extra_mb=60).batch_size == 8
    with pytest.raises(BudgetError, match="batch 1 needs about 102 MB"):
        plan_batch({2: 104.0, 8: 116.0}, 110.0, 0.1, 128)


def test_digits_demo_needs_only_the_device_install(bundle_dir, torch_blocker, tmp_path):
    """README's device example reads ``--data digits``: shipped with the package, so it runs
    where torch, torchvision, scikit-learn and the host package cannot be imported."""
    log = tmp_path / "imports.log"
    result = run_cli(["--bundle", str(bundle_dir), "--profile", "generic-x86", "--data", "digits",
                      "--max-per-class", "10", "--epochs", "2", "--freeze-at", "1,1",
                      "--out", str(tmp_path / "run")], torch_blocker, log)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["source"].startswith("digits (shipped") and report["data"]["samples"] == 100


def test_memory_budget_too_small_is_a_clear_error(bundle_dir, tmp_path):
    result = run_cli(["--bundle", str(bundle_dir), "--profile", "generic-x86", "--data", "digits",
                      "--memory-budget-mb", "20", "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a training step with batch 1 needs about")
    assert "raise budgets.memory_mb" in lines[0]


def test_energy_budget_checkpoints_and_stops(bundle_dir, tmp_path):
    from dataclasses import replace

    from device_runner.errors import BudgetError
    from device_runner.loop import resume, start
    from device_runner.profile import load_profile

    out = tmp_path / "run"
    runner = start(config(bundle_dir, out, epochs=5, batch_size=2), log=quiet)
    # Budget: what planning used so far plus about 0.1 s at the 15-65 W of the power model,
    # far less than 5 epochs take even on a fast, idle machine (>= 0.15 s each at >= 15 W).
    budget_j = runner.meter.update(force=True) + 3.0
    runner.config = replace(runner.config, energy_budget_j=budget_j)
    runner.profile = load_profile(runner.config.profile, runner.config.profile_overrides())
    report = runner.run()
    assert report["status"] == "stopped: energy budget reached"
    # It stops before a step predicted (from the last one) to cross the budget; a step that
    # costs more than its predecessor, plus the final checkpoint, can still go a little over.
    assert budget_j - 3.0 < report["energy"]["joules"] < budget_j + 10.0
    assert not report["energy"]["measured"] and "estimate" in report["energy"]["source"]
    assert report["epochs_done"] < 5
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == report["epochs_done"]
    with pytest.raises(BudgetError, match="raise budgets.energy_j"):
        resume(out, log=quiet)
    finished = resume(out, log=quiet, energy_budget_j=1e9).run()
    assert finished["status"] == "finished"
    assert [h["epoch"] for h in finished["history"]] == [1, 2, 3, 4, 5]


def test_dry_run_plans_without_training(bundle_dir, tmp_path):
    result = run_cli(["--bundle", str(bundle_dir), "--profile", "raspberry-pi-4", "--dry-run", "--json"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)  # with --json stdout is the JSON alone; the plan text goes to stderr
    assert plan["batch_size"] >= 1 and plan["predicted_peak_mb"] < plan["memory_budget_mb"]
    assert [k for k, _ in plan["stages"]] == list(STAGES)
    assert "predicted peak RSS" in result.stderr


# --- reliability ------------------------------------------------------------------------------

def _copy_bundle(bundle_dir, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"),
    ("delete", "is missing"),
    ("version", "bundle format version 99"),
    ("no_manifest", "is not a bundle"),
    ("schema", "schema at spfde.momentum: 'fast' is not of type 'number'; re-export"),
])
def test_damaged_bundle_is_refused(bundle_dir, tmp_path, damage, message):
    copy = _copy_bundle(bundle_dir, tmp_path)
    if damage == "flip":
        target = copy / "stage_15" / "training_model.onnx"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        (copy / "stage_16" / "checkpoint").unlink()
    elif damage == "version":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["format_version"] = 99
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "schema":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["spfde"]["momentum"] = "fast"
        (copy / "manifest.json").write_text(json.dumps(manifest))
    else:
        (copy / "manifest.json").unlink()
    out = tmp_path / "run"
    result = run_cli(["--bundle", str(copy), "--profile", "generic-x86", "--data", "digits", "--out", str(out)])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_bad_profile_and_data_are_clear_errors(bundle_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nboard: {cpu: c, cores: 0, ram_mb: 512, arch: aarch64}\n"
                   "power: {idle_w: 1, busy_w: 2}\nbudgets: {memory_mb: 100, speed: 3}\n")
    result = run_cli(["--bundle", str(bundle_dir), "--profile", str(bad), "--data", "digits"])
    assert result.returncode == 2
    assert "board.cores: 0 is below the minimum 1" in result.stderr
    assert "budgets.speed: unknown field" in result.stderr
    missing = run_cli(["--bundle", str(bundle_dir), "--profile", "generic-x86",
                       "--data", f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "r")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_resume_after_kill_loses_and_repeats_no_epoch(bundle_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "device_runner", "--bundle", str(bundle_dir), "--profile", "generic-x86",
            "--data", "digits", "--max-per-class", "30", "--epochs", "3", "--freeze-at", "1,2",
            "--batch-size", "2", "--checkpoint-every", "1", "--threads", "2", "--out", str(out)]
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = out / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            state = json.loads(pointer.read_text())
        except (OSError, ValueError):
            state = {"epoch": 0, "position": 0}
        if state["epoch"] >= 1 and state["position"] > 10:
            break
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = json.loads(pointer.read_text())
    assert state["epoch"] >= 1
    resumed = subprocess.run([sys.executable, "-m", "device_runner", "--resume", str(out)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at epoch {state['epoch'] + 1}, sample {state['position']}" in resumed.stdout
    epochs = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["type"] == "epoch"]
    assert epochs == [1, 2, 3]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    assert sum(s["samples"] for s in report["stages"]) >= 3 * int(report["data"]["train"] * 0.8) - 3


# --- the standard-ONNX step graph backend (issue 6) --------------------------------------------

def _final_state(out: Path) -> dict[str, np.ndarray]:
    folder = out / json.loads((out / "checkpoint.json").read_text())["folder"]
    with np.load(folder / "suffix_state.npz") as data:
        return {k: data[k] for k in data.files}


def test_step_graph_backend_trains_like_ort_training(bundle_dir, tmp_path):
    """The same run on both suffix backends: same losses, masks and weights (SpFDE stages included)."""
    from device_runner.loop import start

    runs = {}
    for backend in ("onnxruntime-training", "onnxruntime"):
        runner = start(config(bundle_dir, tmp_path / backend, epochs=3, suffix_backend=backend), log=quiet)
        runner.run()
        assert runner.trainer.name == backend
        lines = [json.loads(l) for l in (runner.out / "metrics.jsonl").read_text().splitlines()]
        runs[backend] = ([l for l in lines if l["type"] == "epoch"], _final_state(runner.out))
    (ort_epochs, ort_state), (step_epochs, step_state) = runs.values()
    assert [e["epoch"] for e in step_epochs] == [1, 2, 3]
    for a, b in zip(step_epochs, ort_epochs):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["sparsity"] == b["sparsity"] and a["stage"] == b["stage"]
    assert step_state.keys() == ort_state.keys()
    moved = 0.0
    for name, value in step_state.items():
        if name.endswith("_mask"):
            np.testing.assert_array_equal(value, ort_state[name])
        else:
            scale = max(float(np.abs(ort_state[name]).max()), 1e-6)
            assert float(np.abs(value - ort_state[name]).max()) / scale < 1e-3, name
    host = dict(np.load(runner.bundle.stage(16).step_state))
    moved = max(float(np.abs(step_state[n] - host[n]).max()) for n in host if not n.endswith("_mask"))
    assert moved > 1e-3, "the compared runs must have trained"


def test_auto_picks_the_step_graph_where_onnxruntime_has_no_training(bundle_dir, tmp_path, monkeypatch):
    import device_runner.backends as backends
    from device_runner.errors import BundleError
    from device_runner.loop import start

    monkeypatch.setattr(backends, "training_build_present", lambda: False)
    runner = start(config(bundle_dir, tmp_path / "auto", epochs=1, freeze_at=None), log=quiet)
    assert runner.trainer.name == "onnxruntime" and "no training build" in runner.suffix_choice
    with pytest.raises(BundleError, match="needs onnxruntime-training-cpu"):
        start(config(bundle_dir, tmp_path / "forced", suffix_backend="onnxruntime-training"), log=quiet)


def test_bundle_without_step_graph_is_a_clear_error_for_that_backend(bundle_dir, tmp_path):
    root = _copy_bundle(bundle_dir, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    for stage in manifest["stages"]:
        stage["suffix"]["backends"] = ["onnxruntime-training"]
        stage["suffix"]["step_graph"] = None
    (root / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(["--bundle", str(root), "--profile", "generic-x86", "--data", "digits",
                      "--suffix-backend", "onnxruntime", "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "step.onnx" in result.stderr and "re-export" in result.stderr


def test_step_graph_backend_runs_where_torch_cannot_be_imported(bundle_dir, image_dir, torch_blocker, tmp_path):
    log = tmp_path / "imports.log"
    out = tmp_path / "run"
    result = run_cli(["--bundle", str(bundle_dir), "--profile", "generic-x86", "--data", f"imagefolder:{image_dir}",
                      "--epochs", "2", "--freeze-at", "1,2", "--suffix-backend", "onnxruntime",
                      "--out", str(out)], torch_blocker, log)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not log.exists(), f"device_runner tried to import {log.read_text()}"
    report = json.loads((out / "report.json").read_text())
    assert report["backends"]["suffix"].startswith("onnxruntime,")
    assert [s["stage"] for s in report["stages"]] == [14, 15]
