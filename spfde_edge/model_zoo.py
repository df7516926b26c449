"""Classifiers from the libraries users already have: ``torchvision:NAME`` and ``timm:NAME``.

A library model becomes a :class:`~spfde_edge.models.BlockModel` by its family's *layout*:
the modules that run in order in the model's ``forward``. Each layout entry is

* ``"path"``: one freezing block, or, when the module is a sequence of composite blocks
  (a stage of inverted residuals, a ResNet layer), each of those blocks, recursively;
* ``"path!"``: each child of the module is a block; children without parameters (ReLU,
  pooling) join the block before them (SqueezeNet's ``features``);
* ``"a+b"``: the modules run one after the other as one block (a stem of conv, norm, act).

The head (pooling, flatten, classifier) is always the last block; ``pool`` and ``flatten``
stand for the global average pool and flatten a family's ``forward`` does functionally.
Every derived model is checked against the library model's own ``forward`` (same input,
eval mode) before it is used, so a layout that misses a step is refused, never trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import BlockModel, ModelError

LIBRARIES = ("torchvision", "timm")


@dataclass(frozen=True)
class Layout:
    body: tuple[str, ...]
    head: tuple[str, ...]


# (library, class name) -> layout. docs/models.md lists the families and their blocks.
LAYOUTS: dict[tuple[str, str], Layout] = {
    ("torchvision", "MobileNetV2"): Layout(("features",), ("pool", "flatten", "classifier")),
    ("torchvision", "MobileNetV3"): Layout(("features",), ("avgpool", "flatten", "classifier")),
    ("torchvision", "EfficientNet"): Layout(("features",), ("avgpool", "flatten", "classifier")),
    ("torchvision", "SqueezeNet"): Layout(("features!",), ("classifier", "flatten")),
    ("torchvision", "ShuffleNetV2"): Layout(("conv1+maxpool", "stage2", "stage3", "stage4", "conv5"),
                                            ("pool", "flatten", "fc")),
    ("torchvision", "RegNet"): Layout(("stem", "trunk_output"), ("avgpool", "flatten", "fc")),
    ("torchvision", "VGG"): Layout(("features!",), ("avgpool", "flatten", "classifier")),
    ("torchvision", "ResNet"): Layout(("conv1+bn1+relu+maxpool", "layer1", "layer2", "layer3", "layer4"),
                                      ("avgpool", "flatten", "fc")),
    ("timm", "MobileNetV3"): Layout(("conv_stem+bn1", "blocks"),
                                    ("global_pool", "conv_head", "norm_head", "act2", "flatten",
                                     "classifier")),
    ("timm", "EfficientNet"): Layout(("conv_stem+bn1", "blocks", "conv_head+bn2"),
                                     ("global_pool", "classifier")),
    ("timm", "ByobNet"): Layout(("stem", "stages", "final_conv"), ("head",)),
    ("timm", "ResNet"): Layout(("conv1+bn1+act1+maxpool", "layer1", "layer2", "layer3", "layer4"),
                               ("global_pool", "fc")),
}

# Builder keyword that scales channels, where the family has one (--width).
_WIDTH_KEYWORD = {("torchvision", "mobilenet_v2"): "width_mult",
                  ("torchvision", "mobilenet_v3_small"): "width_mult",
                  ("torchvision", "mobilenet_v3_large"): "width_mult"}


def is_library_model(name: str) -> bool:
    return name.partition(":")[0] in LIBRARIES and ":" in name


def build_library_model(name: str, num_classes: int, width: float | None, cifar_stem: bool,
                        check_size: int = 32) -> BlockModel:
    """``torchvision:NAME`` / ``timm:NAME`` as freezing blocks, checked against its forward.

    ``cifar_stem`` sets the first convolution's stride to 1 (small images keep 2x the
    resolution through the network, as the registered mobilenet_v2 does); weights keep
    their shapes, so pretrained weights still load.
    """
    library, _, arch = name.partition(":")
    net = _library_net(library, arch, num_classes, width)
    if cifar_stem:
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            first.stride = (1, 1)
    layout = LAYOUTS.get((library, type(net).__name__))
    if layout is None:
        families = sorted(cls for lib, cls in LAYOUTS if lib == library)
        raise ModelError(f"{name} is a {type(net).__name__}, a family without a block layout "
                         f"(known {library} families: {', '.join(families)}); wrap it in your own "
                         "factory that returns spfde_blocks() (docs/models.md)")
    blocks = blocks_from_layout(net, layout, name)
    model = BlockModel(name, blocks, num_classes)
    model.source_names = _source_names(model, blocks, net)
    check_same_function(net, model, name, check_size)
    return model


def _library_net(library: str, arch: str, num_classes: int, width: float | None) -> nn.Module:
    kwargs: dict = {"num_classes": num_classes}
    if width is not None:
        keyword = _WIDTH_KEYWORD.get((library, arch))
        if keyword is None:
            raise ModelError(f"--width does not apply to {library}:{arch}; drop it (width "
                             f"multipliers exist for {', '.join(a for _, a in _WIDTH_KEYWORD)})")
        kwargs[keyword] = width
    if library == "torchvision":
        import torchvision.models as tv_models

        known = tv_models.list_models(module=tv_models)
        if arch not in known:
            raise ModelError(f"torchvision has no classification model '{arch}'; choose one of "
                             "torchvision.models.list_models(module=torchvision.models)")
        return tv_models.get_model(arch, weights=None, **kwargs)
    try:
        import timm
    except ImportError as exc:
        raise ModelError("timm:NAME needs timm: pip install 'spfde-edge[timm]'") from exc
    if arch not in timm.list_models():
        raise ModelError(f"timm has no model '{arch}'; see timm.list_models()")
    return timm.create_model(arch, pretrained=False, **kwargs)


def blocks_from_layout(net: nn.Module, layout: Layout, name: str) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    for entry in layout.body:
        if "+" in entry:
            paths = entry.split("+")
            blocks.append((paths[0], nn.Sequential(*[_module(net, p, name) for p in paths])))
        elif entry.endswith("!"):
            blocks += _children_merged(_module(net, entry[:-1], name), entry[:-1])
        else:
            blocks += _expanded(_module(net, entry, name), entry)
    head = [nn.AdaptiveAvgPool2d(1) if token == "pool" else
            nn.Flatten(1) if token == "flatten" else _module(net, token, name)
            for token in layout.head]
    blocks.append(("head", nn.Sequential(*head)))
    return blocks


def _module(net: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return net.get_submodule(path)
    except AttributeError as exc:
        raise ModelError(f"{name} has no module '{path}' where its family's layout expects one; "
                         "this library version changed the model (docs/models.md)") from exc


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_stage(module: nn.Module) -> bool:
    """A sequence of composite blocks (not of layers such as conv, norm, activation)."""
    children = list(module.children())
    return (isinstance(module, nn.Sequential) and len(children) > 0
            and all(any(True for _ in child.children()) for child in children)
            and not any(isinstance(child, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
                        for child in children))


def _expanded(module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    if not _is_stage(module):
        return [(path, module)]
    found: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        found += _expanded(child, f"{path}.{child_name}")
    return found


def _children_merged(module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    groups: list[tuple[str, list[nn.Module]]] = []
    pending: list[nn.Module] = []
    for child_name, child in module.named_children():
        if _has_parameters(child) or not groups:
            groups.append((f"{path}.{child_name}", pending + [child]))
            pending = []
        else:
            groups[-1][1].append(child)
    return [(group_name, members[0] if len(members) == 1 else nn.Sequential(*members))
            for group_name, members in groups]


def _source_names(model: BlockModel, blocks: list[tuple[str, nn.Module]],
                  net: nn.Module) -> dict[str, str]:
    """``blocks.<i>.<…>`` -> the library's own state-dict name (for its weight files)."""
    library_name = {id(tensor): key for key, tensor in net.state_dict(keep_vars=True).items()}
    return {key: library_name[id(tensor)] for key, tensor in model.state_dict(keep_vars=True).items()
            if id(tensor) in library_name}


def check_same_function(reference: nn.Module, model: BlockModel, name: str, size: int) -> None:
    """Refuse a block split that does not compute what the library model computes."""
    was_training = reference.training
    reference.eval()
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        want = reference(x)
        got = model(x)
    reference.train(was_training)
    model.train(was_training)
    if tuple(got.shape) != (2, model.num_classes):
        raise ModelError(f"{name} returns {tuple(got.shape)} for 2 images, not (2, "
                         f"{model.num_classes}) logits; its head must end in num_classes outputs")
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ModelError(f"the freezing blocks derived for {name} do not compute its forward "
                         f"(output {tuple(got.shape)} vs {tuple(want.shape)}); its family's layout "
                         "needs an update (docs/models.md)")
