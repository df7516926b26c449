"""The model to export: a trained checkpoint or fresh weights, and the stages to cut it at."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from device_runner.errors import BundleError
from spfde_edge import cost
from spfde_edge.checkpoint import load_checkpoint
from spfde_edge.config import TrainConfig
from spfde_edge.freezing import FreezePlan, freeze_schedule
from spfde_edge.models import BlockModel, check_model_name, create_model
from spfde_edge.pretrained import load_initial_weights
from spfde_edge.sparsity.masks import MaskSet

if TYPE_CHECKING:
    from .pipeline import ExportOptions

# Fresh-model defaults: a sparse model with a freezing schedule, so that the bundle shows
# every part of SpFDE (the trainer's own defaults are dense and never freeze).
FRESH_SPARSITY = 0.9
FRESH_DISTRIBUTION = "uniform"  # the trainer's default; see docs/bundle.md on ERK's dense head
FRESH_FREEZE_FLOPS = 0.3

_FRESH_ONLY = ("num_classes", "width", "sparsity", "distribution", "freeze_flops", "epochs",
               "delta_tau", "init_from", "bn_momentum")


@dataclass
class Source:
    """The model to export with everything the manifest says about how it was made."""

    model: BlockModel
    masks: dict[str, torch.Tensor]
    config: TrainConfig
    plan: FreezePlan
    num_frozen: int
    epoch: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    checkpoint: str | None


def load_source(options: ExportOptions) -> Source:
    if options.checkpoint is not None:
        return _checkpoint_source(options)
    if options.model is None:
        raise BundleError("give --model NAME for a fresh model or --checkpoint PATH for a trained one")
    return _fresh_source(options)


# Random regularisers, identities in eval mode: dropout, and stochastic depth (torchvision's
# StochasticDepth, timm's DropPath/DropBlock) that drops whole residual branches per sample.
_RANDOM_IN_TRAINING = ("StochasticDepth", "DropPath", "DropBlock2d")


def without_dropout(model: nn.Module) -> list[str]:
    """Replace every dropout and stochastic-depth layer of ``model`` by an identity, in place;
    returns their names.

    The device trains without them: a random mask drawn by ONNX Runtime cannot be checked
    against PyTorch's (every export checks one training step against PyTorch), and the two
    runtimes' random streams differ anyway. Inference is unchanged (they are identities in
    eval mode); the host keeps them when a run comes home.
    """
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.modules.dropout._DropoutNd)
             or type(module).__name__ in _RANDOM_IN_TRAINING]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return names


def _checkpoint_source(options: ExportOptions) -> Source:
    given = [f"--{name.replace('_', '-')}" for name in _FRESH_ONLY
             if getattr(options, name) is not None]
    if given:
        raise BundleError(f"{', '.join(given)} only apply to a fresh model; a checkpoint "
                          "carries its own (drop them or drop --checkpoint)")
    state = load_checkpoint(Path(options.checkpoint))
    config = TrainConfig.from_dict(state["config"])
    if options.model is not None:
        check_model_name(options.model)
        if options.model != config.model:
            raise BundleError(f"checkpoint {options.checkpoint} is for model '{config.model}', "
                              f"not '{options.model}'; drop --model or pick the right checkpoint")
    classes = [str(c) for c in state["classes"]]
    model = create_model(config.model, num_classes=len(classes), width=config.width,
                         cifar_stem=config.cifar_stem, bn_momentum=config.bn_momentum)
    if state.get("block_names", model.block_names) != model.block_names:
        raise BundleError(f"checkpoint blocks {state['block_names'][:3]}… do not match model "
                          f"'{config.model}'; it was written by another model definition")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise BundleError(f"checkpoint weights do not fit '{config.model}': "
                          f"{str(exc).splitlines()[0]}") from exc
    masks = {name: mask.to(torch.bool) for name, mask in state["masks"]["masks"].items()}
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise BundleError(f"checkpoint masks name weights that '{config.model}' lacks: {unknown[:3]}")
    plan_state = state["freeze_plan"]
    plan = FreezePlan(list(plan_state["freeze_epochs"]), plan_state.get("T_frz"),
                      float(plan_state.get("reduction", 0.0)))
    return Source(model=model.eval(), masks=masks, config=config, plan=plan,
                  num_frozen=int(state["num_frozen"]), epoch=int(state["epoch"]), classes=classes,
                  mean=[float(v) for v in state["mean"]], std=[float(v) for v in state["std"]],
                  input_size=int(state.get("input_size", config.input_size)),
                  checkpoint=str(options.checkpoint))


def _fresh_source(options: ExportOptions) -> Source:
    check_model_name(options.model)
    defaults = TrainConfig()
    config = TrainConfig(
        model=options.model, width=options.width, cifar_stem=options.cifar_stem,
        input_size=_given(options.input_size, defaults.input_size),
        batch_size=_given(options.batch_size, defaults.batch_size),
        epochs=_given(options.epochs, defaults.epochs), delta_tau=_given(options.delta_tau, defaults.delta_tau),
        sparsity=_given(options.sparsity, FRESH_SPARSITY),
        distribution=_given(options.distribution, FRESH_DISTRIBUTION),
        freeze_flops=_given(options.freeze_flops, FRESH_FREEZE_FLOPS),
        init_from=options.init_from, bn_momentum=options.bn_momentum, seed=options.seed).validate()
    num_classes = _given(options.num_classes, 10)
    # Same seeding as the trainer: init under a forked global RNG, masks from seed + 2.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(config.model, num_classes=num_classes, width=config.width,
                             cifar_stem=config.cifar_stem, bn_momentum=config.bn_momentum)
    if options.init_from is not None:  # as the trainer: trained weights pick the masks
        print(load_initial_weights(model, Path(options.init_from)).line())
        maskset = MaskSet.magnitude(model, config.sparsity, config.distribution)
    else:
        maskset = MaskSet.random(model, config.sparsity, config.distribution,
                                 torch.Generator().manual_seed(config.seed + 2))
    maskset.apply(model)
    profile = cost.profile_model(model, (3, config.input_size, config.input_size))
    densities = maskset.layer_density()
    plan = freeze_schedule(
        flops_fn=lambda k: cost.training_flops_per_sample(profile, densities, k).total,
        epochs=config.epochs, delta_tau=config.delta_tau, target_reduction=config.freeze_flops,
        max_frozen_fraction=config.max_frozen_fraction, num_blocks=len(model.blocks))
    return Source(model=model.eval(), masks=dict(maskset.masks), config=config, plan=plan,
                  num_frozen=0, epoch=0, classes=[str(i) for i in range(num_classes)],
                  mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], input_size=config.input_size,
                  checkpoint=None)


def _given(value, default):
    """The option as given; the default only when it was left out (0 is a value, not "unset")."""
    return default if value is None else value


def resolve_stages(spec: str | None, source: Source) -> list[int]:
    """Stage k freezes blocks [0, k). Default: the current frozen point up to the last
    block the schedule freezes, so the device can keep freezing without the host."""
    num_blocks = len(source.model.blocks)
    if spec is None:
        return list(range(source.num_frozen, max(source.num_frozen, source.plan.num_frozen) + 1))
    try:
        low, _, high = spec.partition("-")
        first, last = int(low), int(high or low)
    except ValueError:
        raise BundleError(f"--stages takes K or A-B (e.g. 4-6), got '{spec}'") from None
    if not 0 <= first <= last <= num_blocks - 1:
        raise BundleError(f"--stages {spec} is outside {source.config.model}: it has {num_blocks} "
                          f"blocks, so stages 0-{num_blocks - 1} (stage k freezes blocks before k; "
                          "the head always trains)")
    return list(range(first, last + 1))
