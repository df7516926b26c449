"""Your own model: ``--model package.module:factory`` or ``--model path/to/file.py:factory``.

The contract (docs/models.md): ``factory(num_classes=N)`` returns an ``nn.Module`` that is

* a :class:`~spfde_edge.models.BlockModel`, or
* an ``nn.Sequential`` whose children are the freezing blocks, the last one the head, or
* any module with a ``spfde_blocks()`` method returning ``[(name, module), ...]`` in
  forward order, the last one the head (its ``forward`` is then checked to equal them).

The model takes ``[N, 3, H, W]`` images and returns ``[N, num_classes]`` logits.

Importing a module runs its code, so a user model is imported only when this process was
told its name on the command line (:func:`allow`): a checkpoint or a bundle that names one
never imports it by itself.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from .models import BlockModel, ModelError

_ALLOWED: set[str] = set()


def is_user_model(name: str) -> bool:
    """``a.b:factory`` or ``file.py:factory`` (library models use ``torchvision:``/``timm:``)."""
    module, sep, factory = name.rpartition(":")
    return bool(sep and module and factory) and module not in ("torchvision", "timm")


def allow(name: str | None) -> None:
    """The user named ``name`` on this command line: its code may be imported."""
    if name is not None and is_user_model(name):
        _ALLOWED.add(name)


def build_user_model(name: str, num_classes: int, width: float | None, check_size: int = 32) -> BlockModel:
    from .model_zoo import check_same_function

    if name not in _ALLOWED:
        raise ModelError(f"this run names your own model '{name}'; pass --model {name} to import "
                         "its code (nothing names code to run by itself)")
    if width is not None:
        raise ModelError(f"--width does not apply to your own model {name}; give the factory "
                         "its own arguments instead")
    factory = _load_factory(name)
    try:
        net = factory(num_classes=num_classes)
    except TypeError as exc:
        raise ModelError(f"{name} must accept num_classes=N (the class count of the data): "
                         f"{exc}") from exc
    if isinstance(net, BlockModel):
        net.name = name
        check_same_function(net, net, name, check_size)  # the logits' shape
        return net
    if not isinstance(net, nn.Module):
        raise ModelError(f"{name} returned {type(net).__name__}, not a torch.nn.Module")
    if isinstance(net, nn.Sequential) and not hasattr(net, "spfde_blocks"):
        blocks = list(net.named_children())
    elif callable(getattr(net, "spfde_blocks", None)):
        blocks = [(str(n), m) for n, m in net.spfde_blocks()]
    else:
        raise ModelError(f"{name} returned a {type(net).__name__} without freezing blocks: return an "
                         "nn.Sequential of blocks or add spfde_blocks() -> [(name, module), ...] "
                         "(docs/models.md)")
    if len(blocks) < 2 or not all(isinstance(m, nn.Module) for _, m in blocks):
        raise ModelError(f"{name} must have at least two blocks (the last is the head), each an "
                         f"nn.Module; got {len(blocks)}")
    model = BlockModel(name, blocks, num_classes)
    check_same_function(net, model, name, check_size)
    return model


def _load_factory(name: str):
    target, _, attribute = name.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"--model {name}: no file {path}")
        module_name = f"spfde_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ModelError(f"--model {name}: importing {path} failed: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"--model {name}: cannot import {target} ({exc}); install it or put "
                             "it on PYTHONPATH") from exc
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise ModelError(f"--model {name}: {target} has no callable '{attribute}'")
    if inspect.isclass(factory) and not issubclass(factory, nn.Module):
        raise ModelError(f"--model {name}: {attribute} is a class but not an nn.Module")
    return factory
