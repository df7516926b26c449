"""Fixtures shared by test modules.

``bundle_dir``: one session-scoped bundle (resnet32 at width 0.25, 16x16 input, stages 14-16)
exported with the exporter's Python API. Its ExecuTorch lowering is replaced by a stub file:
it takes 40-90 s per stage on two cores and the runner uses ONNX Runtime for the prefix in
tests anyway. Everything else, the manifest and its sha256 table, is the exporter's real output.
Used by test_device_runner.py, test_trust.py and test_robustness.py.
"""
from __future__ import annotations

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
                                    distribution="erk"),  # its 30 % freezing target fits 30 epochs
                      log=lambda line: None)
    return out
