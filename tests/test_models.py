"""The model contract: ordered freezing blocks, prefix/suffix split, freezing semantics."""
import pytest
import torch
import torchvision

from spfde_edge.models import ModelError, available_models, create_model

TINY = {"resnet32": 0.25, "resnet18": 0.125, "mobilenet_v2": 0.25}


@pytest.mark.parametrize("name", sorted(TINY))
def test_split_composes_to_the_whole_model(name):
    model = create_model(name, num_classes=7, width=TINY[name]).eval()
    x = torch.randn(2, 3, 16, 16)
    full = model(x)
    assert full.shape == (2, 7)
    n = len(model.blocks)
    for k in sorted({0, 1, n // 2, n - 1, n}):
        prefix, suffix = model.split(k)
        assert torch.allclose(suffix(prefix(x)), full, atol=1e-5)


def test_registry_lists_the_paper_models_and_rejects_others():
    assert {"resnet32", "resnet18", "mobilenet_v2"} <= set(available_models())
    with pytest.raises(ModelError, match="resnet32"):
        create_model("vgg99")


def test_resnet18_matches_torchvision_layout():
    ours = create_model("resnet18", num_classes=10, cifar_stem=False)
    ref = torchvision.models.resnet18(num_classes=10)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    assert ours.block_names[0] == "stem" and ours.block_names[-1] == "head"
    assert len(ours.blocks) == 10


def test_resnet32_blocks_and_default_width():
    model = create_model("resnet32")
    assert len(model.blocks) == 17  # stem + 15 basic blocks + head
    assert model.blocks[0][0].out_channels == 32  # 2x wide (SpFDE default)


def test_frozen_prefix_gets_no_gradient_and_keeps_bn_statistics():
    model = create_model("resnet32", width=0.25)
    model.freeze_prefix(3)
    model.train()
    bn = model.blocks[1].bn1
    before = bn.running_mean.clone()
    loss = model(torch.randn(4, 3, 16, 16)).sum()
    loss.backward()
    assert all(p.grad is None for b in model.blocks[:3] for p in b.parameters())
    assert all(p.grad is not None for p in model.blocks[3].parameters())
    assert torch.equal(before, bn.running_mean)
    assert not model.blocks[2].training and model.blocks[3].training
