"""Every supported model through the whole product: 1 host epoch -> export -> device steps on
both suffix backends. Adding a row to MODELS is the only step to test a new model.

Each row is checked by the export's own parity (every block's programs against float64
PyTorch, the chained blocks against the model's logits, one ONNX Runtime training step) and
then on the device: the same run on the block chain (plain onnxruntime) and on the ORT
training build must agree, and no masked weight may come back non-zero.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_device_runner import run_cli

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    model: str
    width: float | None = None
    needs: str | None = None      # an optional package the row needs (skipped without it)

    @property
    def id(self) -> str:
        return self.model.rsplit("/", 1)[-1]


MODELS = [
    Row("docs/examples/tiny_cnn.py:tiny_cnn"),
    Row("mobilenet_v2", width=0.25),
    Row("torchvision:mobilenet_v3_small", width=0.5),
    Row("torchvision:efficientnet_b0"),
    Row("torchvision:shufflenet_v2_x1_0"),
    Row("torchvision:regnet_y_400mf"),
    Row("torchvision:squeezenet1_1"),
    Row("torchvision:resnet50"),
    Row("timm:mobilenetv3_small_100", needs="timm"),
    Row("timm:efficientnet_lite0", needs="timm"),
]


def _host_epoch(row: Row, out: Path) -> None:
    from spfde_edge import train

    args = ["--model", row.model, "--dataset", "synthetic", "--synthetic-size", "64", "--epochs", "1",
            "--batch-size", "16", "--sparsity", "0.8", "--lr", "0.01", "--no-augment", "--threads", "2",
            "--out", str(out)]
    if row.width is not None:
        args += ["--width", str(row.width)]
    assert train.main(args) == 0


def _export(row: Row, run: Path, bundle: Path) -> dict:
    from spfde_edge.export.__main__ import main as export_main

    assert export_main(["--checkpoint", str(run), "--model", row.model, "--batch-size", "8",
                        "--out", str(bundle)]) == 0
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("row", MODELS, ids=[r.id for r in MODELS])
def test_model_trains_exports_and_trains_on_the_device(row, tmp_path):
    if row.needs:
        pytest.importorskip(row.needs)
    pytest.importorskip("onnxruntime.training")
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    _host_epoch(row, run)
    manifest = _export(row, run, bundle)
    assert manifest["format_version"] == 2
    assert manifest["model"]["name"] == row.model
    blocks = len(manifest["blocks"])
    # two boundaries: the last two blocks before the head train, then the last one alone
    stages = f"{blocks - 3},{blocks - 2}"
    results = {}
    for backend in ("onnxruntime", "onnxruntime-training"):
        out = tmp_path / backend
        result = run_cli(["--bundle", str(bundle), "--profile", "generic-x86", "--data", "digits",
                          "--max-per-class", "10", "--epochs", "2", "--stages", stages, "--freeze-at", "1",
                          "--batch-size", "16", "--lr", "0.01", "--suffix-backend", backend,
                          "--out", str(out)], timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[backend] = [line for line in lines if line["type"] == "epoch"]
    chain, ort = results["onnxruntime"], results["onnxruntime-training"]
    assert [e["stage"] for e in chain] == [e["stage"] for e in ort] == [blocks - 3, blocks - 2]
    for a, b in zip(chain, ort):
        assert a["masked_nonzero"] == 0 and b["masked_nonzero"] == 0
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-3 * abs(a["val_loss"]) + 1e-5, (row.model, a, b)


def test_library_models_compute_their_library_forward():
    """The derived blocks are checked against the library's forward when built (model_zoo);
    a layout that skips a module is refused, not trained."""
    import torch
    from torch import nn

    from spfde_edge.model_zoo import LAYOUTS, Layout, blocks_from_layout, check_same_function
    from spfde_edge.models import BlockModel, ModelError, create_model

    model = create_model("torchvision:mobilenet_v3_small", num_classes=7, width=0.5)
    assert model.block_names[0] == "features.0" and model.block_names[-1] == "head"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.source_names["blocks.0.0.weight"] == "features.0.0.weight"
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=7, width_mult=0.5).eval()
    broken = Layout(LAYOUTS[("torchvision", "MobileNetV3")].body, ("avgpool", "flatten"))  # no classifier
    blocks = blocks_from_layout(net, broken, "x")
    with pytest.raises(ModelError, match="output"):
        check_same_function(net, BlockModel("x", blocks, 7), "x", 32)
    assert isinstance(blocks[-1][1], nn.Sequential)


@pytest.mark.parametrize("name, message", [
    ("torchvision:vit_b_16", "a family without a block layout"),
    ("torchvision:no_such_net", "torchvision has no classification model 'no_such_net'"),
    ("timm:no_such_net", "timm has no model 'no_such_net'"),
    ("nosuchpkg_xyz.mod:build", "cannot import nosuchpkg_xyz.mod"),
    ("docs/examples/tiny_cnn.py:missing", "has no callable 'missing'"),
    ("docs/examples/nothing.py:build", "no file docs/examples/nothing.py"),
    ("resnet99", "unknown model 'resnet99'"),
])
def test_model_names_that_cannot_build_are_refused(name, message, monkeypatch):
    from spfde_edge import user_models
    from spfde_edge.models import ModelError, create_model

    if name.startswith("timm:"):
        pytest.importorskip("timm")
    monkeypatch.chdir(REPO)
    user_models.allow(name)
    with pytest.raises(ModelError, match=message):
        create_model(name, num_classes=10)


def test_user_model_contract_errors(tmp_path, monkeypatch):
    from spfde_edge import user_models
    from spfde_edge.models import ModelError, create_model

    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def plain(num_classes=10):\n    return nn.Linear(3, num_classes)\n"
        "def no_classes():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3, 10))\n"
        "def wrong_logits(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))\n"
        "def not_a_module(num_classes=10):\n    return 3\n"
        "class Split(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n"
        "    def forward(self, x):\n        return self.b(self.a(x).relu())\n"
        "    def spfde_blocks(self):\n        return [('a', self.a), ('b', self.b)]\n")
    monkeypatch.chdir(tmp_path)
    cases = {"nets.py:plain": "without freezing blocks", "nets.py:no_classes": "must accept num_classes",
             "nets.py:wrong_logits": r"returns \(2, 4\) for 2 images, not \(2, 10\)",
             "nets.py:not_a_module": "returned int, not a torch.nn.Module",
             "nets.py:Split": "do not compute its forward"}   # forward has a relu the blocks lack
    for name, message in cases.items():
        user_models.allow(name)
        with pytest.raises(ModelError, match=message):
            create_model(name, num_classes=10)


def test_user_code_is_imported_only_when_named_on_the_command_line(tmp_path, monkeypatch):
    """A checkpoint that names a module never imports it by itself (its code would run)."""
    from spfde_edge.models import ModelError, create_model

    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                      "def build(num_classes=10):\n    raise SystemExit\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="pass --model evil.py:build to import its code"):
        create_model("evil.py:build", num_classes=10)
    assert not marker.exists()


def test_export_of_a_checkpoint_naming_user_code_needs_model(tmp_path, monkeypatch, capsys):
    """The CLI path: a run of a user model exports only with --model NAME given again."""
    import torch

    from spfde_edge.export.__main__ import main as export_main

    run = tmp_path / "run"
    (tmp_path / "cnn.py").write_text((REPO / "docs/examples/tiny_cnn.py").read_text())
    monkeypatch.chdir(tmp_path)
    from spfde_edge import train

    assert train.main(["--model", "cnn.py:tiny_cnn", "--dataset", "synthetic", "--synthetic-size", "32",
                       "--epochs", "1", "--batch-size", "16", "--out", str(run)]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["model"] = "cnn2.py:tiny_cnn"   # as a crafted checkpoint would
    (tmp_path / "cnn2.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "pass --model cnn2.py:tiny_cnn to import its code" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


GROUPNORM_NET = (
    "from torch import nn\n"
    "def gn(num_classes=10):\n"
    "    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.GroupNorm(2, 8), nn.ReLU()),\n"
    "                         nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()),\n"
    "                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)))\n")


@pytest.mark.slow
def test_a_layer_without_an_ort_gradient_is_named_and_the_block_chain_still_trains(tmp_path, monkeypatch, capsys):
    """GroupNorm: ONNX Runtime training 1.19 has no gradient for InstanceNormalization. The export
    says so in one line naming the operator and the block; --no-ort-training exports the block
    programs alone, which the device trains (and the ORT training backend is refused by name)."""
    from spfde_edge.export.__main__ import main as export_main

    (tmp_path / "nets.py").write_text(GROUPNORM_NET)
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundle"
    assert export_main(["--model", "nets.py:gn", "--out", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "no gradient for InstanceNormalization in block 0" in line and "--no-ort-training" in line
    assert not bundle.exists()
    assert export_main(["--model", "nets.py:gn", "--out", str(bundle), "--no-ort-training"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["ort_training"] == []
    ok = run_cli(["--bundle", str(bundle), "--profile", "generic-x86", "--data", "digits", "--max-per-class", "10",
                  "--epochs", "1", "--out", str(tmp_path / "dev")])
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = run_cli(["--bundle", str(bundle), "--profile", "generic-x86", "--data", "digits", "--epochs", "1",
                       "--suffix-backend", "onnxruntime-training", "--out", str(tmp_path / "dev2")])
    assert refused.returncode == 2 and "no ORT training artifacts" in refused.stderr


SHARED_BATCHNORM_NET = (
    "import torch\n"
    "from torch import nn\n"
    "class Twice(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.conv, self.bn = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)\n"
    "    def forward(self, x):\n"
    "        return torch.relu(self.bn(self.conv(self.bn(x))))\n"
    "def twice(num_classes=10):\n"
    "    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()), Twice(),\n"
    "                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)))\n")


def test_a_batchnorm_called_twice_is_refused_naming_it_and_its_block(tmp_path, monkeypatch, capsys):
    """ORT training artifacts move each BatchNorm's statistics once per step: a BatchNorm the
    forward calls twice is refused in one line naming the layer and the block."""
    from spfde_edge.export.__main__ import main as export_main

    (tmp_path / "nets.py").write_text(SHARED_BATCHNORM_NET)
    monkeypatch.chdir(tmp_path)
    assert export_main(["--model", "nets.py:twice", "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err[-2000:]
    assert "BatchNorm blocks.1.bn is called twice" in err and "in block 1 (1)" in err and "--no-ort-training" in err
    assert not (tmp_path / "bundle").exists()


def test_no_ort_training_is_a_format_2_option():
    from spfde_edge.export import BundleError, ExportOptions

    with pytest.raises(BundleError, match="--no-ort-training applies to format 2"):
        ExportOptions(model="resnet32", bundle_format=1, ort_training=False).validate()


@pytest.mark.parametrize("name, folder", [
    ("resnet18", "resnet18"), ("torchvision:mobilenet_v3_small", "mobilenet_v3_small"),
    ("timm:efficientnet_lite0", "efficientnet_lite0"), ("nets/tiny.py:tiny_cnn", "tiny-tiny_cnn"),
    ("my.pkg.nets:build", "my.pkg.nets-build")])
def test_default_folders_are_plain_names(name, folder):
    """export/<folder> and runs/<folder>-<dataset>: no colon or slash from the model name."""
    from spfde_edge.models import folder_name

    assert folder_name(name) == folder


def test_short_runs_of_slow_batchnorm_models_are_warned_and_can_set_the_momentum(tmp_path, capsys):
    """torchvision's MobileNetV3 moves BatchNorm statistics with momentum 0.01: in a short run
    they lag the weights and eval-mode accuracy collapses to chance (measured: 10 % held out
    after 8 epochs on CIFAR-10 JPEGs, 26 % in train mode). The trainer says so, and
    --bn-momentum sets it for the host, the bundle and the device alike."""
    from spfde_edge import train
    from spfde_edge.models import create_model, slowest_bn_momentum

    assert slowest_bn_momentum(create_model("torchvision:mobilenet_v3_small", width=0.5)) == 0.01
    assert slowest_bn_momentum(create_model("torchvision:mobilenet_v3_small", width=0.5, bn_momentum=0.1)) == 0.1
    common = ["--model", "torchvision:mobilenet_v3_small", "--width", "0.5", "--dataset", "synthetic",
              "--synthetic-size", "32", "--epochs", "1", "--batch-size", "16"]
    assert train.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "--bn-momentum 0.1" in capsys.readouterr().err
    assert train.main([*common, "--bn-momentum", "0.1", "--out", str(tmp_path / "b")]) == 0
    assert "--bn-momentum" not in capsys.readouterr().err
    assert train.main([*common, "--bn-momentum", "1.5", "--out", str(tmp_path / "c")]) == 2
    assert "--bn-momentum must be in (0, 1)" in capsys.readouterr().err


def test_parity_allowance_applies_only_to_tensors_with_a_float32_record():
    """The float32 allowance (``*_excess`` <= 1) relaxes the keys it was computed for, never
    the chained logits or the ORT loss."""
    from spfde_edge.export.block_bundle import _check
    from spfde_edge.export.parity import ParityError

    _check("ok", {"grads_rel": 0.5, "grads_excess": 0.9})
    for bad in ({"grads_rel": 0.5, "grads_excess": 1.5}, {"grads_rel": 0.5},
                {"chain_logits_max_abs": 0.5}, {"ort_loss_rel": 0.5, "ort_grads_excess": 0.1}):
        with pytest.raises(ParityError):
            _check("block 0", bad)
