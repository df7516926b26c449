"""No kill, signal, full disk, second process or stage change leaves a run broken (issue 13).

Kills are real ``kill -9``s of CLI processes: at seeded random moments, and injected at exact
points of the first checkpoint write (a patched write kills its own process), which no
timing can hit reliably. Every killed run is continued the way a user would (``--resume``,
or the same start command for a run killed before its first checkpoint) and must end with
no temporaries left and the same weights and metrics as a run that was never interrupted.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
DEVICE_KILLS = 10
HOST_KILLS = 5  # the first inside the first checkpoint write


def device_args(bundle_dir, out) -> list[str]:
    return ["--bundle", str(bundle_dir), "--profile", "generic-x86", "--data", "digits", "--max-per-class", "8",
            "--epochs", "3", "--freeze-at", "1,2", "--batch-size", "4", "--checkpoint-every", "1",
            "--threads", "1", "--out", str(out)]


def python(code_or_module: list[str], *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *code_or_module, *args], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def stale_files(out: Path) -> list[str]:
    """Temporaries and checkpoint folders the pointer does not name."""
    stale = [str(p.relative_to(out)) for p in out.rglob("*.tmp")]
    if (out / "checkpoint.json").exists():
        current = json.loads((out / "checkpoint.json").read_text())["folder"]
        stale += [str(p.relative_to(out)) for p in (out / "checkpoints").iterdir() if p.relative_to(out) != Path(current)]
    return stale


def device_result(out: Path) -> dict:
    """Everything a run computes: final suffix state, frozen blocks, per-epoch metrics."""
    folder = out / json.loads((out / "checkpoint.json").read_text())["folder"]
    with np.load(folder / "suffix_state.npz") as data:
        arrays = {f"suffix/{k}": data[k] for k in data.files}
    with np.load(folder / "state.npz") as data:
        arrays.update({k: data[k] for k in data.files if k.startswith(("frozen/", "momentum/"))})
    keep = ("epoch", "stage", "val_acc", "val_loss", "batch_size", "samples", "regrown", "pruned",
            "sieve_swapped", "sparsity")
    history = [{k: r[k] for k in keep} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "epoch"]
    return {"arrays": arrays, "history": history}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a["history"] == b["history"], what
    assert a["arrays"].keys() == b["arrays"].keys(), what
    for name in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][name], b["arrays"][name], err_msg=f"{what}: {name}")


def continue_device_run(bundle_dir, out: Path) -> str:
    """Resume a killed run, or start it again when it died before its first checkpoint."""
    from device_runner import checkpoint

    if not out.exists() or checkpoint.is_unfinished_start(out) or not (out / "checkpoint.json").exists():
        how, args = "started again", device_args(bundle_dir, out)
    else:
        how, args = "resumed", ["--resume", str(out)]
    code, stdout, stderr = finish(python(["-m", "device_runner"], *args))
    assert code == 0, f"{how}: {stderr[-2000:]}"
    assert "Traceback" not in stderr
    return how


# A child that kills itself (SIGKILL) at an exact point of a checkpoint write.
KILL_AT = """
import os, signal, sys
import device_runner.checkpoint as ckpt
from device_runner import files
point, nth = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def due():
    calls["n"] += 1
    return calls["n"] == nth
if point == "checkpoint_folder":      # inside the checkpoint's temporary folder, before its rename
    real_fsync = ckpt.fsync_file
    ckpt.fsync_file = lambda path: die() if due() else real_fsync(path)
else:                                 # half-way through an atomic write of checkpoint.json/metrics.jsonl
    real_text = ckpt.atomic_write_text
    def text(path, data):
        if not due():
            return real_text(path, data)
        files.atomic_write(path, lambda handle: (handle.write(data.encode()[:10]), handle.flush(), die()))
    ckpt.atomic_write_text = text
from device_runner.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def device_reference(bundle_dir, tmp_path_factory) -> dict:
    """One uninterrupted run; while it holds its folder (paused with SIGSTOP), a second runner
    and a --resume on the same folder are refused with one line naming its pid."""
    out = tmp_path_factory.mktemp("reference") / "run"
    first = python(["-m", "device_runner"], *device_args(bundle_dir, out))
    started = time.time()
    deadline = started + 120
    while not (out / "checkpoint.json").exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    paused = time.time()
    try:
        second = finish(python(["-m", "device_runner"], *device_args(bundle_dir, out)))
        resumed = finish(python(["-m", "device_runner"], "--resume", str(out)))
    finally:
        first.send_signal(signal.SIGCONT)
    paused = time.time() - paused
    code, _, stderr = finish(first)
    assert code == 0, stderr[-2000:]
    return {"out": out, "result": device_result(out), "seconds": time.time() - started - paused,
            "pid": first.pid, "second": second, "resumed": resumed}


def test_two_runners_on_one_folder_the_second_is_refused(device_reference):
    pid = device_reference["pid"]
    for what in ("second", "resumed"):
        code, _, stderr = device_reference[what]
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (what, stderr)
        assert lines[0].startswith("error: ") and f"pid {pid}" in lines[0], (what, lines)
    assert json.loads((device_reference["out"] / "report.json").read_text())["status"] == "finished"
    assert not stale_files(device_reference["out"])


@pytest.mark.slow
def test_device_kill_9_anywhere_resumes_to_the_same_result(bundle_dir, device_reference, tmp_path):
    """3 kills injected in checkpoint writes (the first checkpoint's folder, the first pointer,
    a later metrics file), the rest at seeded random moments."""
    reference = device_reference["result"]
    rng = np.random.default_rng(13)
    injected = [("checkpoint_folder", 1), ("text", 1), ("text", 6)]
    outcomes = []
    for trial in range(DEVICE_KILLS):
        out = tmp_path / f"kill{trial}"
        if trial < len(injected):
            point, nth = injected[trial]
            process = python(["-c", KILL_AT, point, str(nth)], *device_args(bundle_dir, out))
            finish(process)
            assert process.returncode == -signal.SIGKILL, process.stderr
            assert stale_files(out), f"injected kill {point} #{nth} should leave a temporary"
        else:
            process = python(["-m", "device_runner"], *device_args(bundle_dir, out))
            time.sleep(float(rng.uniform(0.2, device_reference["seconds"])))
            process.kill()
            process.communicate()
            report = out / "report.json"
            if process.returncode == 0 or (report.exists() and json.loads(report.read_text())["status"] == "finished"):
                # the run was faster than this machine's reference: it finished before the kill
                outcomes.append("finished before the kill")
                assert_same(device_result(out), reference, f"kill {trial} (not killed)")
                continue
        how = continue_device_run(bundle_dir, out)
        assert not stale_files(out), (trial, stale_files(out))
        assert json.loads((out / "report.json").read_text())["status"] == "finished"
        assert_same(device_result(out), reference, f"kill {trial} ({how})")
        outcomes.append(how)
    print(f"device kills: {len(outcomes)} tried, {outcomes.count('resumed') + outcomes.count('started again')} "
          f"killed and continued identically ({outcomes.count('started again')} before the first checkpoint)")
    assert outcomes[:2] == ["started again", "started again"] and outcomes[2] == "resumed"


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130_then_resumes_identically(bundle_dir, device_reference, tmp_path):
    out = tmp_path / "run"
    process = python(["-m", "device_runner"], *device_args(bundle_dir, out))
    deadline = time.time() + 120
    while True:
        try:
            if json.loads((out / "checkpoint.json").read_text())["position"] >= 8:
                break
        except (OSError, ValueError):
            pass
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    code, _, stderr = finish(process)
    lines = stderr.strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted: "), stderr
    assert "--resume" in lines[0]
    from device_runner import checkpoint

    meta, _, _ = checkpoint.read(out)
    assert meta["status"] == "stopped: interrupted" and meta["epoch"] < 3
    code, stdout, stderr = finish(python(["-m", "device_runner"], "--resume", str(out)))
    assert code == 0, stderr[-2000:]
    assert_same(device_result(out), device_reference["result"], "after SIGINT")
    assert not stale_files(out)


def test_full_disk_is_one_error_line_and_the_last_checkpoint_survives(bundle_dir, tmp_path, monkeypatch,
                                                                      capsys):
    from device_runner import checkpoint, files
    from device_runner.__main__ import main

    for where in ("state.npz", "metrics.jsonl"):
        out = tmp_path / where
        calls = {"n": 0}
        real_savez, real_atomic = np.savez, files.atomic_write

        def full(handle):
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        def savez(path, **arrays):  # the 2nd checkpoint's state.npz runs out of space half-way
            calls["n"] += where == "state.npz"
            if where == "state.npz" and calls["n"] == 4:
                Path(path).write_bytes(b"PK\x03\x04partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_savez(path, **arrays)

        def atomic(path, write):
            if where == "metrics.jsonl" and Path(path).name == "metrics.jsonl":
                calls["n"] += 1
                if calls["n"] == 4:
                    return real_atomic(path, full)
            return real_atomic(path, write)

        monkeypatch.setattr(checkpoint.np, "savez", savez)
        monkeypatch.setattr(files, "atomic_write", atomic)
        capsys.readouterr()
        assert main(device_args(bundle_dir, out)) == 2, where
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot write the checkpoint"), err
        assert "No space left on device" in err[0] and f"--resume {out}" in err[0]
        assert not stale_files(out), stale_files(out)
        monkeypatch.undo()
        meta, _, _ = checkpoint.read(out)  # the last complete checkpoint, readable
        assert main(["--resume", str(out)]) == 0, capsys.readouterr().err


def test_truncated_checkpoint_files_are_one_error_line(bundle_dir, tmp_path, capsys):
    import shutil

    from device_runner.__main__ import main
    from device_runner.loop import start
    from device_runner.run_config import RunConfig

    base = tmp_path / "base"
    runner = start(RunConfig(bundle=str(bundle_dir), profile="generic-x86", data="digits", out=str(base),
                             max_per_class=8, threads=1), log=lambda line: None)
    runner.lock.release()
    for name in ("state.npz", "suffix_state.npz"):
        out = tmp_path / name
        shutil.copytree(base, out)
        target = out / json.loads((out / "checkpoint.json").read_text())["folder"] / name
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        capsys.readouterr()
        assert main(["--resume", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: checkpoint of") and "unreadable" in err[0], err


# --- memory budget across stage changes ----------------------------------------------------------

class FakeMemory:
    """Peak RSS of a model whose later stages need more memory (new sessions and bridges):
    100 MB + a per-stage amount + 2 MB per sample of the last training step since the peak was
    reset; the planner measures the same model."""

    def __init__(self, stage_mb: dict[int, float]):
        self.stage_mb, self.runner, self.last_batch = stage_mb, None, 0

    def base(self, runner) -> float:
        return 100.0 + self.stage_mb[runner.stage_k]

    def install(self, monkeypatch):
        from device_runner import budget
        from device_runner.backends.ort_training import SuffixTrainer
        from device_runner.loop import Runner

        fake = self
        real_step = SuffixTrainer.train_step

        def measure_peak(runner, batch, steps=1):
            fake.runner = runner
            return fake.base(runner) + 2.0 * batch

        def train_step(trainer, features, labels):
            fake.last_batch = max(fake.last_batch, len(labels))
            return real_step(trainer, features, labels)

        def reset_peak():
            fake.last_batch = 0
            return True

        monkeypatch.setattr(Runner, "measure_peak", measure_peak)
        monkeypatch.setattr(SuffixTrainer, "train_step", train_step)
        monkeypatch.setattr(budget, "reset_peak", reset_peak)
        monkeypatch.setattr(budget, "peak_rss_mb", lambda: fake.base(fake.runner) + 2.0 * fake.last_batch)


def memory_args(bundle_dir, out, budget_mb) -> list[str]:
    return ["--bundle", str(bundle_dir), "--profile", "generic-x86", "--data", "digits", "--max-per-class", "20",
            "--epochs", "3", "--freeze-at", "1,2", "--cache", "none", "--threads", "1",
            "--memory-budget-mb", str(budget_mb), "--out", str(out), "--json"]


def test_each_stage_is_planned_so_the_budget_is_never_crossed(bundle_dir, tmp_path, monkeypatch, capsys):
    """Stage 15 needs 20 MB more: batch 16 at stage 14 would reach 152 MB at stage 15, over the
    150 MB budget (the bug: the planner sized stage 14 only); re-planned, stage 15 trains at 4."""
    from device_runner.__main__ import main

    FakeMemory({14: 0.0, 15: 20.0, 16: 20.0}).install(monkeypatch)
    assert main(memory_args(bundle_dir, tmp_path / "run", 150)) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "finished" and report["peak_rss_mb"] <= 150
    assert {s["stage"]: max(s["batch_sizes"]) for s in report["stages"]} == {14: 16, 15: 4, 16: 4}
    assert not [e for e in report["events"] if e["kind"] == "budget_exceeded"]
    assert sorted(report["plan"]["by_stage"]) == ["14", "15", "16"]


def test_a_stage_that_does_not_fit_stops_cleanly_with_exit_3(bundle_dir, tmp_path, monkeypatch, capsys):
    from device_runner import checkpoint
    from device_runner.__main__ import main

    FakeMemory({14: 0.0, 15: 20.0, 16: 40.0}).install(monkeypatch)
    out = tmp_path / "run"
    assert main(memory_args(bundle_dir, out, 150)) == 3
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # with --json stdout is the JSON alone; progress goes to stderr
    stopped = [line for line in captured.err.strip().splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped: stage 16"), captured.err[-2000:]
    assert "--memory-budget-mb" in stopped[0] and "Traceback" not in captured.err
    assert report["status"] == "stopped: memory budget" and report["epochs_done"] == 2
    assert report["peak_rss_mb"] <= 150
    assert [e["kind"] for e in report["events"]].count("budget_exceeded") == 1
    assert checkpoint.read(out)[0]["status"] == "stopped: memory budget"
    assert main(["--resume", str(out), "--memory-budget-mb", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["history"][-1]["epoch"] == 3


@pytest.mark.slow
def test_tight_real_budgets_are_kept_or_the_run_stops_cleanly(bundle_dir, tmp_path):
    """Real RSS: budgets from just above the first stage's need to well above the last's."""
    plan = subprocess.run([sys.executable, "-m", "device_runner", "--bundle", str(bundle_dir), "--profile",
                           "generic-x86", "--data", "digits", "--max-per-class", "8", "--threads", "1",
                           "--dry-run", "--json"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    first_stage_mb = json.loads(plan.stdout.strip().splitlines()[-1])["predicted_peak_mb"]
    outcomes = []
    for extra in (2, 8, 16, 40):
        budget_mb = round(first_stage_mb / 0.9 + extra, 1)
        out = tmp_path / f"b{extra}"
        code, stdout, stderr = finish(python(["-m", "device_runner"], *device_args(bundle_dir, out),
                                             "--memory-budget-mb", str(budget_mb), "--json"))
        assert "Traceback" not in stderr
        if code == 2:  # refused before training: one line, nothing trained
            assert len(stderr.strip().splitlines()) == 1 and "raise budgets.memory_mb" in stderr
            outcomes.append("refused")
            continue
        report = json.loads(stdout.strip().splitlines()[-1])
        exceeded = [e for e in report["events"] if e["kind"] == "budget_exceeded"]
        if code == 0:
            assert report["status"] == "finished" and report["peak_rss_mb"] <= budget_mb and not exceeded
            outcomes.append("finished")
        else:
            assert code == 3 and report["status"] == "stopped: memory budget" and len(exceeded) == 1, stderr
            outcomes.append("stopped")
    print(f"tight budgets: {len(outcomes)} runs: {outcomes}")
    assert outcomes[-1] == "finished"


# --- host trainer ------------------------------------------------------------------------------

HOST_ARGS = ["--model", "resnet32", "--width", "0.25", "--dataset", "synthetic", "--synthetic-size", "192",
             "--input-size", "16", "--epochs", "4", "--batch-size", "32", "--sparsity", "0.8", "--dst", "set",
             "--delta-tau", "1", "--sieve", "0.2", "--threads", "1"]

HOST_KILL_IN_FIRST_CHECKPOINT = """
import os, signal, sys
import spfde_edge.checkpoint as ckpt
real = ckpt.atomic_write
def write(path, fn):
    if path.name == "checkpoint.pt":
        real(path, lambda handle: (fn(handle), handle.flush(), os.kill(os.getpid(), signal.SIGKILL)))
    return real(path, fn)
ckpt.atomic_write = write
from spfde_edge.train import main
sys.exit(main(sys.argv[1:]))
"""


def host_result(out: Path) -> dict:
    from spfde_edge.checkpoint import load_checkpoint

    state = load_checkpoint(out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"model": {k: v.numpy() for k, v in state["model"].items()}, "losses": losses}


@pytest.mark.slow
def test_host_kill_9_anywhere_resumes_to_the_same_result(tmp_path):
    reference_out = tmp_path / "reference"
    started = time.time()
    code, _, stderr = finish(python(["-m", "spfde_edge.train"], *HOST_ARGS, "--out", str(reference_out)))
    assert code == 0, stderr[-2000:]
    seconds = time.time() - started
    reference = host_result(reference_out)
    rng = np.random.default_rng(7)
    outcomes = []
    for trial in range(HOST_KILLS):
        out = tmp_path / f"kill{trial}"
        if trial == 0:  # inside the first checkpoint write: its temporary is complete, not renamed
            process = python(["-c", HOST_KILL_IN_FIRST_CHECKPOINT], *HOST_ARGS, "--out", str(out))
            finish(process)
            assert process.returncode == -signal.SIGKILL and stale_files(out)
        else:
            process = python(["-m", "spfde_edge.train"], *HOST_ARGS, "--out", str(out))
            time.sleep(float(rng.uniform(0.5, seconds)))
            process.kill()
            process.communicate()
        if (out / "checkpoint.pt").exists():
            how, args = "resumed", ["--resume", str(out)]
        else:
            how, args = "started again", [*HOST_ARGS, "--out", str(out)]
        code, _, stderr = finish(python(["-m", "spfde_edge.train"], *args))
        assert code == 0, f"{how}: {stderr[-2000:]}"
        assert not stale_files(out), stale_files(out)
        result = host_result(out)
        assert result["losses"] == reference["losses"], (trial, how)
        for name, value in reference["model"].items():
            np.testing.assert_array_equal(result["model"][name], value, err_msg=f"kill {trial}: {name}")
        outcomes.append(how)
    print(f"host kills: {len(outcomes)} tried, {len(outcomes)} resumed identically: {outcomes}")
    assert outcomes[0] == "started again"


def test_host_second_trainer_on_a_live_folder_names_the_pid(tmp_path, capsys):
    from device_runner import run_lock
    from spfde_edge.train import main

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / run_lock.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / ".metrics.jsonl.abc123.tmp").write_text("stale")
        assert main([*HOST_ARGS, "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
        assert (out / ".metrics.jsonl.abc123.tmp").exists()  # a live run's files are left alone
    finally:
        holder.kill()
        holder.wait()
    assert main([*HOST_ARGS, "--epochs", "1", "--synthetic-size", "64", "--out", str(out)]) == 0
    assert not stale_files(out)


def test_a_run_killed_before_its_report_resumes_to_write_it(device_reference, tmp_path):
    """The last checkpoint says "finished" but report.json was never written: --resume writes
    it (exit 0); with the report there, --resume says the run is finished (exit 2)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(device_reference["out"], out)
    (out / "report.json").unlink()
    code, _, stderr = finish(python(["-m", "device_runner"], "--resume", str(out)))
    assert code == 0, stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["status"] == "finished"
    assert_same(device_result(out), device_reference["result"], "report rewritten")
    code, _, stderr = finish(python(["-m", "device_runner"], "--resume", str(out)))
    assert code == 2 and "already finished" in stderr
