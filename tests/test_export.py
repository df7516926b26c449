"""Bundle export: parity of every graph against PyTorch, manifest, hashes, errors.

Two small bundles are exported once per session: resnet32 (width 0.25) from a checkpoint
in the trainer's layout, default stages, and a fresh resnet18 (width 0.125), one stage.
Parity tests re-measure on new random data instead of trusting the manifest's numbers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: E402

from spfde_edge.checkpoint import save_checkpoint  # noqa: E402
from spfde_edge.config import TrainConfig  # noqa: E402
from device_runner import manifest as manifest_io  # noqa: E402
from device_runner.bundle import load_bundle  # noqa: E402
from device_runner.files import sha256_file  # noqa: E402
from spfde_edge.export import (BundleError, ExportOptions, ParityError, export_bundle,  # noqa: E402
                               inspect_bundle, load_source)
from spfde_edge.export import pipeline  # noqa: E402
from spfde_edge.export.__main__ import main  # noqa: E402
from spfde_edge.export.prefix import baked_prefix  # noqa: E402
from spfde_edge.export.suffix import TrainableSuffix  # noqa: E402
from spfde_edge.models import create_model  # noqa: E402
from spfde_edge.sparsity.masks import MaskSet  # noqa: E402

BATCH = 8
SIZE = 16
TOL = 1e-4


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    """A resnet32 checkpoint in the trainer's layout: 5 of 16 blocks frozen, 6 planned."""
    config = TrainConfig(model="resnet32", width=0.25, input_size=SIZE, batch_size=BATCH, epochs=40,
                         delta_tau=5, sparsity=0.8, distribution="erk", dst="rigl", freeze_flops=0.2)
    torch.manual_seed(3)
    model = create_model("resnet32", num_classes=10, width=0.25)
    masks = MaskSet.random(model, 0.8, "erk", torch.Generator().manual_seed(1))
    masks.apply(model)
    with torch.no_grad():  # trained-looking BatchNorm, so eval-mode parity means something
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model.freeze_prefix(5)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, {
        "config": config.to_dict(), "model": model.state_dict(), "masks": masks.state_dict(),
        "num_frozen": 5, "epoch": 26,
        "freeze_plan": {"version": 1, "freeze_epochs": [5, 10, 15, 20, 25, 30], "T_frz": 5,
                        "reduction": 0.2},
        "block_names": model.block_names, "classes": [f"c{i}" for i in range(10)],
        "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "input_size": SIZE})
    return path


def _options(name: str, checkpoint: Path, out: Path) -> ExportOptions:
    # The tests below re-measure parity themselves; the export's own steps are kept short.
    # resnet32 leaves out step.onnx (--no-step-graph; its 12-block suffixes take minutes to
    # trace); resnet18 carries it and is checked below.
    if name == "resnet32":
        return ExportOptions(checkpoint=str(checkpoint), out=str(out), batch_size=BATCH, parity_steps=2,
                             step_graph=False, bundle_format=1)
    # uniform: under ERK the narrow early layers of a tiny model come out dense
    return ExportOptions(model="resnet18", width=0.125, input_size=SIZE, batch_size=BATCH,
                         stages="3", sparsity=0.8, distribution="uniform", out=str(out),
                         parity_steps=2, bundle_format=1)


@pytest.fixture(scope="session", params=["resnet32", "resnet18"])
def bundle(request, checkpoint_path, tmp_path_factory):
    """(bundle folder, manifest, export options) exported once per session."""
    out = tmp_path_factory.mktemp("bundles") / request.param
    options = _options(request.param, checkpoint_path, out)
    export_bundle(options, log=_quiet)
    return out, json.loads((out / "manifest.json").read_text()), options


def _source(options: ExportOptions):
    return load_source(options)


def _ort(root: Path, stage: dict):
    suffix = stage["suffix"]
    state = CheckpointState.load_checkpoint(str(root / suffix["checkpoint"]))
    module = Module(str(root / suffix["training_model"]), state, str(root / suffix["eval_model"]))
    return state, module, Optimizer(str(root / suffix["optimizer_model"]), module)


def _batch(stage: dict, seed: int, num_classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(stage["features"]["shape"], generator=generator)
    y = torch.randint(0, num_classes, (x.shape[0],), generator=generator)
    return x, y


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _norm_rel(pairs) -> float:
    diff = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in pairs)
    return (diff / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for _, b in pairs)) ** 0.5


# -- stages and manifest ---------------------------------------------------------------------

def test_default_stages_run_from_frozen_point_to_last_planned(bundle):
    root, manifest, options = bundle
    stages = [s["stage"] for s in manifest["stages"]]
    assert stages == ([5, 6] if options.checkpoint else [3])
    for stage in manifest["stages"]:
        k = stage["stage"]
        assert stage["frozen_blocks"] == [b["name"] for b in manifest["model"]["blocks"][:k]]
        assert (root / f"stage_{k:02d}" / "prefix.pte").is_file()
        step_files = {"step.onnx", "suffix_state.npz"} if options.step_graph else set()
        assert {p.name for p in (root / f"stage_{k:02d}").iterdir()} == {
            "prefix.pte", "prefix.onnx", "training_model.onnx", "eval_model.onnx",
            "optimizer_model.onnx", "checkpoint"} | step_files
        assert stage["suffix"]["backends"] == (["onnxruntime-training", "onnxruntime"] if options.step_graph
                                               else ["onnxruntime-training"])
        assert (stage["suffix"]["step_graph"] is None) == (not options.step_graph)


def test_manifest_matches_schema_and_says_how_to_continue(bundle):
    import jsonschema

    root, manifest, _ = bundle
    schema = json.loads(manifest_io.SCHEMA_PATH.read_text())
    jsonschema.validate(manifest, schema)
    assert manifest["format_version"] == manifest_io.FORMAT_VERSION
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "executorch"}
    assert manifest["model"]["input"]["shape"] == [BATCH, 3, SIZE, SIZE]
    spfde = manifest["spfde"]
    assert spfde["delta_tau"] >= 1 and spfde["lr_schedule"]["type"] == "blockwise_cosine"
    assert spfde["dst"]["lam"] == 1.0  # MEST's λ: TrainConfig has none, so the trainer's default
    for stage in manifest["stages"]:
        flops = stage["flops_per_sample"]
        assert flops["prefix_forward"] > 0 and flops["suffix_backward"] > flops["suffix_forward"] * 0.5
        assert stage["parity"]["masked_nonzero_after_steps"] == 0
        assert stage["bytes"]["sparse_zeros"] > 0


def test_manifest_round_trips_through_the_typed_reader_and_writer(bundle, tmp_path):
    root, manifest, _ = bundle
    typed = manifest_io.read_manifest(root)
    manifest_io.write_manifest(tmp_path, typed)
    assert manifest_io.read_manifest(tmp_path) == typed
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert load_bundle(root).manifest == typed


def _break(path: str, value):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
    return edit


@pytest.mark.parametrize("path, value, where", [
    ("spfde.momentum", "0.9", "spfde.momentum"),
    ("stages.0.features.shape", [], "stages[0].features.shape"),
    ("model.classes", 10, "model.classes"),
    ("spfde.dst.update_every_epochs", 5, "spfde.dst"),   # removed in favour of spfde.delta_tau
])
@pytest.mark.parametrize("bundle", ["resnet18"], indirect=True)  # one bundle is enough
def test_device_refuses_a_manifest_that_breaks_the_schema(bundle, tmp_path, path, value, where):
    _, manifest, _ = bundle
    broken = json.loads(json.dumps(manifest))
    _break(path, value)(broken)
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path)
    message = str(caught.value)
    assert f"schema at {where}:" in message and "re-export" in message and "\n" not in message
    with pytest.raises(BundleError, match="re-export"):  # the host writer refuses it too
        manifest_io.validate(broken)


@pytest.mark.parametrize("bundle", ["resnet32"], indirect=True)  # the checkpoint-sourced bundle
def test_checkpoint_source_carries_schedule_and_classes(bundle):
    _, manifest, options = bundle
    assert options.checkpoint
    assert manifest["model"]["classes"][:2] == ["c0", "c1"]
    assert manifest["model"]["normalization"]["mean"] == [0.49, 0.48, 0.45]
    assert manifest["spfde"]["freezing"]["freeze_epochs"] == [5, 10, 15, 20, 25, 30]
    assert manifest["spfde"]["dst"]["algorithm"] == "rigl"
    assert manifest["source"]["num_frozen"] == 5


def test_onnx_files_load_in_ort_1_19(bundle):
    root, manifest, _ = bundle
    for rel in manifest["files"]:
        if rel.endswith(".onnx"):
            model = onnx.load(root / rel)
            opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            assert model.ir_version <= 10 and opset <= 21, rel
    for stage in manifest["stages"]:
        onnxruntime.InferenceSession(str(root / stage["prefix"]["onnx"]))
        _ort(root, stage)  # training, eval and optimizer graphs with the checkpoint


# -- parity ----------------------------------------------------------------------------------

def test_prefix_pte_and_onnx_match_pytorch(bundle):
    from executorch.runtime import Runtime

    root, manifest, options = bundle
    source = _source(options)
    for stage in manifest["stages"]:
        prefix = baked_prefix(source.model, source.masks, stage["stage"])
        x = torch.randn(stage["prefix"]["input"]["shape"], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = prefix(x).numpy()
        method = Runtime.get().load_program(str(root / stage["prefix"]["pte"])).load_method("forward")
        pte = method.execute([x])[0].numpy()
        session = onnxruntime.InferenceSession(str(root / stage["prefix"]["onnx"]))
        ort = session.run(None, {"input": x.numpy()})[0]
        assert pte.shape == expected.shape == tuple(stage["features"]["shape"])
        assert np.abs(pte - expected).max() <= TOL
        assert np.abs(ort - expected).max() <= TOL


def test_device_runner_prefix_backends_match_pytorch(bundle):
    """The device's own backends (ExecuTorch .pte and ORT .onnx) give the host's features."""
    from device_runner.backends.executorch_prefix import ExecuTorchPrefix
    from device_runner.backends.ort_prefix import OrtPrefix

    root, manifest, options = bundle
    source = _source(options)
    stage = manifest["stages"][-1]
    prefix = baked_prefix(source.model, source.masks, stage["stage"])
    x = torch.randn(stage["prefix"]["input"]["shape"], generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = prefix(x).numpy()
    pte = ExecuTorchPrefix(root / stage["prefix"]["pte"], x.shape[0]).forward(x.numpy())
    ort = OrtPrefix(root / stage["prefix"]["onnx"], threads=1).forward(x.numpy())
    assert np.abs(pte - expected).max() <= TOL
    assert np.abs(ort - expected).max() <= TOL


def test_prefix_has_masks_baked_in(bundle):
    root, manifest, options = bundle
    source = _source(options)
    stage = manifest["stages"][0]
    model = onnx.load(root / stage["prefix"]["onnx"])
    ops = {node.op_type for node in model.graph.node}
    assert "Mul" not in ops  # no mask operators, only convolutions with zeros
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in model.graph.initializer)
    masked_zeros = sum(int((~m).sum()) for n, m in source.masks.items()
                       if source.model.block_of_parameter(n) < stage["stage"])
    assert masked_zeros > 0 and zeros >= masked_zeros


def test_suffix_eval_model_matches_pytorch_eval(bundle):
    root, manifest, options = bundle
    source = _source(options)
    for stage in manifest["stages"]:
        _, module, _ = _ort(root, stage)
        x, y = _batch(stage, seed=11)
        module.eval()
        logits = module(x.numpy(), y.numpy())[1]
        reference = TrainableSuffix(source.model, stage["stage"], source.masks).eval()
        with torch.no_grad():
            expected = reference(x)[0].numpy()
        assert np.abs(logits - expected).max() <= TOL


def test_one_ort_training_step_matches_one_pytorch_sgd_step(bundle):
    root, manifest, options = bundle
    source = _source(options)
    stage = manifest["stages"][-1]
    state, module, optimizer = _ort(root, stage)
    optimizer.set_learning_rate(0.05)
    x, y = _batch(stage, seed=12)
    module.train()
    ort_loss = float(module(x.numpy(), y.numpy())[0])
    optimizer.step()
    # float64 reference: PyTorch's float32 BatchNorm-bias gradients are the less exact side
    reference = TrainableSuffix(source.model, stage["stage"], source.masks).double().train()
    before = {n: p.detach().numpy().copy() for n, p in reference.named_parameters()}
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    loss = F.cross_entropy(reference(x.double())[0], y)
    loss.backward()
    sgd.step()
    assert abs(ort_loss - loss.item()) <= TOL * abs(loss.item())
    pairs = [(state.parameters[n].data, p.detach().numpy()) for n, p in reference.named_parameters()]
    assert _norm_rel(pairs) <= TOL
    updates = [(a - before[n], b - before[n]) for n, (a, b) in zip(before, pairs)]
    assert _norm_rel(updates) <= 1e-3  # the gradient itself, not only the weights


def _suffix_steps(root, stage, steps, lr=0.01, seed=20):
    """Train ``steps`` ORT steps the way the device does (BN statistics from the outputs)."""
    state, module, optimizer = _ort(root, stage)
    optimizer.set_learning_rate(lr)
    running = {row[key]: state.parameters[row[key]].data.copy()
               for row in stage["suffix"]["batchnorms"] for key in ("running_mean", "running_var")}
    outputs_names = stage["suffix"]["training_outputs"]
    batches = [_batch(stage, seed + i) for i in range(steps)]
    for x, y in batches:
        module.train()
        outputs = dict(zip(outputs_names, [np.array(o) for o in module(x.numpy(), y.numpy())]))
        optimizer.step()
        module.lazy_reset_grad()
        for row in stage["suffix"]["batchnorms"]:
            for key, out in (("running_mean", "batch_mean_output"), ("running_var", "batch_var_output")):
                running[row[key]] = ((1 - row["momentum"]) * running[row[key]]
                                     + row["momentum"] * outputs[row[out]]).astype(np.float32)
                state.parameters[row[key]] = running[row[key]]
    return state, module, batches


def test_masked_weights_stay_exactly_zero_after_ten_steps(bundle):
    root, manifest, _ = bundle
    stage = manifest["stages"][0]
    state, _, _ = _suffix_steps(root, stage, steps=10, lr=0.1)
    checked = 0
    for entry in stage["suffix"]["masks"]:
        mask = state.parameters[entry["name"]].data
        weight = state.parameters[entry["weight"]].data
        assert mask.dtype == np.uint8 and weight.shape == mask.shape
        assert np.count_nonzero(weight[mask == 0]) == 0, entry["weight"]
        assert np.count_nonzero(weight[mask == 1]) > 0
        checked += int((mask == 0).sum())
    assert checked > 0


def test_bn_running_statistics_follow_pytorch(bundle):
    """Device-style statistics updates == PyTorch's train-mode updates, and eval uses them.

    Learning rate 0 keeps the weights fixed, so only the BatchNorm pipeline is measured
    (batch-statistics outputs, the momentum update, the eval graph reading the result).
    """
    root, manifest, options = bundle
    source = _source(options)
    stage = manifest["stages"][0]
    state, module, batches = _suffix_steps(root, stage, steps=5, lr=0.0)
    reference = TrainableSuffix(source.model, stage["stage"], source.masks).double().train()
    with torch.no_grad():
        for x, _ in batches:
            reference(x.double())
    for name, buffer in reference.named_buffers():
        if "running_" in name:
            assert _rel(state.parameters[name].data, buffer.numpy()) <= TOL, name
    x, y = _batch(stage, seed=99)
    module.eval()
    logits = module(x.numpy(), y.numpy())[1]
    with torch.no_grad():
        expected = reference.eval()(x.double())[0].numpy()
        stale = TrainableSuffix(source.model, stage["stage"], source.masks).eval()(x)[0].numpy()
    assert np.abs(logits - expected).max() <= TOL
    assert np.abs(logits - stale).max() > 100 * TOL  # the statistics did change the output


def test_prune_and_grow_by_editing_checkpoint_state(bundle):
    root, manifest, _ = bundle
    stage = manifest["stages"][0]
    state, module, optimizer = _ort(root, stage)
    optimizer.set_learning_rate(0.1)
    entry = [e for e in stage["suffix"]["masks"]  # the last layer with pruned and active weights
             if 0 < state.parameters[e["name"]].data.mean() < 1][-1]
    mask = state.parameters[entry["name"]].data.copy()
    weight = state.parameters[entry["weight"]].data.copy()
    grow = tuple(np.argwhere(mask == 0)[0])
    prune = tuple(np.argwhere(mask == 1)[0])
    mask[grow], mask[prune], weight[prune] = 1, 0, 0.0
    state.parameters[entry["name"]] = mask
    state.parameters[entry["weight"]] = weight
    x, y = _batch(stage, seed=5)
    module.train()
    module(x.numpy(), y.numpy())
    optimizer.step()
    after = state.parameters[entry["weight"]].data
    assert after[prune] == 0.0
    assert after[grow] != 0.0  # regrown weight starts at zero and trains


# -- hashes and inspect ----------------------------------------------------------------------

def test_inspect_verifies_sha256_and_describes_bundle(bundle, capsys):
    root, manifest, _ = bundle
    text = inspect_bundle(root)
    assert "sha256 verified" in text and "density" in text
    assert main(["--inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert manifest["model"]["name"] in out
    for rel, entry in manifest["files"].items():
        assert sha256_file(root / rel) == entry["sha256"]


def test_inspect_detects_a_tampered_file(bundle, tmp_path, capsys):
    root, manifest, _ = bundle
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = copy / manifest["stages"][0]["suffix"]["checkpoint"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        inspect_bundle(copy)
    assert main(["--inspect", str(copy)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# -- bad input -------------------------------------------------------------------------------

def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_unknown_model_lists_known_ones(tmp_path, capsys):
    err = _error(["--model", "resnet9000", "--out", str(tmp_path / "x")], capsys)
    assert "resnet18" in err and "resnet32" in err
    assert not (tmp_path / "x").exists()


def test_checkpoint_for_another_model(checkpoint_path, tmp_path, capsys):
    err = _error(["--checkpoint", str(checkpoint_path), "--model", "resnet18",
                  "--out", str(tmp_path / "x")], capsys)
    assert "resnet32" in err and "resnet18" in err
    assert not (tmp_path / "x").exists()


def test_stage_range_outside_model(tmp_path, capsys):
    err = _error(["--model", "resnet18", "--width", "0.125", "--bundle-format", "1", "--stages", "4-12",
                  "--out", str(tmp_path / "x")], capsys)
    assert "0-9" in err
    assert not (tmp_path / "x").exists()


def test_out_folder_with_another_models_bundle_is_refused(bundle, tmp_path, capsys):
    root, manifest, _ = bundle
    other = "resnet18" if manifest["model"]["name"] == "resnet32" else "resnet32"
    out = tmp_path / "taken"
    shutil.copytree(root, out)
    before = sorted(p.name for p in out.rglob("*"))
    err = _error(["--model", other, "--out", str(out)], capsys)
    assert "--force" in err
    same_name_other_width = ["--model", manifest["model"]["name"], "--width", "0.5"]
    assert "--force" in _error([*same_name_other_width, "--out", str(out)], capsys)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("bundle", ["resnet32"], indirect=True)  # one model is enough
def test_force_replaces_and_failures_leave_nothing_behind(bundle, tmp_path, monkeypatch):
    root, manifest, _ = bundle
    out = tmp_path / "taken"
    shutil.copytree(root, out)
    options = ExportOptions(model="resnet18", width=0.125, input_size=SIZE, batch_size=4,
                            stages="0", sparsity=0.5, out=str(out), force=True, parity_steps=1, bundle_format=1)

    def broken(*args, **kwargs):
        raise ParityError("simulated parity failure")

    monkeypatch.setattr(pipeline.suffix_io, "export_suffix", broken)
    with pytest.raises(ParityError):
        export_bundle(options, log=_quiet)
    assert json.loads((out / "manifest.json").read_text())["model"]["name"] == "resnet32"
    assert list(tmp_path.iterdir()) == [out]  # no temporary folder left
    monkeypatch.undo()
    export_bundle(options, log=_quiet)  # stage 0: no prefix to lower, quick
    replaced = json.loads((out / "manifest.json").read_text())
    assert replaced["model"]["name"] == "resnet18" and replaced["stages"][0]["prefix"] is None
    assert list(tmp_path.iterdir()) == [out]
    inspect_bundle(out)


def test_help_documents_every_option():
    from spfde_edge.export.__main__ import build_parser

    text = build_parser().format_help()
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.option_strings


def test_core_import_stays_free_of_export_runtimes():
    code = ("import sys, spfde_edge, spfde_edge.export; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime', 'executorch')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- the standard-ONNX training step (issue 6) --------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,size", [
    (3, 1, 1, 1, 1, 8), (3, 2, 1, 1, 1, 9), (1, 2, 0, 1, 1, 8), (3, 1, 2, 2, 1, 7),
    (3, 2, 1, 1, 6, 8), (5, 1, 0, 1, 1, 6)])
def test_convolution_backward_rule_equals_autograd(kernel, stride, padding, dilation, groups, size):
    from spfde_edge.export.step_graph import convolution_backward

    torch.manual_seed(0)
    x = torch.randn(3, 6, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6 // groups, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    gi, gw, gb = convolution_backward(grad_out, x.detach(), w.detach(), [6], [stride] * 2, [padding] * 2,
                                      [dilation] * 2, False, [0, 0], groups, [True, True, True])
    assert gi.shape == x.shape and gw.shape == w.shape
    assert torch.allclose(gi, x.grad, atol=1e-10)
    assert torch.allclose(gw, w.grad, atol=1e-10)
    assert torch.allclose(gb, b.grad, atol=1e-10)


@pytest.mark.parametrize("in_ch, out_ch, groups, stride, kernel", [
    (4, 4, 2, 1, 3), (6, 12, 3, 2, 3), (8, 8, 4, 2, 1),   # grouped (RegNet, ResNeXt, ShuffleNet)
    (4, 8, 4, 1, 3), (4, 8, 4, 2, 5)])                    # depthwise with a channel multiplier
def test_grouped_convolution_backward_equals_autograd(in_ch, out_ch, groups, stride, kernel):
    from spfde_edge.export.step_graph import convolution_backward

    torch.manual_seed(0)
    x = torch.randn(2, in_ch, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_ch, in_ch // groups, kernel, kernel, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x, w, None, stride, kernel // 2, 1, groups)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    gi, gw, _ = convolution_backward(grad_out, x.detach(), w.detach(), None, [stride] * 2, [kernel // 2] * 2,
                                     [1, 1], False, [0, 0], groups, [True, True, False])
    assert torch.allclose(gi, x.grad, atol=1e-10)
    assert torch.allclose(gw, w.grad, atol=1e-10)


def test_step_graph_runs_on_plain_onnxruntime_at_any_batch_and_matches_ort_training(bundle):
    """step.onnx: standard operators only, IR <= 10, dynamic batch, one step equal to ORT training."""
    import onnx
    import onnxruntime

    root, manifest, options = bundle
    if not options.step_graph:   # --no-step-graph: the manifest offers ORT training only, no file is left
        for stage in manifest["stages"]:
            assert stage["suffix"]["backends"] == ["onnxruntime-training"]
            assert stage["suffix"].get("step_graph") is None
            assert not (root / stage["suffix"]["checkpoint"]).parent.joinpath("step.onnx").exists()
        return
    for stage in manifest["stages"]:
        suffix = stage["suffix"]
        assert suffix["backends"] == ["onnxruntime-training", "onnxruntime"]
        step = suffix["step_graph"]
        proto = onnx.load(root / step["model"])
        assert proto.ir_version <= 10
        assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        for key in ("step_graph_loss_rel", "step_graph_weights_rel", "step_graph_vs_ort_loss_rel",
                    "step_graph_vs_ort_weights_rel"):
            assert stage["parity"][key] <= 1e-4, (stage["stage"], key, stage["parity"][key])
        session = onnxruntime.InferenceSession(str(root / step["model"]), providers=["CPUExecutionProvider"])
        state = dict(np.load(root / step["state"]))
        assert set(step["parameters"]) == set(suffix["parameters"])
        for batch in (3, BATCH + 5):
            x, y = _batch({"features": {"shape": [batch, *stage["features"]["shape"][1:]]}}, seed=batch)
            feeds = {n: state[n] for n in step["inputs"][:-2]}
            feeds.update(features=x.numpy(), labels=y.numpy())
            outputs = dict(zip(step["outputs"], session.run(None, feeds)))
            # ORT training on the same batch from the bundle's own checkpoint
            ckpt, module, _ = _ort(root, stage)
            module.train()
            ort_loss = float(module(x.numpy(), y.numpy())[0])
            assert _rel(np.array(outputs["loss"]), np.array(ort_loss)) < 1e-4
            assert outputs["logits"].shape == (batch, 10)
            grads = [(outputs[n + ".grad"], ckpt.parameters[n].grad) for n in step["parameters"]]
            assert _norm_rel(grads) < 1e-4
            dead_total = 0
            for mask in suffix["masks"]:  # masked positions get exactly zero gradient
                dead = state[mask["name"]] == 0
                dead_total += int(dead.sum())
                assert np.all(outputs[mask["weight"] + ".grad"][dead] == 0)
            assert dead_total > 0


def test_dropout_is_an_identity_in_what_the_device_trains():
    """Exports replace dropout by an identity (a random mask cannot be checked against PyTorch):
    train-mode outputs become deterministic, eval-mode outputs do not change."""
    import copy

    from spfde_edge.export.source import without_dropout
    from spfde_edge.models import create_model

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width=0.25).eval()
    original = copy.deepcopy(model)
    names = without_dropout(model)
    assert names and all(isinstance(model.get_submodule(n), torch.nn.Identity) for n in names)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert torch.equal(first, model(x))
    assert without_dropout(create_model("resnet32", num_classes=10, width=0.25)) == []
