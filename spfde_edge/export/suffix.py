"""The trainable sparse suffix as ONNX Runtime on-device training artifacts, and its parity checks.

Stage k trains blocks ``[k, n)``. The exported graph is that suffix in training mode with
two additions, both plain ONNX operators:

* **Masks in the graph.** Every masked weight is used as ``weight * weight_mask``; the mask
  is a non-trainable checkpoint parameter (``<layer>.weight_mask``, uint8, 1 = active).
  The gradient of a masked-out position is therefore exactly zero, so plain SGD never
  moves it: stored weights that start at zero stay exactly zero, and the effective weights
  are exactly sparse whatever the optimizer does. The device changes a mask (prune-and-
  grow) by rewriting that checkpoint parameter; no re-export.
* **BatchNorm statistics as outputs.** ORT training runs BatchNorm with batch statistics
  but never updates the running statistics (they are constant inputs of its graph). The
  running mean/var are non-trainable checkpoint parameters, and the training graph also
  returns the batch mean and unbiased variance at every BatchNorm input, so the device
  applies PyTorch's update ``running = (1 - momentum) * running + momentum * batch`` after
  each step (or averages them over a few batches before evaluating) and rewrites the
  parameters. The eval graph uses the running statistics, exactly as PyTorch's eval mode.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spfde_edge.models import BlockModel

FEATURES_INPUT = "features"
LABELS_INPUT = "labels"
LOGITS_OUTPUT = "logits"
MASK_SUFFIX = "_mask"
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


class MaskedConv2d(nn.Conv2d):
    """Conv2d whose effective weight is ``weight * weight_mask`` (a buffer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.weight_mask.to(self.weight.dtype), self.bias)


class MaskedLinear(nn.Linear):
    """Linear whose effective weight is ``weight * weight_mask`` (a buffer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_mask.to(self.weight.dtype), self.bias)


class BatchStatsSink:
    """Collects the batch mean and unbiased variance of each BatchNorm's input (a forward
    pre-hook, so BatchNorm2d subclasses such as timm's BatchNormAct2d work too)."""

    def __init__(self) -> None:
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.names: dict[int, str] = {}        # for the refusal below

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.values is not None:
            if id(module) in self.values:
                # Its running statistics would move twice per step, which no graph here expresses.
                raise NotImplementedError(f"BatchNorm {self.names.get(id(module), '?')} is called twice "
                                          "in one forward, which the suffix export does not support")
            x = args[0]
            self.values[id(module)] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True))


class ReluThenClampReLU6(nn.ReLU6):
    """ReLU6 as ``clamp(relu(x), max=6)`` for ONNX Runtime's gradient builder: its gradient of
    one ``Clip(0, 6)`` passes the gradient at x == 0, PyTorch's does not, and a BatchNorm channel
    that a sparse mask left constant sits exactly there (mobilenet_v2). ``Relu``'s gradient is
    zero at 0, as PyTorch's. Same forward values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.relu(x), max=self.max_val)


class ReluClampHardsigmoid(nn.Hardsigmoid):
    """Hardsigmoid as ``clamp(relu(x + 3), max=6) / 6``: ONNX Runtime registers no gradient
    for ``HardSigmoid``; through ``Relu`` its gradient is zero at -3, as PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.relu(x + 3.0), max=6.0) / 6.0


class ReluClampHardswish(nn.Hardswish):
    """Hardswish as ``x * hardsigmoid(x)`` built from Relu and Clip (no ``HardSwish`` gradient
    in ONNX Runtime); its gradient x/3 + 1/2 on (-3, 3) is PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.clamp(torch.relu(x + 3.0), max=6.0) / 6.0)


# Activations lowered to ops whose gradients ONNX Runtime has and that agree with PyTorch's.
ORT_LOWERINGS = {nn.ReLU6: "ReluThenClampReLU6", nn.Hardsigmoid: "ReluClampHardsigmoid",
                 nn.Hardswish: "ReluClampHardswish"}


class TrainableSuffix(nn.Module):
    """Blocks ``[k, n)`` of a model, masks in the graph; ``forward`` -> (logits, *bn stats).

    Parameter and buffer names keep the model's ``blocks.<i>.…`` names, so the checkpoint
    of every stage speaks the same names as the PyTorch model.
    """

    def __init__(self, model: BlockModel, k: int, masks: dict[str, torch.Tensor]):
        super().__init__()
        self.k = k
        self.blocks = nn.Module()
        for index in range(k, len(model.blocks)):
            self.blocks.add_module(str(index), copy.deepcopy(model.blocks[index]))
        self.mask_names: list[str] = []
        self.batchnorms: list[tuple[str, nn.BatchNorm2d]] = []
        self.sink = BatchStatsSink()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in masks:
                module.__class__ = MaskedConv2d if isinstance(module, nn.Conv2d) else MaskedLinear
                module.register_buffer("weight_mask", masks[f"{name}.weight"].to(torch.uint8).clone())
                self.mask_names.append(f"{name}.weight{MASK_SUFFIX}")
            elif isinstance(module, nn.BatchNorm2d):
                module.register_forward_pre_hook(self.sink)
                self.sink.names[id(module)] = name
                self.batchnorms.append((name, module))
            elif type(module) in ORT_LOWERINGS:
                module.__class__ = globals()[ORT_LOWERINGS[type(module)]]
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise NotImplementedError(f"{type(module).__name__} at {name} is not supported "
                                          "by the suffix export (only BatchNorm2d)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.sink.values = {} if self.training else None
        try:
            for block in self.blocks.children():
                x = block(x)
            # in the order of stat_output_names, whatever order the blocks call them in
            stats = [t for _, bn in self.batchnorms for t in self.sink.values[id(bn)]] if self.training else []
        finally:
            self.sink.values = None
        return (x, *stats)

    def stat_output_names(self) -> list[str]:
        return [f"{name}.batch_{kind}" for name, _ in self.batchnorms for kind in ("mean", "var")]

    def batchnorm_table(self) -> list[dict]:
        """What the device needs to keep running statistics right, one row per BatchNorm."""
        return [{"name": name, "running_mean": f"{name}.running_mean",
                 "running_var": f"{name}.running_var", "batch_mean_output": f"{name}.batch_mean",
                 "batch_var_output": f"{name}.batch_var", "momentum": float(bn.momentum)}
                for name, bn in self.batchnorms]

    def apply_masks(self) -> None:
        """Zero the stored weights under the masks (the graph masks them anyway)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (MaskedConv2d, MaskedLinear)):
                    module.weight.mul_(module.weight_mask)


@dataclass
class SuffixArtifacts:
    folder: Path
    parameters: list[str]        # trainable, in checkpoint order
    masks: list[str]
    batchnorms: list[dict]
    training_outputs: list[str]  # loss, logits, then one batch mean and var per BatchNorm
    eval_outputs: list[str]      # loss, logits


@contextlib.contextmanager
def _quiet_native_stderr():
    """ORT's gradient builder logs every graph pass to fd 2: silenced. Its failures raise with
    the reason (the exporter turns them into one line naming the operator and the block)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _export_training_graph(suffix: TrainableSuffix, example: torch.Tensor, opset: int):
    """ONNX of the suffix in training mode, with initializers equal to ``suffix``'s state."""
    import onnx
    from onnx import numpy_helper

    buffer = io.BytesIO()
    traced = copy.deepcopy(suffix).train()
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that keeps BatchNorm in training mode
        # (torch.onnx.TrainingMode.TRAINING), which ORT's gradient builder needs; it warns
        # that it is legacy and that num_batches_tracked's increment is dropped (unused).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[FEATURES_INPUT], output_names=[LOGITS_OUTPUT, *suffix.stat_output_names()],
            dynamic_axes={FEATURES_INPUT: {0: "batch"}, LOGITS_OUTPUT: {0: "batch"}},
            training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    proto = onnx.load_from_string(buffer.getvalue())
    # Tracing ran a training-mode forward on the copy, which moved its running statistics;
    # the artifacts must start from the model's own values.
    state = suffix.state_dict()
    for init in proto.graph.initializer:
        if init.name in state:
            init.CopyFrom(numpy_helper.from_array(state[init.name].detach().cpu().numpy(), init.name))
    return proto


def _fix_eval_model(path: Path, keep_outputs: list[str]) -> None:
    """Make the generated eval graph loadable and lean.

    ``generate_artifacts`` copies the training-mode BatchNormalization nodes (3 outputs) into
    the eval graph, which ORT refuses to load; inference BatchNormalization has one output
    and training_mode=0. The batch-statistics outputs are dropped, with the nodes only they
    needed.
    """
    import onnx

    model = onnx.load(path)
    graph = model.graph
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            for attribute in node.attribute:
                if attribute.name == "training_mode":
                    attribute.i = 0
    keep_only_outputs(graph, keep_outputs)
    onnx.save(model, path)


def keep_only_outputs(graph, keep: list[str]) -> set[str]:
    """Drop the graph outputs not in ``keep`` and every node only they needed; returns the
    tensor names the remaining nodes still read."""
    outputs = [o for o in graph.output if o.name in keep]
    del graph.output[:]
    graph.output.extend(outputs)
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return needed


def generate_suffix_artifacts(proto, trainable: list[str], frozen: list[str], stats: list[str],
                              folder: Path) -> None:
    """ORT's training, eval and optimizer graphs (and checkpoint) of a lowered suffix in
    ``folder``: cross entropy on the logits, SGD, the logits and BatchNorm batch statistics
    as extra outputs. Both bundle formats build their artifacts here."""
    from onnxruntime.training import artifacts

    with _quiet_native_stderr():
        artifacts.generate_artifacts(
            proto, requires_grad=trainable, frozen_params=frozen,
            loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.SGD,
            artifact_directory=str(folder), loss_input_names=[LOGITS_OUTPUT],
            additional_output_names=[LOGITS_OUTPUT, *stats])


def export_suffix(model: BlockModel, masks: dict[str, torch.Tensor], k: int,
                  example: torch.Tensor, folder: Path, opset: int) -> SuffixArtifacts:
    """Write training/eval/optimizer models and the checkpoint of stage ``k`` into ``folder``."""
    suffix = TrainableSuffix(model, k, masks).train()
    suffix.apply_masks()
    proto = _export_training_graph(suffix, example, opset)
    trainable = [name for name, _ in suffix.named_parameters()]
    frozen = list(suffix.mask_names)
    for row in suffix.batchnorm_table():
        frozen += [row["running_mean"], row["running_var"]]
    unknown = sorted({i.name for i in proto.graph.initializer} - set(trainable) - set(frozen))
    if unknown:
        # Anything else would be baked into the graph where the device cannot see it.
        raise RuntimeError(f"suffix graph has unexpected initializers {unknown[:5]}")
    stats = suffix.stat_output_names()
    folder.mkdir(parents=True, exist_ok=True)
    generate_suffix_artifacts(proto, trainable, frozen, stats, folder)
    import onnx

    training = onnx.load(folder / "training_model.onnx", load_external_data=False)
    training_outputs = [o.name for o in training.graph.output][: 2 + len(stats)]
    _fix_eval_model(folder / "eval_model.onnx", training_outputs[:2])
    return SuffixArtifacts(folder=folder, parameters=trainable, masks=frozen[: len(suffix.mask_names)],
                           batchnorms=suffix.batchnorm_table(), training_outputs=training_outputs,
                           eval_outputs=training_outputs[:2])


# -- parity ------------------------------------------------------------------------------------

def _ort_session(folder: Path):
    import onnxruntime
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    # Loading the optimizer graph warns about the shape of its "updated" flag (harmless).
    onnxruntime.set_default_logger_severity(3)

    state = CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"))
    optimizer = Optimizer(str(folder / "optimizer_model.onnx"), module)
    return state, module, optimizer


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a - b).max()) / max(scale, 1e-12) if a.size else 0.0


def _norm_rel(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """``||a - b|| / ||b||`` over all pairs taken as one vector.

    Used for weights and updates instead of a per-tensor ratio: BatchNorm biases sit near
    zero and their gradients nearly cancel (the next BatchNorm removes any shift), so a
    per-tensor ratio divides float32 rounding by almost nothing.
    """
    diff = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in pairs)
    norm = sum(float(np.sum(np.asarray(b, dtype=np.float64) ** 2)) for _, b in pairs)
    return (diff / max(norm, 1e-300)) ** 0.5


def check_suffix(model: BlockModel, masks: dict[str, torch.Tensor], k: int, folder: Path,
                 artifacts: SuffixArtifacts, batch_size: int, feature_shape: list[int],
                 num_classes: int, steps: int = 10, lr: float = 0.01, seed: int = 0) -> dict:
    """Measure the suffix artifacts against the PyTorch suffix, computed in float64.

    float64 because the reference must be more exact than what it judges: the gradient of a
    BatchNorm bias sums many terms that nearly cancel, and PyTorch's float32 CPU kernel was
    measured 8e-3 (relative) away from float64 on a fresh ResNet-18 while ORT was 7e-7 away.

    * eval model vs PyTorch eval mode on the exported weights (max abs logits diff);
    * ``steps`` training steps on the device's recipe (ORT step, SGD, running statistics
      from the batch-statistics outputs). Before each step PyTorch starts from ORT's
      current weights and statistics and takes the same step; loss, updated weights and
      running statistics are compared per step. (Letting the two run apart for 10 steps
      measures the chaos of a random network on random data, not the export: 1e-7 grew
      to 1e-1 on a fresh ResNet-18.) Step 0 is the one-step parity of issue 3;
    * eval again with the trained weights and updated statistics;
    * masked weights after the steps, which must be exactly zero.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn([batch_size, *feature_shape], generator=generator),
                torch.randint(0, num_classes, (batch_size,), generator=generator))
               for _ in range(steps)]
    reference = TrainableSuffix(model, k, masks).double()
    reference.apply_masks()
    state, module, optimizer = _ort_session(folder)
    optimizer.set_learning_rate(lr)
    ref_params = dict(reference.named_parameters())
    ref_buffers = dict(reference.named_buffers())
    # The device keeps the running statistics itself: ORT 1.19's CPU BatchNorm kernel also
    # moves the checkpoint values in place during train_step (with the biased variance,
    # ONNX semantics), so the values written back are computed from the device's own copy,
    # never read back from the checkpoint.
    running = {row[key]: state.parameters[row[key]].data.copy()
               for row in artifacts.batchnorms for key in ("running_mean", "running_var")}

    def sync_reference() -> None:
        with torch.no_grad():
            for name, param in ref_params.items():
                param.copy_(torch.from_numpy(state.parameters[name].data))
            for name, value in running.items():
                ref_buffers[name].copy_(torch.from_numpy(value))

    def eval_diff(x: torch.Tensor) -> float:
        module.eval()
        ort = module(x.numpy(), np.zeros(len(x), dtype=np.int64))[1]
        reference.eval()
        with torch.no_grad():
            return float(np.abs(ort - reference(x.double())[0].numpy()).max())

    x0 = batches[0][0]
    eval_abs = eval_diff(x0)
    sgd = torch.optim.SGD(reference.parameters(), lr=lr)
    per_step = []
    for x, y in batches:
        sync_reference()
        before = {n: p.detach().numpy().copy() for n, p in ref_params.items()}
        module.train()
        # Copies: the arrays may alias ORT buffers that the next call reuses.
        outputs = [np.array(o, copy=True) for o in module(x.numpy(), y.numpy().astype(np.int64))]
        optimizer.step()
        module.lazy_reset_grad()
        for row, mean, var in zip(artifacts.batchnorms, outputs[2::2], outputs[3::2]):
            m = row["momentum"]
            for key, batch in (("running_mean", mean), ("running_var", var)):
                running[row[key]] = ((1.0 - m) * running[row[key]] + m * batch).astype(np.float32)
                state.parameters[row[key]] = running[row[key]]

        reference.train()
        ref_out = reference(x.double())
        loss = F.cross_entropy(ref_out[0], y)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        per_step.append({
            "loss": abs(float(outputs[0]) - loss.item()) / max(abs(loss.item()), 1e-12),
            "weights": _norm_rel([(state.parameters[n].data, p.detach().numpy())
                                  for n, p in ref_params.items()]),
            "update": _norm_rel([(state.parameters[n].data - before[n], p.detach().numpy() - before[n])
                                 for n, p in ref_params.items()]),
            "worst_tensor": max(_max_rel(state.parameters[n].data, p.detach().numpy())
                                for n, p in ref_params.items()),
            "stats": max((_max_rel(o, t.detach().numpy()) for o, t in zip(outputs[2:], ref_out[1:])),
                         default=0.0),
            "running": max((_max_rel(running[n], ref_buffers[n].numpy()) for n in running), default=0.0),
        })
    sync_reference()
    eval_after_abs = eval_diff(x0)

    revived = 0
    for mask_name in artifacts.masks:
        weight_name = mask_name[: -len(MASK_SUFFIX)]
        mask = state.parameters[mask_name].data
        revived += int(np.count_nonzero(state.parameters[weight_name].data[mask == 0]))
    return {
        "eval_logits_max_abs": eval_abs,
        "train_step_loss_rel": per_step[0]["loss"],
        "train_step_weights_rel": per_step[0]["weights"],
        "train_step_update_rel": per_step[0]["update"],
        "train_step_worst_tensor_rel": per_step[0]["worst_tensor"],
        "train_step_bn_stats_rel": per_step[0]["stats"],
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "steps_loss_rel_max": max(r["loss"] for r in per_step),
        "steps_weights_rel_max": max(r["weights"] for r in per_step),
        "steps_update_rel_max": max(r["update"] for r in per_step),
        "steps_worst_tensor_rel_max": max(r["worst_tensor"] for r in per_step),
        "steps_running_stats_rel_max": max(r["running"] for r in per_step),
        "eval_after_steps_logits_max_abs": eval_after_abs,
        "masked_nonzero_after_steps": revived,
    }
