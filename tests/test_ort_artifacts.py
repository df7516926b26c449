"""Bundle v2 ORT training graphs: one lowering, every boundary, no weights; device checkpoints.

A resnet32 at width 0.25 on 16x16 inputs is exported for all 17 boundaries once per module.
For the first and a middle boundary the device's path is replayed: checkpoint written by
``write_checkpoint`` (torch-free) from the PyTorch model's arrays, masked weights exact zeros,
loaded through ``onnxruntime.capi._pybind_state`` as device_runner/backends/ort_training.py
does; one train step and one eval step against a float64 PyTorch reference.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnxruntime.training")
import onnx  # noqa: E402

from device_runner.backends.ort_checkpoint import C, write_checkpoint  # noqa: E402
from spfde_edge.export.ort_artifacts import GRAPH_FILES, export_training_artifacts  # noqa: E402
from spfde_edge.export.suffix import TrainableSuffix  # noqa: E402
from spfde_edge.models import create_model, prunable_layers  # noqa: E402

SIZE, BATCH = 16, 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet32", width=0.25)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # Non-trivial BatchNorm state, so eval mode really uses the running statistics.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
                module.running_mean.normal_(0.0, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        # 80 % sparse masks; masked weights stored as exact zeros (the v2 weight store).
        masks = {}
        for name, layer in prunable_layers(model):
            mask = torch.rand(layer.weight.shape, generator=generator) >= 0.8
            layer.weight.mul_(mask)
            masks[f"{name}.weight"] = mask
    model.eval()
    folder = tmp_path_factory.mktemp("ort_v2")
    boundaries = list(range(len(model.blocks)))
    artifacts = export_training_artifacts(model, boundaries, torch.randn(2, 3, SIZE, SIZE), folder)
    return model, masks, folder, artifacts


def _norm_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b)) / max(float(np.linalg.norm(b)), 1e-300)


def test_every_boundary_named_like_the_model(exported):
    model, _, _, artifacts = exported
    assert sorted(artifacts) == list(range(len(model.blocks)))
    params = [n for n, _ in model.named_parameters()]
    # onnxblock's name counter is reset per boundary: the same loss name everywhere.
    assert len({art.training_outputs[0] for art in artifacts.values()}) == 1
    for k, art in artifacts.items():
        assert sorted(art.parameters) == sorted(n for n in params if int(n.split(".")[1]) >= k)
        assert set(art.frozen) == {row[key] for row in art.batchnorms for key in ("running_mean", "running_var")}
        assert all(int(row["name"].split(".")[1]) >= k for row in art.batchnorms)
        assert art.training_outputs[1] == "logits" and len(art.training_outputs) == 2 + 2 * len(art.batchnorms)
        assert art.eval_outputs == art.training_outputs[:2]
        inputs = [i.name for i in onnx.load(str(art.training_model), load_external_data=False).graph.input]
        assert inputs[0] == "features" and set(art.parameters + art.frozen) <= set(inputs)


def test_artifacts_hold_no_weights(exported):
    _, _, folder, artifacts = exported
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files and all(p.name in GRAPH_FILES for p in files), [p.name for p in files]
    assert len(files) == 3 * len(artifacts)
    for path in files:
        model = onnx.load(str(path), load_external_data=False)
        for init in model.graph.initializer:
            assert init.data_location != onnx.TensorProto.EXTERNAL, (path, init.name)
            assert init.ByteSize() <= 1024, (path, init.name, init.ByteSize())
        for node in model.graph.node:
            for attribute in node.attribute:
                assert attribute.t.ByteSize() <= 1024, (path, node.name)


@pytest.mark.parametrize("k", [0, 8])   # the first boundary and one in the middle
def test_device_checkpoint_matches_pytorch(exported, tmp_path, k):
    model, masks, _, artifacts = exported
    art = artifacts[k]
    state = {n: t.detach().numpy() for n, t in model.state_dict().items()}
    for name in masks:   # the device's arrays: masked weights are exact zeros
        assert np.all(state[name][~masks[name].numpy()] == 0)
    path = tmp_path / "checkpoint"
    write_checkpoint(path, {n: state[n] for n in art.parameters}, {n: state[n] for n in art.frozen})
    assert not list(art.folder.glob("checkpoint*"))

    checkpoint = C.load_checkpoint(os.fspath(path))
    device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    options = C.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    module = C.Module(os.fspath(art.training_model), checkpoint, os.fspath(art.eval_model), device, options)

    generator = torch.Generator().manual_seed(10 + k)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, model.num_classes, (BATCH,), generator=generator)
    with torch.no_grad():
        features = nn.Sequential(*model.blocks[:k]).eval()(images)
    reference = TrainableSuffix(model, k, masks={}).double()
    feeds = [np.ascontiguousarray(features.numpy()), labels.numpy().astype(np.int64)]

    # Eval first: ORT 1.19's training BatchNorm moves the checkpoint's running statistics.
    fetches = C.OrtValueVector()
    module.eval_step(feeds, fetches)
    reference.eval()
    with torch.no_grad():
        expected_logits = reference(features.double())[0].numpy()
    assert np.abs(fetches[1].numpy() - expected_logits).max() <= 1e-4

    fetches = C.OrtValueVector()
    module.lazy_reset_grad()
    module.train_step(feeds, fetches)
    loss = float(fetches[0].numpy())
    reference.train()
    outputs = reference(features.double())
    expected = F.cross_entropy(outputs[0], labels)
    expected.backward()
    assert abs(loss - expected.item()) / abs(expected.item()) <= 1e-4
    stat_at = {name: i for i, name in enumerate(art.training_outputs)}
    for row, (mean, var) in zip(reference.batchnorm_table(), zip(outputs[1::2], outputs[2::2])):
        assert _norm_rel(fetches[stat_at[row["batch_mean_output"]]].numpy(), mean.detach().numpy()) <= 1e-4
        assert _norm_rel(fetches[stat_at[row["batch_var_output"]]].numpy(), var.detach().numpy()) <= 1e-4
    grads = dict(reference.named_parameters())
    worst = {}
    for name in art.parameters:
        grad = checkpoint.get_parameter(name).grad
        assert grad.has_value(), name
        worst[name] = _norm_rel(grad.numpy(), grads[name].grad.numpy())
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda item: -item[1])[:3]


def test_write_checkpoint_needs_the_training_build(tmp_path, monkeypatch):
    import types

    import device_runner.backends.ort_checkpoint as ort_checkpoint
    from device_runner.errors import BundleError

    monkeypatch.setattr(ort_checkpoint, "C", types.SimpleNamespace())   # the inference build's capi
    with pytest.raises(BundleError, match="no training support"):
        write_checkpoint(tmp_path / "checkpoint", {"blocks.0.w": np.zeros(2, np.float32)}, {})
    assert not (tmp_path / "checkpoint").exists()


def test_relu6_with_masked_channels_trains_like_pytorch(tmp_path):
    """mobilenet_v2 at 90 % sparsity: fully masked depthwise channels leave BatchNorm outputs
    exactly at ReLU6's lower bound, where PyTorch passes no gradient. ORT's gradient of one
    ``Clip(0, 6)`` passed it (gradients ~600x off); the artifacts lower ReLU6 as
    ``clamp(relu(x), max=6)`` (suffix.ReluThenClampReLU6)."""
    from spfde_edge.sparsity.masks import MaskSet

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width=0.25)
    MaskSet.random(model, 0.9, "uniform", torch.Generator().manual_seed(1)).apply(model)
    _assert_one_ort_step_like_pytorch(model, tmp_path)


def test_hardswish_and_squeeze_excitation_with_masked_channels_train_like_pytorch(tmp_path):
    """mobilenet_v3_small: ONNX Runtime training has no gradient for HardSwish or HardSigmoid;
    the artifacts build them from Relu and Clip (suffix.ReluClampHardswish/Hardsigmoid),
    whose gradients are PyTorch's, also where fully masked channels sit at a constant."""
    from torch import nn

    from spfde_edge.sparsity.masks import MaskSet

    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10, width=0.5)
    masks = MaskSet.random(model, 0.9, "uniform", torch.Generator().manual_seed(1))
    masks.apply(model)
    dead = [n for n, m in masks.masks.items() if m.dim() == 4 and (m.flatten(1).sum(1) == 0).any()]
    assert dead, "the case needs convolutions with fully masked output channels"
    assert any(isinstance(m, nn.Hardswish) for m in model.modules())
    assert any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    _assert_one_ort_step_like_pytorch(model, tmp_path)


def _assert_one_ort_step_like_pytorch(model, folder):
    """One ORT training step at boundary 0 of ``model`` (dropout off) against float64 PyTorch."""
    from spfde_edge.export.block_bundle import check_boundary
    from spfde_edge.export.source import without_dropout

    without_dropout(model)
    model.eval()
    example = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(3))
    artifacts = export_training_artifacts(model, [0], example, folder)
    parity = check_boundary(model, artifacts[0], example, labels, folder)
    assert parity["ort_loss_rel"] < 1e-4 and parity["ort_grads_rel"] < 1e-3, parity
