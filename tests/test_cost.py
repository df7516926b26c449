"""Cost model: hand counts on a 2-block CNN, FlopCounterMode parity, autograd parity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spfde_edge import cost
from spfde_edge.models import BlockModel, create_model


def tiny_net() -> BlockModel:
    """conv 3->4 (3x3) + BN + ReLU | conv 4->2 (1x1, bias) + ReLU; input 3x4x4."""
    return BlockModel("tiny", [
        ("stem", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                               nn.ReLU())),
        ("head", nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU())),
    ], num_classes=2)


@pytest.fixture(scope="module")
def tiny() -> cost.ModelProfile:
    return cost.profile_model(tiny_net(), (3, 4, 4))


@pytest.fixture(scope="module")
def resnet() -> tuple[BlockModel, cost.ModelProfile]:
    model = create_model("resnet32", width=0.5)
    return model, cost.profile_model(model)


def test_tiny_layers_by_hand(tiny):
    # conv0: out 4x4x4 = 64, 2 * 64 * 3 * 3 * 3 = 3456; conv1: out 2x4x4 = 32, 2 * 32 * 4 = 256.
    assert tiny.layers == (
        cost.LayerProfile("blocks.0.0.weight", 0, 3456, 108, 48, 64, True),
        cost.LayerProfile("blocks.1.0.weight", 1, 256, 8, 64, 32, True),
    )


def test_tiny_blocks_by_hand(tiny):
    # Block 0 stores the image (48) and the BN input (64); its ReLU output (64) is conv1's
    # input and is counted once, in block 1, with block 1's ReLU output (32).
    assert [(b.activation_numel, b.output_numel, b.peak_activation_numel, b.param_numel)
            for b in tiny.blocks] == [(112, 64, 64, 116), (96, 32, 32, 10)]


@pytest.mark.parametrize("num_frozen, expected", [
    (0, (3712, 256, 3712, 7680)),   # conv0 reads the image: no input gradient
    (1, (3712, 0, 256, 3968)),      # conv1 reads the first trainable block's input
    (2, (3712, 0, 0, 3712)),
])
def test_tiny_flops_by_hand(tiny, num_frozen, expected):
    flops = cost.training_flops_per_sample(tiny, {}, num_frozen)
    assert (flops.forward, flops.backward_input, flops.backward_weight, flops.total) == expected
    assert sum(b.total for b in flops.per_block) == flops.total


def test_tiny_sparse_flops_by_hand(tiny):
    flops = cost.training_flops_per_sample(tiny, {"blocks.1.0.weight": 0.5}, 0)
    assert (flops.forward, flops.backward_input, flops.backward_weight) == (3584, 128, 3584)


@pytest.mark.parametrize("num_frozen, densities, expected", [
    # weights (108 + 8 + 8 + 2) * 4; activations 208 * 2 * 4; act grads 2 * 64 * 2 * 4.
    (0, {}, (504, 1664, 504, 1024)),
    # frozen block 0: block 1 stores 96, plus block 0's output 64; grads of conv1 + bias.
    (1, {}, (504, 1280, 40, 512)),
    # conv0 at density 0.5: 54 nonzeros * (4 + 2) B + the other 18 params * 4 B.
    (0, {"blocks.0.0.weight": 0.5}, (396, 1664, 288, 1024)),
])
def test_tiny_memory_by_hand(tiny, num_frozen, densities, expected):
    memory = cost.training_memory_bytes(tiny, densities, num_frozen, batch_size=2)
    parts = (memory.weights_bytes, memory.activations_bytes, memory.weight_grads_bytes,
             memory.activation_grads_bytes)
    assert parts == expected
    assert memory.total_bytes == sum(expected)


@pytest.mark.parametrize("name, width", [
    ("resnet32", 0.5), ("resnet18", 0.25), ("mobilenet_v2", 0.35),
    # the contract table's library models (tests/test_model_contract.py): grouped and
    # depthwise convolutions, squeeze-and-excitation, channel shuffles
    ("torchvision:mobilenet_v3_small", 0.5), ("torchvision:efficientnet_b0", None),
    ("torchvision:shufflenet_v2_x1_0", None), ("torchvision:regnet_y_400mf", None),
    ("torchvision:squeezenet1_1", None), ("torchvision:resnet50", None),
    ("timm:mobilenetv3_small_100", None), ("timm:efficientnet_lite0", None),
    ("docs/examples/tiny_cnn.py:tiny_cnn", None)])
def test_forward_flops_match_flop_counter(name, width, monkeypatch):
    from spfde_edge import user_models

    if name.startswith("timm:"):
        pytest.importorskip("timm")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    user_models.allow(name)
    model = create_model(name, width=width)
    profile = cost.profile_model(model, (3, 32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert profile.forward_flops == counter.get_total_flops()
    assert cost.training_flops_per_sample(profile, {}, 0).forward == counter.get_total_flops()


def test_profile_restores_training_mode():
    model = tiny_net().train()
    cost.profile_model(model, (3, 4, 4))
    assert model.training


def test_densities_scale_flops(resnet):
    _, profile = resnet
    dense = cost.dense_train_flops_per_sample(profile)
    densities = {layer.name: 0.25 for layer in profile.layers}
    sparse = cost.training_flops_per_sample(profile, densities, 0)
    assert sparse.forward == pytest.approx(0.25 * dense.forward)
    assert sparse.backward_input == pytest.approx(0.25 * dense.backward_input)
    assert sparse.backward_weight == pytest.approx(0.25 * dense.backward_weight)


def test_frozen_blocks_have_no_backward(resnet):
    _, profile = resnet
    flops = cost.training_flops_per_sample(profile, {}, 5)
    for index, block in enumerate(flops.per_block):
        if index < 5:
            assert block.backward_input == block.backward_weight == 0
        else:
            assert block.backward_weight == block.forward > 0
        assert block.forward > 0


@pytest.mark.parametrize("num_frozen", [0, 1, 6, 16])
def test_input_gradient_rule_matches_autograd(resnet, num_frozen):
    """A layer gets an input gradient exactly when autograd would compute one."""
    model, profile = resnet
    needs_grad: list[bool] = []
    hooks = [m.register_forward_hook(lambda m, args, out: needs_grad.append(args[0].requires_grad))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.freeze_prefix(num_frozen)
        model.train()(torch.zeros(2, 3, 32, 32))
    finally:
        for hook in hooks:
            hook.remove()
        model.freeze_prefix(0)
    flops = cost.training_flops_per_sample(profile, {}, num_frozen)
    counted = [layer.forward_flops for layer, grad in zip(profile.layers, needs_grad) if grad]
    assert flops.backward_input == sum(counted)


def test_shortcut_and_head_read_block_input(resnet):
    _, profile = resnet
    reads = {layer.name for layer in profile.layers if layer.reads_block_input}
    assert {"blocks.6.conv1.weight", "blocks.6.downsample.0.weight",
            "blocks.16.2.weight"} <= reads   # head: Linear after pool + flatten
    assert "blocks.6.conv2.weight" not in reads


def test_freezing_and_sparsity_reduce_memory(resnet):
    _, profile = resnet
    dense = cost.training_memory_bytes(profile, {}, 0, batch_size=8)
    frozen = cost.training_memory_bytes(profile, {}, 6, batch_size=8)
    sparse = cost.training_memory_bytes(
        profile, {layer.name: 0.1 for layer in profile.layers}, 0, batch_size=8)
    assert frozen.activations_bytes < dense.activations_bytes
    assert frozen.weight_grads_bytes < dense.weight_grads_bytes
    assert frozen.weights_bytes == dense.weights_bytes
    assert sparse.weights_bytes < 0.2 * dense.weights_bytes


def test_unknown_layer_and_bad_block_count_raise(tiny):
    with pytest.raises(cost.CostError, match="blocks.0.0.weight"):
        cost.training_flops_per_sample(tiny, {"conv.weight": 0.5}, 0)
    with pytest.raises(cost.CostError, match="0..2"):
        cost.training_memory_bytes(tiny, {}, 3, batch_size=1)
