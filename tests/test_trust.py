"""Nothing runs that the user did not ship: safe checkpoints, bundle paths, bundle signatures.

Each refusal is checked the way a user meets it: the CLI exits 2 with one ``error:`` line and
nothing is run or written. Bundles are copies of the session bundle (conftest.py) with one
thing changed. What is verified and when: docs/trust.md.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from device_runner import signing
from device_runner.bundle import load_bundle, path_problem
from device_runner.errors import BundleError, TrustError
from device_runner.files import sha256_file
from spfde_edge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from test_device_runner import config, quiet, run_cli

REPO = Path(__file__).resolve().parent.parent
PREFIX = "stage_14/prefix.onnx"


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI refused: exit 2, exactly one line on stderr, starting with ``error:``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- a checkpoint never runs code -------------------------------------------------------------

class MarkerOnUnpickle:
    """Unpickling this creates ``path``: proof that loading ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_evil(path: Path, marker: Path, kind: str) -> None:
    payload = {"format": "spfde-checkpoint", "format_version": 2, "epoch": MarkerOnUnpickle(marker)}
    if kind == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle, as torch.load also accepts
        with open(path, "wb") as handle:
            import pickle
            pickle.dump(payload, handle)


def host_cli(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
@pytest.mark.parametrize("command", ["export", "train --resume"])
def test_malicious_checkpoint_runs_no_code(tmp_path, command, kind):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    write_evil(run / "checkpoint.pt", marker, kind)
    if command == "export":
        result = host_cli("spfde_edge.export", ["--checkpoint", str(run / "checkpoint.pt"),
                                                "--out", str(tmp_path / "bundle")])
    else:
        result = host_cli("spfde_edge.train", ["--resume", str(run)])
    one_error_line(result, "refused", "re-save")
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert not (tmp_path / "bundle").exists()


def test_checkpoint_holds_only_tensors_and_plain_data(tmp_path):
    state = {"sieve": {"active": np.array([True, False]), "forgetting": np.arange(3, dtype=np.int32)},
             "growth_rng": np.random.default_rng(5).bit_generator.state,   # 128-bit Python ints
             "history": [{"loss": np.float64(0.25)}], "weights": torch.ones(2), "blocks": ("a", "b")}
    save_checkpoint(tmp_path / "c.pt", state)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "c.pt")) == []
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["format_version"] == 3
    for key in ("active", "forgetting"):
        assert loaded["sieve"][key].dtype == state["sieve"][key].dtype
        assert np.array_equal(loaded["sieve"][key], state["sieve"][key])
    assert loaded["growth_rng"] == state["growth_rng"]
    assert loaded["history"][0]["loss"] == np.float64(0.25) and isinstance(loaded["history"][0]["loss"], np.float64)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["blocks"] == ("a", "b")


def test_format_2_with_numpy_arrays_still_loads_without_unpickling_code(tmp_path):
    """Formats 1 and 2 pickled numpy arrays; the restricted unpickler may rebuild those only."""
    torch.save({"format": "spfde-checkpoint", "format_version": 2,
                "sieve": {"active": np.array([1, 0, 1], dtype=np.int64)}, "loss": np.float32(1.5)},
               tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["sieve"]["active"].tolist() == [1, 0, 1] and loaded["loss"] == np.float32(1.5)
    marker = tmp_path / "marker"
    torch.save({"format": "spfde-checkpoint", "format_version": 2, "sieve": np.array([1]),
                "x": MarkerOnUnpickle(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="re-save"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# --- the device opens only files the manifest vouches for ----------------------------------------

def copy_bundle(bundle_dir: Path, folder: Path) -> Path:
    copy = folder / "bundle"
    shutil.copytree(bundle_dir, copy, symlinks=True)
    return copy


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def relist(data: dict, old: str, new: str, file: Path) -> None:
    """Point stage 14's prefix at ``new`` and list ``new`` with ``file``'s true size and sha256."""
    data["stages"][0]["prefix"]["onnx"] = new
    data["files"].pop(old, None)
    data["files"][new] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}


def escape_dotdot(root: Path) -> None:
    outside = root.parent / "outside.onnx"
    shutil.copy(root / PREFIX, outside)
    edit_manifest(root, lambda d: relist(d, PREFIX, "../outside.onnx", outside))


def escape_absolute(root: Path) -> None:
    outside = root.parent / "outside.onnx"
    shutil.copy(root / PREFIX, outside)
    edit_manifest(root, lambda d: relist(d, PREFIX, str(outside.resolve()), outside))


def unlisted_prefix(root: Path) -> None:
    shutil.copy(root / PREFIX, root / "stage_14" / "other.onnx")
    edit_manifest(root, lambda d: d["stages"][0]["prefix"].__setitem__("onnx", "stage_14/other.onnx"))


def symlink_out(root: Path) -> None:
    name = "stage_14/optimizer_model.onnx"
    (root / name).unlink()
    (root / name).symlink_to("/etc/passwd")
    edit_manifest(root, lambda d: d["files"].__setitem__(
        name, {"sha256": sha256_file(Path("/etc/passwd")), "bytes": Path("/etc/passwd").stat().st_size}))


ESCAPES = [  # (how the bundle is changed, words the one error line must hold)
    (escape_dotdot, ["'..'", "re-export"]),
    (escape_absolute, ["outside.onnx", "re-export"]),   # the manifest schema refuses it first
    (unlisted_prefix, ["stage_14/other.onnx", "does not list"]),
    (symlink_out, ["/etc/passwd", "outside the bundle"]),
]


def device_run(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["--bundle", str(bundle), "--profile", "generic-x86", "--data", "digits",
                    "--epochs", "1", "--max-per-class", "10", "--out", str(out), *extra])


@pytest.mark.parametrize("change,words", ESCAPES, ids=[c.__name__ for c, _ in ESCAPES])
def test_device_refuses_files_outside_the_manifest(bundle_dir, tmp_path, change, words):
    root = copy_bundle(bundle_dir, tmp_path)
    change(root)
    one_error_line(device_run(root, tmp_path / "run"), *words)
    assert not (tmp_path / "run").exists()


def test_inspect_does_not_vouch_for_a_dotdot_bundle(bundle_dir, tmp_path):
    root = copy_bundle(bundle_dir, tmp_path)
    escape_dotdot(root)
    result = host_cli("spfde_edge.export", ["--inspect", str(root)])
    one_error_line(result, "'..'")
    assert "verified" not in result.stdout


@pytest.mark.parametrize("rel,inside", [
    ("stage_14/prefix.onnx", True), ("./stage_14/prefix.onnx", True), ("", False), ("/etc/passwd", False),
    ("../x", False), ("stage_14/../../x", False), ("stage_14/../stage_14/prefix.onnx", False),
    ("C:\\x", False), ("..\\x", False)])
def test_path_rule(bundle_dir, rel, inside):
    assert (path_problem(bundle_dir, rel) is None) == inside


# --- signatures -------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """Two key pairs, each public key alone in its own trusted folder."""
    paths = {}
    for name in ("release", "other"):
        private, public = signing.generate_key(tmp_path / "keys" / name, name)
        trusted = tmp_path / "trusted" / name
        trusted.mkdir(parents=True)
        shutil.copy(public, trusted)
        paths[name], paths[f"{name}_dir"] = private, trusted
    assert oct(paths["release"].stat().st_mode & 0o777) == "0o600"
    return paths


def signed(bundle_dir: Path, tmp_path: Path, key: Path) -> Path:
    root = copy_bundle(bundle_dir, tmp_path)
    signing.sign_manifest(root, key)
    return root


def momentum_edit(root: Path, keys) -> None:
    text = (root / "manifest.json").read_text()
    assert '"momentum": 0.9' in text
    (root / "manifest.json").write_text(text.replace('"momentum": 0.9', '"momentum": 0.8', 1))


def file_swap(root: Path, keys) -> None:
    """A changed prefix with its sha256 recomputed: the manifest matches its files again."""
    shutil.copy(root / "stage_15" / "prefix.onnx", root / PREFIX)
    edit_manifest(root, lambda d: d["files"].__setitem__(
        PREFIX, {"sha256": sha256_file(root / PREFIX), "bytes": (root / PREFIX).stat().st_size}))


def unsigned(root: Path, keys) -> None:
    (root / signing.SIGNATURE_NAME).unlink()


def resigned_by_other(root: Path, keys) -> None:
    signing.sign_manifest(root, keys["other"])


def garbled(root: Path, keys) -> None:
    (root / signing.SIGNATURE_NAME).write_text("not json")


TAMPERED = [  # (what happens to a bundle signed by "release", words the error line must hold)
    (unsigned, ["not signed"]),
    (resigned_by_other, ["not among the trusted keys"]),
    (momentum_edit, ["does not match manifest.json"]),
    (file_swap, ["does not match manifest.json"]),
    (garbled, ["not a readable bundle signature"]),
]


@pytest.mark.parametrize("change,words", TAMPERED, ids=[c.__name__ for c, _ in TAMPERED])
def test_trusted_keys_refuse_unsigned_and_tampered_bundles(bundle_dir, tmp_path, keys, change, words):
    root = signed(bundle_dir, tmp_path, keys["release"])
    change(root, keys)
    one_error_line(device_run(root, tmp_path / "run", "--trusted-keys", str(keys["release_dir"])), *words)
    assert not (tmp_path / "run").exists()


def test_profile_trust_setting_refuses_an_unsigned_bundle(bundle_dir, tmp_path, keys):
    import yaml

    profile = yaml.safe_load((REPO / "profiles" / "generic-x86.yaml").read_text())
    profile["trust"] = {"keys_dir": "trusted/release"}   # relative to the profile's folder
    (tmp_path / "board.yaml").write_text(yaml.safe_dump(profile))
    result = run_cli(["--bundle", str(bundle_dir), "--profile", str(tmp_path / "board.yaml"), "--data",
                      "digits", "--epochs", "1", "--out", str(tmp_path / "run")])
    one_error_line(result, "not signed", str(keys["release_dir"]))


def test_trusted_keys_folder_must_hold_keys(bundle_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    one_error_line(device_run(bundle_dir, tmp_path / "run", "--trusted-keys", str(tmp_path / "empty")),
                   "no *.pub keys")
    with pytest.raises(TrustError, match="does not exist"):
        load_bundle(bundle_dir, trusted_keys=tmp_path / "missing")


def test_signed_bundle_runs_says_so_and_a_resume_verifies_again(bundle_dir, tmp_path, keys):
    from device_runner.loop import resume, start

    root = signed(bundle_dir, tmp_path, keys["release"])
    kid = signing.key_id(signing.load_private_key(keys["release"]).public_key())
    result = device_run(root, tmp_path / "cli", "--trusted-keys", str(keys["release_dir"]), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"signed by {kid}, verified" in result.stdout
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["bundle"]["signature"] == f"signed by {kid}, verified"
    # Interrupted at once, then resumed: each resume checks the bundle again with the run's keys.
    runner = start(config(root, tmp_path / "run", trusted_keys=str(keys["release_dir"]), epochs=1,
                          freeze_at=None), log=quiet)
    runner.stop(signal.SIGINT)
    runner.run()
    assert resume(tmp_path / "run", log=quiet).bundle.signature == f"signed by {kid}, verified"
    momentum_edit(root, keys)
    with pytest.raises(BundleError, match="does not match manifest.json"):
        resume(tmp_path / "run", log=quiet)


def test_without_keys_unsigned_bundles_run_and_inspect_shows_the_signature(bundle_dir, tmp_path, keys):
    assert load_bundle(bundle_dir).signature == "not signed (no trusted keys configured)"
    root = signed(bundle_dir, tmp_path, keys["release"])
    kid = signing.key_id(signing.load_private_key(keys["release"]).public_key())
    assert load_bundle(root).signature == f"signed by {kid}, not verified (no trusted keys configured)"
    result = host_cli("spfde_edge.export", ["--inspect", str(root), "--trusted-keys", str(keys["release_dir"])])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"signature: signed by {kid}, verified" in result.stdout


def test_export_signs_inside_the_temporary_folder(tmp_path, keys):
    """``export --sign-key``: the bundle appears signed, and the device accepts it with the key."""
    import spfde_edge.export.prefix as prefix_io
    from spfde_edge.export import ExportOptions, export_bundle

    out = tmp_path / "signed"
    lines = []
    with pytest.MonkeyPatch.context() as patch:   # the .pte stub of conftest.py's bundle_dir
        patch.setattr(prefix_io, "export_prefix_pte", lambda prefix, example, path: path.write_bytes(b"stub"))
        patch.setattr(prefix_io, "run_pte",
                      lambda path, x: prefix_io.run_onnx(path.with_name(prefix_io.ONNX_FILE), x.numpy()))
        export_bundle(ExportOptions(model="resnet32", width=0.25, input_size=16, stages="16", batch_size=8,
                                    epochs=30, delta_tau=2, out=str(out), parity_steps=1, step_graph=False,
                                    distribution="erk", bundle_format=1),
                      log=lines.append, sign_key=keys["release"])
    assert (out / signing.SIGNATURE_NAME).is_file() and any("signed manifest.json" in l for l in lines)
    assert str(keys["release"]) not in (out / "manifest.json").read_text()
    assert load_bundle(out, trusted_keys=keys["release_dir"]).signature.endswith(", verified")
    with pytest.raises(BundleError, match="not among the trusted keys"):
        load_bundle(out, trusted_keys=keys["other_dir"])


def test_export_refuses_a_bad_key_before_exporting(tmp_path):
    (tmp_path / "bad.key").write_text("not a key")
    result = host_cli("spfde_edge.export", ["--model", "resnet32", "--width", "0.25", "--out",
                                            str(tmp_path / "b"), "--sign-key", str(tmp_path / "bad.key")])
    one_error_line(result, "not an unencrypted PEM private key")
    assert not (tmp_path / "b").exists()
