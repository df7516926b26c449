"""Bundle format 2 on the host: every weight once, export cost linear in blocks, parity recorded.

Uses the session's ``bundle_v2_dir`` (resnet32 at width 0.25, 17 blocks) and, for the
linear-cost check, a 3-block toy model registered for the test.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from torch import nn

from device_runner.weight_store import STORE_FILE, read_weights, store_bytes_per_tensor

from conftest import count_lowerings

LARGEST_GRAPH_TENSOR = 1024   # bytes: shapes and scalars only, never a weight or an index table


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _graph_tensor_bytes(path) -> list[tuple[str, int]]:
    """(name, bytes) of every initializer and Constant tensor in an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = [(init.name, init.ByteSize()) for init in model.graph.initializer]
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                found.append((f"{node.name}.{attribute.name}", attribute.t.ByteSize()))
    return found


def test_every_weight_is_stored_once(bundle_v2_dir):
    manifest = _manifest(bundle_v2_dir)
    assert manifest["format_version"] == 2
    weights = manifest["weights"]
    names = weights["parameters"] + weights["running_stats"]
    # The store holds each model tensor exactly once ...
    per_tensor = store_bytes_per_tensor(bundle_v2_dir / STORE_FILE)
    assert sorted(per_tensor) == sorted(names)
    store_bytes = (bundle_v2_dir / STORE_FILE).stat().st_size
    assert store_bytes == manifest["files"][STORE_FILE]["bytes"] == weights["bytes"]
    # ... as active values plus one bit per masked weight, not densely.
    dense, masks = read_weights(bundle_v2_dir / STORE_FILE)
    active = sum(int(m.sum()) for m in masks.values())
    masked_total = sum(m.size for m in masks.values())
    unmasked = sum(dense[n].nbytes for n in names if n not in masks)
    assert sum(per_tensor.values()) <= 4 * active + sum((m.size + 7) // 8 for m in masks.values()) + unmasked
    assert masked_total > 5 * active   # the fixture is sparse: a dense copy would show here
    # ... and no other file of the bundle bears a weight: the graphs only hold small constants.
    weight_bytes_elsewhere = 0
    for rel in manifest["files"]:
        if rel == STORE_FILE:
            continue
        assert rel.endswith(".onnx"), f"{rel}: only the store and graphs belong in a format-2 bundle"
        for name, size in _graph_tensor_bytes(bundle_v2_dir / rel):
            assert name not in names, f"{rel} embeds the model tensor {name}"
            if size > LARGEST_GRAPH_TENSOR:
                weight_bytes_elsewhere += size
    assert weight_bytes_elsewhere == 0
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    assert total - store_bytes == sum((bundle_v2_dir / rel).stat().st_size for rel in manifest["files"]
                                      if rel != STORE_FILE)


def test_store_matches_the_blocks_and_every_boundary_has_ort_artifacts(bundle_v2_dir):
    manifest = _manifest(bundle_v2_dir)
    blocks = manifest["blocks"]
    assert [b["index"] for b in blocks] == list(range(len(manifest["model"]["blocks"])))
    in_blocks = [n for b in blocks for n in b["parameters"] + b["running_stats"]]
    assert sorted(in_blocks) == sorted(manifest["weights"]["parameters"] + manifest["weights"]["running_stats"])
    for block in blocks:
        assert set(block["masks"]) <= set(block["parameters"])
        assert block["parity"]["grads_rel"] <= 1e-3 and block["parity"]["infer_rel"] <= 1e-4
    assert [b["k"] for b in manifest["ort_training"]] == [b["index"] for b in blocks]
    assert manifest["parity"]["chain_logits_max_abs"] <= 1e-4
    assert manifest["parity"]["ort_loss_rel"] <= 1e-4


def test_export_lowers_each_block_structure_once(bundle_v2_dir):
    """resnet32 has 17 blocks of 7 structures: 4 lowerings per structure, not per stage x depth."""
    blocks = _manifest(bundle_v2_dir)["blocks"]
    programs = {b["train"] for b in blocks}
    lowered = int((bundle_v2_dir.parent / "lowered.txt").read_text())
    assert len(programs) == 7
    assert lowered == 4 * len(programs)


def _toy(num_classes: int = 10, width=None, cifar_stem: bool = True):
    from spfde_edge.models import BlockModel

    def conv(i, o, stride):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    return BlockModel("toy3", [("stem", conv(3, 4, 1)), ("down", conv(4, 8, 2)), ("head", head)], num_classes)


def test_toy_export_cost_is_per_block(tmp_path, monkeypatch):
    from spfde_edge import models
    from spfde_edge.export import ExportOptions, export_bundle

    monkeypatch.setitem(models._REGISTRY, "toy3", _toy)
    with count_lowerings() as lowered:
        out = export_bundle(ExportOptions(model="toy3", input_size=8, batch_size=4, epochs=4, delta_tau=1,
                                          out=str(tmp_path / "toy"), bundle_format=2), log=lambda line: None)
    manifest = _manifest(out)
    assert len(manifest["blocks"]) == 3 and len({b["train"] for b in manifest["blocks"]}) == 3
    assert lowered[0] == 4 * 3
    assert len(manifest["ort_training"]) == 3


def test_format_2_options_are_checked():
    from spfde_edge.export import BundleError, ExportOptions

    with pytest.raises(BundleError, match="--bundle-format must be 1 or 2"):
        ExportOptions(model="resnet32", bundle_format=3).validate()
    with pytest.raises(BundleError, match="add --bundle-format 1"):
        ExportOptions(model="resnet32", stages="3-5").validate()     # format 2 is the default
    with pytest.raises(BundleError, match="drop --no-step-graph"):
        ExportOptions(model="resnet32", step_graph=False).validate()
    assert ExportOptions(model="resnet32", stages="3-5", bundle_format=1, step_graph=False).validate()


def test_inspect_shows_the_store_and_every_block(bundle_v2_dir):
    result = subprocess.run([sys.executable, "-m", "spfde_edge.export", "--inspect", str(bundle_v2_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "format 2, 17 blocks" in out and STORE_FILE in out
    for name in ("stem", "layer2.0", "layer3.4", "head"):
        assert f" {name} " in out


def test_masked_weights_are_exact_zeros_in_the_store(bundle_v2_dir):
    dense, masks = read_weights(bundle_v2_dir / STORE_FILE)
    assert masks
    for name, mask in masks.items():
        assert not np.any(dense[name][mask == 0]), name


def test_relu6_gradient_at_a_constant_batchnorm_channel(tmp_path):
    """A depthwise channel whose weights are all masked is constant, its BatchNorm output sits
    exactly at ReLU6's lower bound, and PyTorch passes no gradient there. The ONNX translation of
    hardtanh_backward did (mobilenet_v2's blocks: parameter gradients 1e2-1e3 off); the block
    programs use PyTorch's rule, and no broadcast ``Where`` is left in them (graph_rewrites.py)."""
    import onnx
    import torch

    from spfde_edge.export.block_bundle import check_block
    from spfde_edge.export.block_programs import export_block

    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(12, 12, 3, 1, 1, groups=12, bias=False),
                                                       nn.BatchNorm2d(12), nn.ReLU6(inplace=True))])

    torch.manual_seed(0)
    model = OneBlock().eval()
    with torch.no_grad():
        model.blocks[0][0].weight[::3] = 0          # channels 0, 3, 6, 9 fully masked
    x = torch.randn(8, 12, 8, 8)
    programs = export_block(model, 0, x, tmp_path / "block")
    parity = check_block(model, programs, x, seed=0)
    assert parity["grads_rel"] < 1e-4 and parity["grad_input_rel"] < 1e-4, parity
    for kind in ("train", "backward", "infer"):
        assert not [n for n in onnx.load(programs.path(kind)).graph.node if n.op_type == "Where"], kind
