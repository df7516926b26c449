"""Fixtures shared by test modules.

``bundle_dir``: one session-scoped format-1 bundle (resnet32 at width 0.25, 16x16 input, stages
14-16) exported with the exporter's Python API; ``bundle_v2_dir`` the same model in format 2. Its ExecuTorch lowering is replaced by a stub file:
it takes 40-90 s per stage on two cores and the runner uses ONNX Runtime for the prefix in
tests anyway. Everything else, the manifest and its sha256 table, is the exporter's real output.
Used by test_device_runner.py, test_trust.py and test_robustness.py.
"""
from __future__ import annotations

import contextlib

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    import spfde_edge.export.prefix as prefix_io
    from spfde_edge.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "r32"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefix_io, "export_prefix_pte", lambda prefix, example, path: path.write_bytes(b"stub"))
        patch.setattr(prefix_io, "run_pte",
                      lambda path, x: prefix_io.run_onnx(path.with_name(prefix_io.ONNX_FILE), x.numpy()))
        export_bundle(ExportOptions(model="resnet32", width=0.25, input_size=16, stages="14-16",
                                    batch_size=16, epochs=30, delta_tau=2, out=str(out), parity_steps=2,
                                    distribution="erk", bundle_format=1),  # its 30 % freezing target fits 30 epochs
                      log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def bundle_v2_dir(tmp_path_factory) -> Path:
    """The same model as ``bundle_dir`` in format 2: one weight store, every block boundary."""
    from spfde_edge.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle_v2") / "r32"
    with count_lowerings() as lowered:
        export_bundle(ExportOptions(model="resnet32", width=0.25, input_size=16, batch_size=16, epochs=30,
                                    delta_tau=2, out=str(out), distribution="erk", bundle_format=2),
                      log=lambda line: None)
    (out.parent / "lowered.txt").write_text(str(lowered[0]))   # for tests/test_bundle_v2.py
    return out


@contextlib.contextmanager
def count_lowerings():
    """Count ``torch.export.export`` calls (each a lowering of a program) while exporting."""
    import torch

    count = [0]
    original = torch.export.export

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.export, "export", counted)
        yield count
