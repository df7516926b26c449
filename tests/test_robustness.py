"""Bad input to the three CLIs: one ``error:`` line, exit 2, no traceback, no file changed.

One table, one test: each row runs a CLI in a subprocess (as a user would) on a temporary
folder that holds whatever the row set up, and checks the house rule for errors
(docs: /work/shared/STYLE.md, "Errors that teach"): exactly one non-empty stderr line that
starts with ``error:`` and contains the row's fragments, exit code 2, and the files under
the temporary folder, the session bundle and the image folder unchanged (names, sizes,
mtimes), so a refused command never leaves a run folder or overwrites anything.

Rows that need a bundle reuse the session bundle of conftest.py (export is slow); rows that
damage one copy it into the temporary folder first.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    cli: str                                   # module run with python -m
    args: tuple[str, ...]                      # {tmp}, {bundle}, {images} are filled in
    expect: tuple[str, ...]                    # fragments the error line must contain
    setup: Callable[[Path, Path], None] | None = None   # (tmp, bundle) -> files the row needs


# --- setups ---------------------------------------------------------------------------------

def a_file(name: str):
    def setup(tmp: Path, bundle: Path) -> None:
        (tmp / name).write_text("not a folder\n")
    return setup


def write(name: str, content: bytes):
    def setup(tmp: Path, bundle: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)
    return setup


def one_class_folder(tmp: Path, bundle: Path) -> None:
    folder = tmp / "one" / "cat"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")


def edited_manifest(edit: Callable[[dict], None]):
    """A copy of the bundle in ``tmp/bundle`` whose manifest.json went through ``edit``."""
    def setup(tmp: Path, bundle: Path) -> None:
        shutil.copytree(bundle, tmp / "bundle")
        path = tmp / "bundle" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2))
    return setup


def manifest_text(replace: str, by: str):
    """A copy of the bundle whose manifest.json has ``replace`` replaced as text (NaN is not JSON)."""
    def setup(tmp: Path, bundle: Path) -> None:
        shutil.copytree(bundle, tmp / "bundle")
        path = tmp / "bundle" / "manifest.json"
        text = path.read_text()
        assert replace in text
        path.write_text(text.replace(replace, by, 1))
    return setup


def flipped(rel: str):
    """A copy of the bundle with one byte of ``rel`` inverted (sizes unchanged, sha256 not)."""
    def setup(tmp: Path, bundle: Path) -> None:
        shutil.copytree(bundle, tmp / "bundle")
        path = tmp / "bundle" / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return setup


def first_file_without_bytes(m: dict) -> None:
    del next(iter(m["files"].values()))["bytes"]


def first_mask_without_weight(m: dict) -> None:
    del m["stages"][0]["suffix"]["masks"][0]["weight"]


def set_path(path: str, value):
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value
    return edit


# --- the table ------------------------------------------------------------------------------

DEVICE = "device_runner"
TRAIN = "spfde_edge.train"
EXPORT = "spfde_edge.export"

RUN = ("--bundle", "{bundle}", "--profile", "generic-x86", "--data", "imagefolder:{images}",
       "--epochs", "2", "--threads", "1", "--out", "{tmp}/run")
COPY = ("--bundle", "{tmp}/bundle", "--profile", "generic-x86", "--data", "imagefolder:{images}",
        "--epochs", "2", "--threads", "1", "--out", "{tmp}/run")
FIT = ("--dataset", "synthetic", "--synthetic-size", "64", "--model", "resnet32", "--width", "0.25",
       "--input-size", "16", "--epochs", "1", "--threads", "1", "--out", "{tmp}/run")
FRESH = ("--model", "resnet32", "--width", "0.25", "--input-size", "16", "--bundle-format", "1", "--stages", "14",
         "--parity-steps", "2", "--no-step-graph", "--out", "{tmp}/export")
FRESH_V2 = ("--model", "resnet32", "--width", "0.25", "--input-size", "16", "--out", "{tmp}/export")
NAN_PROFILE = (b"name: nan-board\nboard: {cpu: x, cores: 2, ram_mb: 4096, arch: x86_64}\n"
               b"power: {idle_w: 5, busy_w: 10}\nbudgets: {memory_mb: .nan}\n")

ROWS = {
    # device_runner: options
    "device-out-is-a-file": Case(DEVICE, (*RUN[:-1], "{tmp}/afile"), ("--out", "is a file"), a_file("afile")),
    "device-batch-size-0": Case(DEVICE, (*RUN, "--batch-size", "0"), ("--batch-size must be at least 1",)),
    "device-batch-size-negative": Case(DEVICE, (*RUN, "--batch-size", "-4"), ("--batch-size must be at least 1",)),
    "device-freeze-at-not-numbers": Case(DEVICE, (*RUN, "--freeze-at", "abc"),
                                         ("--freeze-at", "whole numbers separated by commas")),
    "device-stages-not-exported": Case(DEVICE, (*RUN, "--stages", "3,15"),
                                       ("--stages 3,15", "the exported stages [14, 15, 16]")),
    "device-stages-not-increasing": Case(DEVICE, (*RUN, "--stages", "15,14"), ("give increasing boundaries",)),
    "device-freeze-at-beyond-epochs": Case(DEVICE, (*RUN, "--freeze-at", "99"),
                                           ("--freeze-at 99", "epochs 1..2", "raise --epochs")),
    "device-max-per-class-0": Case(DEVICE, (*RUN, "--max-per-class", "0"), ("--max-per-class must be at least 1",)),
    "device-delta-tau-negative": Case(DEVICE, (*RUN, "--delta-tau", "-1"), ("--delta-tau must be at least 1",)),
    "device-lr-negative": Case(DEVICE, (*RUN, "--lr", "-1"), ("--lr must be a positive number",)),
    "device-checkpoint-every-0": Case(DEVICE, (*RUN, "--checkpoint-every", "0"),
                                      ("--checkpoint-every must be at least 1",)),
    "device-val-fraction-0": Case(DEVICE, (*RUN, "--val-fraction", "0"), ("--val-fraction must be between 0 and 1",)),
    "device-memory-budget-nan": Case(DEVICE, (*RUN, "--memory-budget-mb", "nan"), ("--memory-budget-mb", "got nan")),
    "device-memory-budget-inf": Case(DEVICE, (*RUN, "--memory-budget-mb", "inf"), ("--memory-budget-mb", "got inf")),
    "device-memory-budget-negative": Case(DEVICE, (*RUN, "--memory-budget-mb", "-5"), ("--memory-budget-mb",)),
    "device-energy-budget-nan": Case(DEVICE, (*RUN, "--energy-budget-j", "nan"), ("--energy-budget-j", "got nan")),
    "device-energy-budget-inf": Case(DEVICE, (*RUN, "--energy-budget-j", "inf"), ("--energy-budget-j", "got inf")),
    "device-energy-budget-negative": Case(DEVICE, (*RUN, "--energy-budget-j", "-1"), ("--energy-budget-j",)),
    "device-resume-energy-budget-nan": Case(DEVICE, ("--resume", "{tmp}/run", "--energy-budget-j", "nan"),
                                            ("--energy-budget-j", "got nan"), write("run/keep", b"x")),
    "device-epochs-not-a-number": Case(DEVICE, (*RUN, "--epochs", "abc"), ("argument --epochs", "--help")),
    "device-no-bundle-folder": Case(DEVICE, ("--bundle", "{tmp}/missing", *RUN[2:]), ("does not exist",)),
    # device_runner: profiles and data
    "profile-random-bytes": Case(DEVICE, (*RUN[:2], "--profile", "{tmp}/random.yaml", *RUN[4:]),
                                 ("random.yaml is not a text file",),
                                 write("random.yaml", bytes(np.random.default_rng(0).integers(128, 256, 300,
                                                                                             dtype=np.uint8)))),
    "profile-nan-budget": Case(DEVICE, (*RUN[:2], "--profile", "{tmp}/nan.yaml", *RUN[4:]),
                               ("nan.yaml", "budgets.memory_mb", "not a finite number"), write("nan.yaml", NAN_PROFILE)),
    "data-one-class": Case(DEVICE, (*RUN[:4], "--data", "imagefolder:{tmp}/one", *RUN[6:]),
                           ("one class only", "at least 2 classes"), one_class_folder),
    # device_runner: the manifest (JSON Schema) and the files it vouches for
    "manifest-file-without-bytes": Case(DEVICE, COPY, ("files.", "'bytes' is a required property"),
                                        edited_manifest(first_file_without_bytes)),
    "manifest-classes-an-int": Case(DEVICE, COPY, ("model.classes",), edited_manifest(set_path("model.classes", 10))),
    "manifest-empty-input-shape": Case(DEVICE, COPY, ("model.input.shape",),
                                       edited_manifest(set_path("model.input.shape", []))),
    "manifest-mask-without-weight": Case(DEVICE, COPY, ("masks[0]", "'weight' is a required property"),
                                         edited_manifest(first_mask_without_weight)),
    "manifest-delta-tau-0": Case(DEVICE, COPY, ("spfde.delta_tau",), edited_manifest(set_path("spfde.delta_tau", 0))),
    "manifest-one-class": Case(DEVICE, COPY, ("model.num_classes",),
                               edited_manifest(set_path("model.num_classes", 1))),
    "manifest-classes-count": Case(DEVICE, COPY, ("names 3 classes but model.num_classes is 10",),
                                   edited_manifest(set_path("model.classes", ["a", "b", "c"]))),
    "manifest-nan": Case(DEVICE, COPY, ("NaN is not a JSON number",), manifest_text('"momentum": 0.9', '"momentum": NaN')),
    "manifest-format-version": Case(DEVICE, COPY, ("bundle format version 3", "re-export"),
                                    edited_manifest(set_path("format_version", 3))),
    "flipped-onnx": Case(DEVICE, COPY, ("damaged", "training_model.onnx", "copy the bundle again"),
                         flipped("stage_14/training_model.onnx")),
    "flipped-ort-checkpoint": Case(DEVICE, COPY, ("damaged", "stage_15/checkpoint", "copy the bundle again"),
                                   flipped("stage_15/checkpoint")),
    "flipped-npz": Case(DEVICE, COPY, ("damaged", "suffix_state.npz", "copy the bundle again"),
                        flipped("stage_16/suffix_state.npz")),
    "flipped-pte": Case(DEVICE, COPY, ("damaged", "prefix.pte", "copy the bundle again"), flipped("stage_15/prefix.pte")),
    # device_runner report
    "report-truncated": Case(DEVICE, ("report", "{tmp}/run"), ("report.json is damaged",),
                             write("run/report.json", b'{"status": "finished", "epochs_do')),
    "report-not-a-report": Case(DEVICE, ("report", "{tmp}/run"), ("not a device_runner report",),
                                write("run/report.json", b"[1, 2]")),
    "report-missing": Case(DEVICE, ("report", "{tmp}/run"), ("has no report.json",), write("run/keep", b"x")),
    # spfde_edge.train
    "train-out-is-a-file": Case(TRAIN, (*FIT[:-1], "{tmp}/afile"), ("--out", "is a file"), a_file("afile")),
    "train-momentum-negative": Case(TRAIN, (*FIT, "--momentum", "-1"), ("--momentum must be in [0, 1)",)),
    "train-threads-0": Case(TRAIN, (*FIT, "--threads", "0"), ("--threads must be at least 1",)),
    "train-val-fraction-1": Case(TRAIN, (*FIT, "--val-fraction", "1"), ("--val-fraction must be in [0, 1)",)),
    "train-lr-nan": Case(TRAIN, (*FIT, "--lr", "nan"), ("--lr must be positive",)),
    "train-epochs-not-a-number": Case(TRAIN, (*FIT, "--epochs", "x"), ("argument --epochs", "--help")),
    "train-one-class": Case(TRAIN, ("--dataset", "imagefolder", "--data-dir", "{tmp}/one", "--cache-dir",
                                    "{tmp}/cache", *FIT[4:]), ("one class sub-folder", "at least 2 classes"),
                            one_class_folder),
    # spfde_edge.export
    "export-opset-5": Case(EXPORT, (*FRESH, "--opset", "5"), ("--opset must be between 14 and 20",)),
    "export-parity-steps-negative": Case(EXPORT, (*FRESH, "--parity-steps", "-1"),
                                         ("--parity-steps must be at least 1",)),
    "export-batch-size-0": Case(EXPORT, (*FRESH, "--batch-size", "0"), ("--batch-size must be at least 1",)),
    "export-num-classes-0": Case(EXPORT, (*FRESH, "--num-classes", "0"), ("--num-classes must be at least 2",)),
    "export-num-classes-1": Case(EXPORT, (*FRESH, "--num-classes", "1"), ("--num-classes must be at least 2",)),
    "export-epochs-0": Case(EXPORT, (*FRESH, "--epochs", "0"), ("--epochs must be at least 1",)),
    "export-delta-tau-0": Case(EXPORT, (*FRESH, "--delta-tau", "0"), ("--delta-tau must be at least 1",)),
    "export-stages-in-format-2": Case(EXPORT, (*FRESH_V2, "--stages", "14"), ("add --bundle-format 1",)),
    "export-parity-steps-in-format-2": Case(EXPORT, (*FRESH_V2, "--parity-steps", "2"), ("drop --parity-steps",)),
    "export-no-step-graph-in-format-2": Case(EXPORT, (*FRESH_V2, "--no-step-graph"), ("drop --no-step-graph",)),
}


# --- the test -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def two_class_images(tmp_path_factory) -> Path:
    """2 classes x 6 random 16x16 PNGs plus one corrupt file: data a run could really use."""
    root = tmp_path_factory.mktemp("two-classes")
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / label).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, mtime_ns)."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                info = path.lstat()
                state[str(path)] = (info.st_size if name in filenames else 0, info.st_mtime_ns)
    return state


def run_cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize("case", list(ROWS.values()), ids=list(ROWS))
def test_bad_input_gives_one_error_line_and_changes_nothing(case: Case, tmp_path, bundle_dir,
                                                            two_class_images):
    work = tmp_path / "work"   # the row's files; the CLI runs in it, so default outputs land here too
    work.mkdir()
    if case.setup is not None:
        case.setup(work, bundle_dir)
    args = [a.format(tmp=work, bundle=bundle_dir, images=two_class_images) for a in case.args]
    before = snapshot(work, bundle_dir, two_class_images)

    result = run_cli(case.cli, args, cwd=work)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in case.expect:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert snapshot(work, bundle_dir, two_class_images) == before


def test_corrupt_images_are_skipped_not_fatal(tmp_path, bundle_dir, two_class_images):
    """The image folder holds one corrupt PNG: the run finishes and counts it as skipped."""
    result = run_cli(DEVICE, ["--bundle", str(bundle_dir), "--profile", "generic-x86",
                              "--data", f"imagefolder:{two_class_images}", "--epochs", "1",
                              "--val-fraction", "0.34", "--batch-size", "4", "--threads", "1",
                              "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable skipped" in result.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["skipped_examples"] == ["1/broken.png"]
