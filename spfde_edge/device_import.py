"""Bring a device run home: RUN's last checkpoint -> PyTorch model -> host checkpoint.

A device run (``python -m device_runner ... --out RUN``) holds its model in three places, which
:class:`device_runner.trained_model.TrainedModel` already puts together for inference:

* blocks before the run's first stage ``k0``: never trained on the device; a format-1 bundle
  has them only as that stage's ``prefix.onnx``, where the exporter folded each BatchNorm
  into the convolution before it and multiplied the masks in;
* blocks ``[k0, k)`` frozen on the device: the checkpoint's ``frozen/`` arrays;
* blocks from ``k`` (the run's current stage): the checkpoint's ``suffix_state.npz``.

A format-2 run holds all of them in one model state (the bundle's weight store with the
checkpoint's arrays written into it), masks included, so nothing is rebuilt from a graph.

:func:`read_device_run` turns them into a host :class:`DeviceModel` (a ``BlockModel`` with
masks) and checks that its logits equal the device's; :func:`write_host_checkpoint` writes it
as an ordinary trainer checkpoint (``spfde_edge.trainer`` lays it out), so the host can
evaluate it, resume SpFDE training on it and export it again. ``spfde_edge.fleet`` merges
several runs into one :class:`DeviceModel` and writes it the same way.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from device_runner import checkpoint as device_checkpoint
from device_runner import schedule as device_schedule
from device_runner.bundle import Bundle
from device_runner.errors import DeviceRunnerError
from device_runner.files import sha256_file
from device_runner.manifest import MANIFEST_NAME

from .checkpoint import CheckpointError, write_json
from .config import TrainConfig
from .freezing import Freezer, FreezePlan, block_active_epochs
from .models import BlockModel, create_model
from .sparsity.masks import maskable_weights, target_zero_counts

IMPORT_RECORD = "import.json"
LOGITS_TOLERANCE = 1e-4      # host logits vs the device's own evaluation (issue 14)
PREFIX_TOLERANCE = 1e-5      # host prefix rebuilt from prefix.onnx vs prefix.onnx
PARITY_IMAGES = 32
MASK_SUFFIX = "_mask"


class DeviceImportError(CheckpointError):
    """A run that cannot be brought home (or merged); the message says what to do."""


@dataclass
class DeviceModel:
    """A device-trained model as host tensors, with where it stands in the bundle's plan."""

    model: BlockModel                          # eval mode, every block's weights
    masks: dict[str, torch.Tensor]             # weight name -> bool, exact target counts
    target_zeros: dict[str, int]               # the bundle's rule (sparsity target, distribution)
    num_frozen: int                            # the run's current stage k
    plan_epoch: float                          # plan epochs the bundle's schedule has reached
    samples: int                               # samples trained on the device (history)
    bundle: Bundle
    runs: list[str]
    momentum: dict[str, np.ndarray] = field(default_factory=dict)   # SGD buffers of the suffix
    notes: list[str] = field(default_factory=list)

    @property
    def first_stage(self) -> int:
        """k0: blocks before it come from the bundle, identical for every run of it."""
        return device_schedule.run_stage_ks(self.bundle)[0]


# --- reading a run ---------------------------------------------------------------------------
def read_device_run(run: str | Path, threads: int | None = None, check_logits: bool = True) -> DeviceModel:
    """RUN's last checkpoint as a host model; DeviceImportError when it cannot be rebuilt exactly."""
    from device_runner.trained_model import TrainedModel

    run = Path(run)
    try:
        trained = TrainedModel(run, threads=threads)
        _, arrays, _ = device_checkpoint.read(run)
    except DeviceRunnerError as exc:
        raise DeviceImportError(str(exc)) from None
    bundle = trained.bundle
    info = bundle.manifest.model
    model = create_model(info.name, num_classes=info.num_classes, width=info.width, cifar_stem=info.cifar_stem,
                         bn_momentum=bundle.manifest.train_config.get("bn_momentum")).eval()
    state = model.state_dict()
    k0, k = trained.starts[0][0], trained.stage_k
    if bundle.format_version == 2:   # the run's model state holds every block, as the store did
        model_state = trained.pipeline.state
        device_arrays = {**model_state.weights, **{n + MASK_SUFFIX: m for n, m in model_state.masks.items()}}
    else:
        device_arrays = {**trained.frozen_params, **trained.suffix_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for name, value in device_arrays.items():
        if name.endswith(MASK_SUFFIX):
            masks[name[: -len(MASK_SUFFIX)]] = torch.from_numpy(np.asarray(value) != 0)
        elif name in state:
            state[name] = torch.from_numpy(np.array(value, dtype=np.float32)).reshape(state[name].shape)
        else:
            raise DeviceImportError(f"run {run} holds {name}, which {info.name} lacks; the run is not of "
                                    "this bundle's model")
    if k0 > 0 and bundle.format_version == 1:
        state.update(prefix_state_from_onnx(bundle.stage(k0).prefix_onnx, model, k0))
    missing = [n for n in state if model.block_of_parameter(n) >= k0 and not n.endswith("num_batches_tracked")
               and n not in device_arrays]
    if missing:
        raise DeviceImportError(f"run {run} lacks {missing[:3]} of blocks {k0}.. ; the checkpoint is incomplete")
    model.load_state_dict(state)
    notes: list[str] = []
    weights, _ = maskable_weights(model)
    sparsity = bundle.manifest.sparsity
    target_zeros = target_zero_counts({n: tuple(w.shape) for n, w in weights.items()}, sparsity.target,
                                      sparsity.distribution)
    for name, weight in weights.items():
        if name not in masks:  # a block before k0: its mask is where prefix.onnx is nonzero
            masks[name] = weight.detach() != 0
        active = weight.numel() - target_zeros[name]
        have = int(masks[name].sum())
        if have != active:
            # Above target: the run stopped inside a MEST update (grown, not yet pruned back);
            # below: active weights that are exactly zero in a folded prefix. Either way the
            # layer gets its exact count by |w|, the rule the merge uses too.
            score = weight.detach().abs().numpy() + masks[name].numpy()  # active positions first
            masks[name] = torch.from_numpy(keep_largest(score, active))
            if have > active:
                notes.append(f"{name}: {have - active} weights grown by an unfinished MEST update pruned by |w|")
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name].to(weight.dtype))
    plan = bundle.manifest.spfde
    clock = device_schedule.device_plan(plan.epochs_done, plan.epochs, trained.config.epochs)
    # A finished host plan was fine-tuned on a fresh plan of the device's own: nothing of the
    # host plan is left either way.
    plan_epoch = float(plan.epochs) if clock.fine_tune else clock.clock.plan_epoch(trained.epoch)
    momentum = {n.split("/", 1)[1]: v for n, v in arrays.items() if n.startswith("momentum/")}
    device = DeviceModel(model=model, masks=masks, target_zeros=target_zeros, num_frozen=k,
                         plan_epoch=plan_epoch, samples=int(sum(h["samples"] for h in trained.history)),
                         bundle=bundle, runs=[str(run)], momentum=momentum, notes=notes)
    if check_logits:
        difference = logits_difference(device, trained)
        if not difference <= LOGITS_TOLERANCE:
            raise DeviceImportError(f"the host model rebuilt from {run} gives logits {difference:.3g} away from "
                                    f"the device's (limit {LOGITS_TOLERANCE}); nothing was written")
        device.notes.append(f"logits vs the device's evaluation: max abs {difference:.2e}")
    return device


def parity_images(bundle: Bundle, count: int = PARITY_IMAGES, seed: int = 0) -> np.ndarray:
    size = bundle.input_size
    return np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8)


def host_logits(device: DeviceModel, images: np.ndarray) -> np.ndarray:
    """The host model's logits for uint8 images, normalised as the bundle says."""
    mean = torch.tensor(device.bundle.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(device.bundle.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (torch.from_numpy(images).float() / 255.0 - mean) / std
    with torch.no_grad():
        return device.model.eval()(x).numpy()


def logits_difference(device: DeviceModel, trained) -> float:
    """Max abs difference of host and device logits on random images (uint8, fixed seed)."""
    images = parity_images(device.bundle)
    return float(np.abs(host_logits(device, images) - trained.logits(images)).max())


def keep_largest(score: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of ``score``'s shape with exactly ``count`` True at the largest scores;
    ties go to the lower flat index, so the choice is deterministic."""
    flat = np.asarray(score, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:count]] = True
    return mask.reshape(np.shape(score))


def prefix_state_from_onnx(path: Path, model: BlockModel, k0: int) -> dict[str, torch.Tensor]:
    """Blocks ``[0, k0)`` from the bundle's ``prefix.onnx``, where the exporter folded every
    BatchNorm into the convolution before it (TorchScript's eval-mode ONNX export does).

    The folded convolution ``W' = W·γ/σ``, ``b' = β − μ·γ/σ`` is loaded as the conv weight
    ``W'`` and an identity BatchNorm that adds ``b'`` (weight 1, running mean 0, running
    variance 1 − eps): in eval mode, the only mode frozen blocks run in, the same function.
    Convolutions are matched to the graph's Conv nodes in execution order, shapes checked, and
    the rebuilt prefix must reproduce ``prefix.onnx`` to 1e-5.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def constant(name: str) -> np.ndarray:
        while name in alias:
            name = alias[name]
        return values[name]

    ops = {n.op_type for n in graph.node}
    if ops & {"BatchNormalization", "Gemm", "MatMul"}:
        raise DeviceImportError(f"{path} has {sorted(ops & {'BatchNormalization', 'Gemm', 'MatMul'})} nodes; "
                                "this importer reads prefixes of convolutions with BatchNorm folded in")
    size = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    order = _execution_order(model, k0, size)
    names = {id(m): n for n, m in model.named_modules()}
    nodes = [n for n in graph.node if n.op_type == "Conv"]
    convs = [m for m in order if isinstance(m, nn.Conv2d)]
    if len(nodes) != len(convs):
        raise DeviceImportError(f"{path} has {len(nodes)} convolutions, blocks 0..{k0 - 1} of "
                                f"{model.name} have {len(convs)}; the bundle is of another model")
    state: dict[str, torch.Tensor] = {}
    for node, conv in zip(nodes, convs):
        name = names[id(conv)]
        weight = constant(node.input[1])
        bias = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise DeviceImportError(f"{path}: convolution {node.name} has shape {list(weight.shape)}, "
                                    f"{name} has {list(conv.weight.shape)}; the bundle is of another model")
        state[f"{name}.weight"] = torch.from_numpy(weight.copy())
        following = order[order.index(conv) + 1] if order.index(conv) + 1 < len(order) else None
        bias = np.zeros(conv.out_channels, np.float32) if bias is None else bias
        if isinstance(following, nn.BatchNorm2d):
            bn = names[id(following)]
            state[f"{bn}.weight"] = torch.ones(conv.out_channels)
            state[f"{bn}.bias"] = torch.from_numpy(bias.copy())
            state[f"{bn}.running_mean"] = torch.zeros(conv.out_channels)
            state[f"{bn}.running_var"] = torch.full((conv.out_channels,), 1.0 - following.eps)
            if conv.bias is not None:
                state[f"{name}.bias"] = torch.zeros(conv.out_channels)
        elif conv.bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(bias.copy())
        elif np.any(bias != 0):
            raise DeviceImportError(f"{path}: {node.name} has a bias that {name} cannot hold")
    unmatched = [m for m in order if isinstance(m, nn.BatchNorm2d)
                 and not isinstance(order[order.index(m) - 1], nn.Conv2d)]
    if unmatched:
        raise DeviceImportError(f"{names[id(unmatched[0])]} does not follow a convolution, so it was "
                                f"not folded into one in {path}; this importer cannot rebuild it")
    _check_prefix(path, model, k0, state, size)
    return state


def _execution_order(model: BlockModel, k0: int, size: int) -> list[nn.Module]:
    """Conv and BatchNorm modules of blocks ``[0, k0)`` in the order they run."""
    order: list[nn.Module] = []
    prefix = nn.Sequential(*model.blocks[:k0]).eval()
    hooks = [m.register_forward_hook(lambda module, args, out: order.append(module))
             for m in prefix.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    with torch.no_grad():
        prefix(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return order


def _check_prefix(path: Path, model: BlockModel, k0: int, state: dict[str, torch.Tensor], size: int) -> None:
    from device_runner.backends.ort_prefix import OrtPrefix

    probe = copy.deepcopy(model)
    probe.load_state_dict({**probe.state_dict(), **state})
    prefix = nn.Sequential(*probe.blocks[:k0]).eval()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = prefix(x).numpy()
    got = OrtPrefix(path, 1).forward(x.numpy())
    difference = float(np.abs(got - reference).max())
    if not difference <= PREFIX_TOLERANCE:
        raise DeviceImportError(f"blocks 0..{k0 - 1} rebuilt from {path} are {difference:.3g} away from it "
                                f"(limit {PREFIX_TOLERANCE}); the bundle's prefix does not match {model.name}")


# --- writing a host checkpoint -----------------------------------------------------------------
def host_config(bundle: Bundle, epochs: int | None = None, dataset: str | None = None,
                data_dir: str | None = None, seed: int | None = None) -> TrainConfig:
    """The TrainConfig that continues the bundle's plan on the host: the run's own config
    (``train_config`` in the manifest) with the plan's SpFDE settings and the bundle's input
    size; ``epochs`` lengthens the plan, ``dataset``/``data_dir`` choose the host's data."""
    manifest = bundle.manifest
    plan = manifest.spfde
    config = TrainConfig.from_dict(manifest.train_config)
    changes = dict(model=manifest.model.name, width=manifest.model.width, cifar_stem=manifest.model.cifar_stem,
                   input_size=bundle.input_size, epochs=plan.epochs if epochs is None else epochs,
                   delta_tau=plan.delta_tau, sparsity=manifest.sparsity.target,
                   distribution=manifest.sparsity.distribution, dst=plan.dst.algorithm,
                   update_fraction=plan.dst.update_fraction, lr=plan.lr_schedule.base_lr,
                   momentum=plan.momentum, weight_decay=plan.weight_decay, sieve=plan.sieve.fraction,
                   sieve_swap=plan.sieve.swap_fraction)
    if dataset is not None:
        changes.update(dataset=dataset, data_dir=data_dir)
    elif data_dir is not None:
        changes.update(data_dir=data_dir)
    if seed is not None:
        changes.update(seed=seed)
    return config.replace(**changes).validate()


def write_host_checkpoint(device: DeviceModel, out: str | Path, config: TrainConfig,
                          record: dict | None = None, log=print) -> Path:
    """``out/checkpoint.pt`` in the trainer's own layout, plus ``out/import.json`` (what was
    brought home, from where, and the parity measured).

    The trainer is built on the host's data (``config.dataset``; its sieve, generators and
    optimizer are fresh), then given the device model: weights, masks, BatchNorm statistics,
    the blocks the run froze (never undone: ``max(k, blocks the plan froze by then)``), the
    bundle's freezing plan, the epoch the plan has reached, the suffix's SGD momentum and the
    bundle's normalisation (the model was trained with it)."""
    from . import trainer as trainer_mod

    out = Path(out)
    epoch = math.floor(device.plan_epoch + 1e-9)
    if config.epochs < epoch:
        raise DeviceImportError(f"--epochs {config.epochs} is before the epoch the run reached in the bundle's "
                                f"plan ({epoch}); give at least {epoch}")
    bundle = device.bundle
    run = trainer_mod.start(config, out)
    try:
        if run.data.classes != bundle.classes:
            raise DeviceImportError(f"the host's {config.dataset} data has classes {run.data.classes[:5]}…, the "
                                    f"model {bundle.classes[:5]}…; pass --dataset/--data-dir of data with the "
                                    "bundle's classes")
        _install(run, device, epoch)
        run.save()
    except BaseException:
        if run.run_lock is not None:
            run.run_lock.release()
        for leftover in (out / trainer_mod.CHECKPOINT_NAME, out / trainer_mod.METRICS_NAME):
            leftover.unlink(missing_ok=True)
        raise
    run.run_lock.release()
    write_json(out / IMPORT_RECORD, {
        "runs": device.runs, "bundle": str(bundle.root),
        "bundle_manifest_sha256": sha256_file(bundle.root / MANIFEST_NAME),
        "stage": device.num_frozen, "num_frozen": run.model.num_frozen, "plan_epoch": device.plan_epoch,
        "epoch": epoch, "epochs": config.epochs, "samples": device.samples, "notes": device.notes,
        "dataset": config.dataset, **(record or {})})
    log(f"wrote {out / trainer_mod.CHECKPOINT_NAME}: {bundle.model_name}, blocks 0..{run.model.num_frozen - 1} "
        f"frozen, plan epoch {epoch} of {config.epochs}, sparsity {run.masks.sparsity():.4f}"
        + "".join(f"; {note}" for note in device.notes))
    return out


def _install(run, device: DeviceModel, epoch: int) -> None:
    """Put ``device``'s model into a freshly started trainer ``run``."""
    model = run.model
    model.load_state_dict(device.model.state_dict())
    if run.masks.target_zeros != device.target_zeros:
        raise DeviceImportError("the host config's sparsity rule gives other per-layer targets than the bundle's; "
                                "the bundle's manifest and train_config disagree")
    masks = run.masks.state_dict()
    masks["masks"] = {n: m.clone() for n, m in device.masks.items()}
    run.masks.load_state_dict(masks)
    freezing = device.bundle.manifest.spfde.freezing
    plan = FreezePlan(list(freezing.freeze_epochs), freezing.T_frz, float(freezing.predicted_reduction))
    run.freezer = Freezer(plan)
    run.active_epochs = block_active_epochs(plan, run.num_blocks, run.config.epochs)
    num_frozen = max(device.num_frozen, run.freezer.num_frozen_at(epoch) if epoch else 0)
    model.freeze_prefix(num_frozen)
    config = run.config
    run.optimizer = torch.optim.SGD(run._param_groups(num_frozen), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    params = dict(model.named_parameters())
    for name, buffer in device.momentum.items():
        if name in params and model.block_of_parameter(name) >= num_frozen:
            run.optimizer.state[params[name]]["momentum_buffer"] = torch.from_numpy(np.array(buffer))
    model.to(run.device)
    run.masks.apply(model)
    run.masks.check(model)
    run.epoch = epoch
    run.data.mean, run.data.std = tuple(device.bundle.mean), tuple(device.bundle.std)


def import_run(run: str | Path, out: str | Path, epochs: int | None = None, dataset: str | None = None,
               data_dir: str | None = None, log=print) -> Path:
    """``python -m spfde_edge.import RUN --out OUT``: read, check against the device, write."""
    device = read_device_run(run)
    config = host_config(device.bundle, epochs, dataset, data_dir)
    return write_host_checkpoint(device, out, config, log=log)


def add_host_plan_options(parser) -> None:
    """The options ``import`` and ``merge`` share: the plan the host continues and its data."""
    from spfde_edge.train import DATASETS

    parser.add_argument("--out", required=True, help="new run folder for checkpoint.pt and import.json")
    parser.add_argument("--epochs", type=int, help="length of the SpFDE plan the host continues (default: the "
                                                   "bundle's; the host resumes where the device left it)")
    parser.add_argument("--dataset", choices=DATASETS, help="host data for --resume (default: the data the "
                                                            "bundle's model was trained on, its train_config)")
    parser.add_argument("--data-dir", help="dataset root or class-folder root for --dataset")
    parser.add_argument("--model", metavar="NAME",
                        help="a run of your own model (package.module:factory): name it to let its code "
                             "be imported (a run never imports code by itself; docs/models.md)")


def run_host_command(action, model: str | None = None) -> int:
    """Run ``action()``; a user error is one ``error:`` line and exit 2, as in the trainer's CLI.
    ``model``: the --model the user named, whose code may then be imported."""
    import sys

    from spfde_edge.train import USER_ERRORS
    from spfde_edge.user_models import allow

    allow(model)
    try:
        action()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
