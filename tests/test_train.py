"""The trainer end to end on synthetic data: SpFDE invariants, outputs, exact resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spfde_edge.checkpoint import load_checkpoint
from spfde_edge.config import TrainConfig
from spfde_edge.train import main
from spfde_edge.trainer import resume, start

ROOT = Path(__file__).resolve().parents[1]

SPFDE = TrainConfig(model="resnet32", width=0.25, dataset="synthetic", synthetic_size=160, input_size=16,
                    epochs=6, batch_size=32, lr=0.05, delta_tau=1, sparsity=0.8, dst="mest",
                    freeze_flops=0.1, sieve=0.25, seed=3, threads=1)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def spfde_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spfde")
    trainer = start(SPFDE, out)
    summary = trainer.run()
    return out, trainer, summary


def test_outputs_have_one_metrics_line_per_epoch(spfde_run):
    out, _, summary = spfde_run
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, SPFDE.epochs + 1))
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == SPFDE.epochs
    for key in ("val_acc", "loss", "lr", "sparsity", "frozen_blocks", "samples", "train_flops_total", "wall_s"):
        assert key in records[0]
    assert summary["reduction_vs_dense"] > summary["reduction_vs_sparse"] > 0


def test_sparsity_exact_and_first_conv_dense(spfde_run):
    _, trainer, _ = spfde_run
    trainer.masks.check(trainer.model)
    first_conv = trainer.model.blocks[0][0].weight
    assert bool((first_conv != 0).all())
    for record in read_metrics(spfde_run[0]):
        assert record["sparsity"] == pytest.approx(trainer.masks.sparsity(), abs=1e-9)


def test_freezing_progresses_front_to_back_and_frozen_blocks_leave_optimizer(spfde_run):
    out, trainer, summary = spfde_run
    frozen = [r["frozen_blocks"] for r in read_metrics(out)]
    assert frozen == sorted(frozen) and frozen[-1] >= 1
    trainable_blocks = {g["block"] for g in trainer.optimizer.param_groups}
    assert min(trainable_blocks) == trainer.model.num_frozen
    assert all(not p.requires_grad for b in trainer.model.blocks[: trainer.model.num_frozen]
               for p in b.parameters())
    # the FLOPs target of freezing is met within one percentage point
    assert abs(summary["freeze_reduction"] - SPFDE.freeze_flops) <= 0.01


def test_sieve_keeps_active_size_and_trains_on_active_set_only(spfde_run):
    out, trainer, _ = spfde_run
    n_train = len(trainer.data.train)
    active = n_train - round(SPFDE.sieve * n_train)
    assert all(r["samples"] == active for r in read_metrics(out))
    assert all(r["active_set"] == active for r in read_metrics(out))


def test_resume_is_bit_exact(tmp_path):
    config = SPFDE.replace(epochs=4, freeze_flops=0.0, dst="rigl")
    straight = start(config, tmp_path / "straight")
    straight.run()
    first = start(config, tmp_path / "split")
    first.run(stop_after=2)
    del first
    resumed = resume(tmp_path / "split")
    assert resumed.epoch == 2
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "split")[-1]["loss"] == read_metrics(tmp_path / "straight")[-1]["loss"]


def test_val_fraction_zero_trains_on_everything_and_reports_no_accuracy(tmp_path, capsys):
    """No validation split: every sample trains, and the outputs say null, never NaN."""
    config = SPFDE.replace(epochs=1, freeze_flops=0.0, sieve=0.0, val_fraction=0.0)
    trainer = start(config, tmp_path / "run")
    summary = trainer.run()
    assert len(trainer.data.train) == config.synthetic_size and len(trainer.data.val) == 0
    assert summary["val_acc"] is None and summary["best_val_acc"] is None
    text = (tmp_path / "run" / "metrics.jsonl").read_text() + (tmp_path / "run" / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text.splitlines()[0])["val_acc"] is None


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    cases = [
        ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "a")],
        ["--sparsity", "1.2", "--out", str(tmp_path / "b")],
        ["--sparsity", "0", "--out", str(tmp_path / "c")],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_cli_refuses_to_overwrite_and_to_resume_as_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "resnet32", "--width", "0.25", "--dataset", "synthetic", "--synthetic-size", "64",
            "--input-size", "16", "--epochs", "1", "--batch-size", "32", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--resume", str(out), "--model", "resnet18"]) == 2
    assert "model" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["--resume", str(tmp_path / "bad")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_and_resume_leaves_exactly_one_line_per_epoch(tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "spfde_edge.train", "--model", "resnet32", "--width", "0.25",
            "--dataset", "synthetic", "--synthetic-size", "256", "--input-size", "16", "--epochs", "6",
            "--batch-size", "32", "--sparsity", "0.8", "--dst", "set", "--delta-tau", "1",
            "--sieve", "0.2", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(out)["epoch"]
    assert 2 <= done < 6, "the kill must land mid-run"
    result = subprocess.run([sys.executable, "-m", "spfde_edge.train", "--resume", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_unreachable_freezing_target_warns_and_freezes_what_it_can(tmp_path, capsys):
    out = tmp_path / "short"
    argv = ["--model", "resnet32", "--width", "0.25", "--dataset", "synthetic", "--synthetic-size", "64",
            "--input-size", "16", "--epochs", "3", "--batch-size", "32", "--delta-tau", "1",
            "--freeze-flops", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "out of reach" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["freeze_plan"]["freeze_epochs"] == [1, 2]
    assert 0 < summary["freeze_reduction"] < 0.5
