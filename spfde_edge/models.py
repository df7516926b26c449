"""Model registry: name -> classifier built as an ordered list of *freezing blocks*.

Every model is a :class:`BlockModel`. Its blocks (stem, each residual block, head) are the
units that progressive freezing, cost accounting and the host/device split work on, so no
other module ever inspects layer names. Parameter names are ``blocks.<i>.<...>``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
from torchvision.models.resnet import BasicBlock, conv1x1


class ModelError(ValueError):
    """Unknown model name or invalid model options."""


class BlockModel(nn.Module):
    """A classifier that runs its blocks in order; the first ``num_frozen`` are frozen.

    Frozen blocks run under ``no_grad`` with BatchNorm in eval mode (SpFDE §3.2: a frozen
    layer needs no backward pass), so their activations are never stored for backward.
    """

    def __init__(self, name: str, blocks: list[tuple[str, nn.Module]], num_classes: int):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.block_names = [n for n, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        self.num_frozen = 0
        # ``blocks.<i>.<…>`` -> the name in the library's own state dict (library models),
        # so their weight files load with --init-from.
        self.source_names: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            if index < self.num_frozen:
                with torch.no_grad():
                    x = block(x)
            else:
                x = block(x)
        return x

    def train(self, mode: bool = True) -> "BlockModel":
        super().train(mode)
        for block in self.blocks[: self.num_frozen]:
            block.eval()
        return self

    def freeze_prefix(self, num_frozen: int) -> None:
        """Freeze blocks ``[0, num_frozen)``: no gradients, BatchNorm statistics fixed."""
        if not 0 <= num_frozen <= len(self.blocks):
            raise ModelError(f"cannot freeze {num_frozen} of {len(self.blocks)} blocks")
        self.num_frozen = num_frozen
        for index, block in enumerate(self.blocks):
            block.requires_grad_(index >= num_frozen)
        self.train(self.training)

    def block_of_parameter(self, name: str) -> int:
        """Index of the block that owns parameter/buffer ``name`` (``blocks.<i>.…``)."""
        return int(name.split(".")[1])

    def split(self, k: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Prefix (blocks before ``k``) and suffix (blocks from ``k``), sharing modules."""
        if not 0 <= k <= len(self.blocks):
            raise ModelError(f"split point {k} outside 0..{len(self.blocks)}")
        return nn.Sequential(*self.blocks[:k]), nn.Sequential(*self.blocks[k:])


_REGISTRY: dict[str, Callable[..., BlockModel]] = {}


def register_model(name: str):
    def wrap(fn: Callable[..., BlockModel]) -> Callable[..., BlockModel]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    """The registered names; ``torchvision:NAME``, ``timm:NAME`` and your own
    ``package.module:factory`` are accepted as well (:func:`create_model`)."""
    return sorted(_REGISTRY)


MODEL_HELP = ("a registered model ({registered}), torchvision:NAME, timm:NAME, or your own "
              "package.module:factory / file.py:factory (docs/models.md)")
BN_MOMENTUM_HELP = ("BatchNorm running-statistics momentum, kept on the device too (default: the model's "
                    "own; torchvision's MobileNetV3/EfficientNet use 0.01, set for hundreds of epochs: 0.1 "
                    "for short runs; docs/models.md)")
INIT_FROM_HELP = ("start from these weights (a state dict or .safetensors file, e.g. torchvision's or timm's, "
                  "offline); masks keep each layer's largest weights and the head is re-initialised when "
                  "the class count differs")


def check_model_name(name: str) -> None:
    """Refuse a name that can never build a model, before any work starts."""
    from .model_zoo import is_library_model
    from .user_models import is_user_model

    if name not in _REGISTRY and not is_library_model(name) and not is_user_model(name):
        raise ModelError(f"unknown model '{name}'; give "
                         + MODEL_HELP.format(registered=", ".join(available_models())))


def folder_name(name: str) -> str:
    """A default run/bundle folder name for a model name (``torchvision:mobilenet_v3_small``
    -> ``mobilenet_v3_small``; ``nets/tiny.py:build`` -> ``tiny-build``)."""
    import re

    target, _, attribute = name.rpartition(":")
    if not target:
        return name
    if target in ("torchvision", "timm"):
        return attribute
    stem = target.rsplit("/", 1)[-1].removesuffix(".py")
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{stem}-{attribute}")


def create_model(name: str, num_classes: int = 10, width: float | None = None,
                 cifar_stem: bool = True, bn_momentum: float | None = None) -> BlockModel:
    """Build a model by name. ``width`` scales channels (None: the model's default);
    ``bn_momentum`` replaces every BatchNorm's running-statistics momentum (None: the model's)."""
    from .model_zoo import build_library_model, is_library_model
    from .user_models import build_user_model, is_user_model

    check_model_name(name)
    if width is not None and width <= 0:
        raise ModelError(f"width must be positive, got {width}")
    if is_library_model(name):
        model = build_library_model(name, num_classes, width, cifar_stem)
    elif is_user_model(name):
        model = build_user_model(name, num_classes, width)
    else:
        model = _REGISTRY[name](num_classes=num_classes, width=width, cifar_stem=cifar_stem)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return model


def slowest_bn_momentum(model: nn.Module) -> float | None:
    """The smallest BatchNorm momentum in ``model`` (None without BatchNorm or with a cumulative
    average): torchvision's MobileNetV3 and EfficientNet use 0.01, set for 600-epoch schedules."""
    values = [m.momentum for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
    return min(values) if values else None


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _basic_resnet(name: str, stage_blocks: list[int], stage_channels: list[int],
                  num_classes: int, stem: nn.Sequential) -> BlockModel:
    """ResNet from torchvision's BasicBlock; 1x1-conv projection shortcuts (option B)."""
    blocks: list[tuple[str, nn.Module]] = [("stem", stem)]
    in_ch = stem[0].out_channels
    for stage, (count, out_ch) in enumerate(zip(stage_blocks, stage_channels), start=1):
        for index in range(count):
            stride = 2 if (index == 0 and stage > 1) else 1
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
            blocks.append((f"layer{stage}.{index}", BasicBlock(in_ch, out_ch, stride, downsample)))
            in_ch = out_ch
    blocks.append(("head", _head(in_ch, num_classes)))
    model = BlockModel(name, blocks, num_classes)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


@register_model("resnet32")
def resnet32(num_classes: int = 10, width: float | None = None, cifar_stem: bool = True) -> BlockModel:
    """CIFAR ResNet-32 (He et al. 2016): 3 stages x 5 basic blocks; 2x wide by default (SpFDE)."""
    width = 2.0 if width is None else width
    channels = [_channels(c, width) for c in (16, 32, 64)]
    stem = nn.Sequential(*_conv_bn_relu(3, channels[0], 3, 1))
    return _basic_resnet("resnet32", [5, 5, 5], channels, num_classes, stem)


@register_model("resnet18")
def resnet18(num_classes: int = 10, width: float | None = None, cifar_stem: bool = True) -> BlockModel:
    """torchvision ResNet-18 layout; the CIFAR stem is a 3x3/1 conv without max-pool."""
    width = 1.0 if width is None else width
    channels = [_channels(c, width) for c in (64, 128, 256, 512)]
    if cifar_stem:
        stem = nn.Sequential(*_conv_bn_relu(3, channels[0], 3, 1))
    else:
        stem = nn.Sequential(*_conv_bn_relu(3, channels[0], 7, 2), nn.MaxPool2d(3, 2, 1))
    return _basic_resnet("resnet18", [2, 2, 2, 2], channels, num_classes, stem)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, width: float | None = None, cifar_stem: bool = True) -> BlockModel:
    """torchvision MobileNetV2; the CIFAR stem makes the first conv stride 1."""
    width = 1.0 if width is None else width
    net = tv_mobilenet_v2(num_classes=num_classes, width_mult=width)
    if cifar_stem:
        net.features[0][0].stride = (1, 1)
    features = list(net.features)
    blocks: list[tuple[str, nn.Module]] = [("stem", features[0])]
    blocks += [(f"features.{i}", features[i]) for i in range(1, len(features) - 1)]
    blocks.append(("conv_last", features[-1]))
    classifier = net.classifier[-1]
    head = _head(classifier.in_features, num_classes, dropout=0.2)
    head[-1] = classifier
    blocks.append(("head", head))
    return BlockModel("mobilenet_v2", blocks, num_classes)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers in forward order, named by their weight's parameter prefix."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
