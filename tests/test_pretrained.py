"""--init-from: library weight files load by their own names, the head is re-initialised for a
new class count, masks keep the largest weights, and files for another model are refused."""
from __future__ import annotations

import pytest
import torch
import torchvision

from spfde_edge.models import ModelError, create_model
from spfde_edge.pretrained import load_initial_weights
from spfde_edge.sparsity.masks import MaskSet


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A torchvision weights file as torchvision writes it: its own names, 1000 classes."""
    net = torchvision.models.mobilenet_v3_small(num_classes=1000, width_mult=0.5)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_library_weights_load_and_the_head_is_reinitialised(imagenet_file):
    path, library = imagenet_file
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10, width=0.5)
    fresh_head = {n: t.clone() for n, t in model.state_dict().items() if n.startswith(f"blocks.{len(model.blocks) - 1}.")}
    report = load_initial_weights(model, path)
    state = model.state_dict()
    for ours, theirs in model.source_names.items():
        if ours in report.reinitialised:
            assert torch.equal(state[ours], fresh_head[ours])
        else:
            assert torch.equal(state[ours], library[theirs]), ours
    # the last Linear (1000 -> 10 outputs) changed shape: weight and bias re-initialised
    assert len(report.reinitialised) == 2 and all("weight" in n or "bias" in n for n in report.reinitialised)
    assert "head re-initialised" in report.line()


def test_safetensors_and_own_names_load(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet32", num_classes=10, width=0.25)
    path = tmp_path / "w.safetensors"
    save_file({n: t.contiguous() for n, t in source.state_dict().items()}, str(path))
    target = create_model("resnet32", num_classes=10, width=0.25)
    report = load_initial_weights(target, path)
    assert report.reinitialised == []
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


@pytest.mark.parametrize("case, message", [
    ("other_model", "is not for torchvision:mobilenet_v3_small"),
    ("misshapen", "only the head may differ"),
    ("not_weights", "not a weights file"),
    ("missing", "no such file"),
])
def test_wrong_files_are_refused(case, message, imagenet_file, tmp_path):
    path, library = imagenet_file
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10, width=0.5)
    target = tmp_path / "w.pth"
    if case == "other_model":
        torch.save(create_model("resnet32", num_classes=10, width=0.25).state_dict(), target)
    elif case == "misshapen":
        state = dict(library)
        state["features.0.0.weight"] = torch.zeros(3, 3, 3, 3)
        torch.save(state, target)
    elif case == "not_weights":
        target.write_text("not a tensor file")
    with pytest.raises(ModelError, match=message):
        load_initial_weights(model, target)


def test_masks_from_trained_weights_keep_the_largest():
    model = create_model("resnet32", num_classes=10, width=0.25)
    masks = MaskSet.magnitude(model, 0.9, "uniform")
    params = dict(model.named_parameters())
    for name, mask in masks.masks.items():
        magnitude = params[name].detach().abs()
        assert int((~mask).sum()) == masks.target_zeros[name]
        if mask.any() and (~mask).any():
            assert magnitude[mask].min() >= magnitude[~mask].max(), name


def test_training_from_init_from_uses_magnitude_masks(imagenet_file, tmp_path, capsys):
    from spfde_edge import train

    path, _ = imagenet_file
    out = tmp_path / "run"
    assert train.main(["--model", "torchvision:mobilenet_v3_small", "--width", "0.5", "--init-from", str(path),
                       "--dataset", "synthetic", "--synthetic-size", "32", "--epochs", "1", "--batch-size", "16",
                       "--sparsity", "0.8", "--no-augment", "--out", str(out)]) == 0
    assert "head re-initialised" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["init_from"] == str(path)
    # resume does not read the file again (it may be gone): the checkpoint has the weights
    path.rename(path.with_suffix(".moved"))
    try:
        assert train.main(["--resume", str(out), "--epochs", "1"]) == 0
    finally:
        path.with_suffix(".moved").rename(path)


def test_export_from_init_from(imagenet_file, tmp_path):
    """The same on export: a fresh bundle from pretrained weights, masks by magnitude."""
    from spfde_edge.export.pipeline import ExportOptions
    from spfde_edge.export.source import load_source

    path, library = imagenet_file
    source = load_source(ExportOptions(model="torchvision:mobilenet_v3_small", width=0.5, init_from=str(path),
                                       out=str(tmp_path / "b")))
    name = next(n for n in source.masks if n.endswith("weight") and not n.startswith("blocks.13"))
    kept = dict(source.model.named_parameters())[name].detach().abs()[source.masks[name]]
    dropped_theirs = library[source.model.source_names[name]].abs()[~source.masks[name]]
    assert kept.min() >= dropped_theirs.max()
