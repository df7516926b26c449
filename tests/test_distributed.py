"""torchrun data parallel on CPU (gloo): lockstep masks and sieve, loss parity, resume on 1 process,
kill -9 of the whole job and resume on 2 processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from spfde_edge.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "resnet32", "--width", "0.25", "--dataset", "synthetic", "--synthetic-size", "200", "--val-fraction", "0.2",
        "--input-size", "16", "--epochs", "6", "--batch-size", "32", "--sparsity", "0.8", "--dst", "rigl",
        "--delta-tau", "1", "--freeze-flops", "0.1", "--sieve", "0.25", "--threads", "1",
        "--device", "cpu", "--no-augment", "--lr", "0.05"]


def torchrun_cmd(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "spfde_edge.train", *argv]


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc, argv)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(2, [*ARGS, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_masks_and_sieve_identical_on_both_ranks(two_rank_run):
    records = metrics(two_rank_run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        hashes = record["rank_state_hashes"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]
    # the masks really changed (RigL prune-and-grow ran) and freezing happened
    assert len({r["rank_state_hashes"][0] for r in records}) > 1
    assert records[-1]["frozen_blocks"] >= 1


@pytest.mark.slow
def test_loss_curve_matches_single_process(two_rank_run, tmp_path):
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "spfde_edge.train", *ARGS, "--out", str(single)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, one = metrics(two_rank_run), metrics(single)
    assert [r["samples"] for r in ddp] == [r["samples"] for r in one]
    assert [r["frozen_blocks"] for r in ddp] == [r["frozen_blocks"] for r in one]
    for a, b in zip(ddp, one):
        # BatchNorm statistics are per rank (16 samples) vs per batch (32): close, not equal
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_process(tmp_path):
    out = tmp_path / "run"
    result = torchrun(2, [*ARGS, "--out", str(out), "--stop-after", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    result = subprocess.run([sys.executable, "-m", "spfde_edge.train", "--resume", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "rank_state_hashes" in records[2] and "rank_state_hashes" not in records[3]


def kill_9_job(agent: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the torchrun agent and every worker. torchrun starts each worker in a session of
    its own, so killing the agent's process group alone leaves the workers training (and writing
    the run folder): kill every descendant's group too."""
    procs = [psutil.Process(agent.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    groups = set()
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)
    _, alive = psutil.wait_procs(procs, timeout=5)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_ddp_kill_9_and_resume_leaves_exactly_one_line_per_epoch(two_rank_run, tmp_path):
    """Issue 7 under torchrun: kill -9 the whole 2-process job mid-run, resume on 2 processes;
    metrics.jsonl ends with one line per epoch, in order, and the run equals an uninterrupted one."""
    out, epochs = tmp_path / "killed", 6
    log = tmp_path / "killed.log"
    with open(log, "wb") as log_handle:
        agent = subprocess.Popen(torchrun_cmd(2, [*ARGS, "--out", str(out)]), cwd=ROOT, stdout=log_handle,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        metrics_file = out / "metrics.jsonl"
        while time.time() < deadline and agent.poll() is None:
            if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert agent.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        assert metrics_file.exists(), "no epoch finished in time:\n" + log.read_text()[-3000:]
        time.sleep(0.2)  # land in the middle of the next epoch's training
    finally:
        survivors = kill_9_job(agent)
    assert agent.returncode == -signal.SIGKILL
    assert not survivors, f"workers survived kill -9: {[p.pid for p in survivors]}"
    # nothing writes the run folder any more
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    time.sleep(1.0)
    assert before == {name: (out / name).read_bytes() for name in before}
    done = load_checkpoint(out)["epoch"]
    assert 2 <= done < epochs, "the kill must land mid-run"
    assert not (out / "summary.json").exists()

    result = torchrun(2, ["--resume", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == epochs and len(set(lines)) == epochs, text
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    state = load_checkpoint(out)
    assert state["epoch"] == epochs and state["history"] == records
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == epochs
    for record in records:
        hashes = record["rank_state_hashes"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]
    # no epoch trained twice or skipped: masks, sieve and losses follow the uninterrupted run
    straight = metrics(two_rank_run)
    for key in ("rank_state_hashes", "loss", "val_acc", "samples", "frozen_blocks", "train_flops_total"):
        assert [r[key] for r in records] == [r[key] for r in straight], key


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_workers_stop_when_only_the_torchrun_launcher_is_killed(tmp_path):
    """kill -9 of torchrun alone: its workers (own sessions) notice and stop within a step."""
    out, log = tmp_path / "orphans", tmp_path / "orphans.log"
    with open(log, "wb") as log_handle:
        agent = subprocess.Popen(torchrun_cmd(2, [*ARGS, "--epochs", "40", "--out", str(out)]), cwd=ROOT,
                                 stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and agent.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert agent.poll() is None, log.read_text()[-3000:]
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True)
                   if "spfde_edge.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=60)
        assert not [p for p in alive if _running(p)], "orphaned workers kept training"
    finally:
        if agent.poll() is None:
            kill_9_job(agent)
        for proc in workers:
            if _running(proc):
                proc.kill()
    assert "the torchrun launcher" in log.read_text()
