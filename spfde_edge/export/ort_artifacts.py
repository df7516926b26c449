"""ONNX Runtime on-device training graphs for every block boundary, without weights (bundle v2).

Bundle v2 stores the weights once, in the sparse store; the ORT training artifacts of a
boundary ``k`` (train blocks ``[k, n)``) are graphs only. The device builds the ORT
checkpoint of a boundary from its in-memory arrays the first time it trains there
(device_runner/backends/ort_checkpoint.py), so no weight is ever duplicated per stage.

Masks are not in any graph: the device multiplies each gradient by its mask before its
numpy SGD, so masked weights (stored as exact zeros) stay exactly zero.

The torch lowering happens once: the TorchScript exporter (the one that keeps BatchNorm in
training mode, which ORT's gradient builder needs) writes the whole model, blocks ``0..n-1``,
with each BatchNorm's batch mean and unbiased variance as extra graph outputs (as in
suffix.py). Each boundary's forward graph is then cut out of that one graph (what
``onnx.utils.Extractor`` does, in linear time; the tensor entering block ``k`` becomes the
``features`` input) and handed to ``onnxruntime.training.artifacts.generate_artifacts``; the checkpoint it
writes is deleted.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spfde_edge.models import BlockModel

from .suffix import FEATURES_INPUT, LOGITS_OUTPUT, TrainableSuffix, _fix_eval_model, generate_suffix_artifacts

ORT_FOLDER = "ort"
GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
MAX_INITIALIZER_BYTES = 1024   # graphs carry no weights: anything bigger is a leak


@dataclass
class BoundaryArtifacts:
    k: int
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    parameters: list[str]        # trainable, ``blocks.<i>.…``, in the training graph's input order
    frozen: list[str]            # running statistics, in the training graph's input order
    training_outputs: list[str]  # loss, logits, then one batch mean and var per BatchNorm
    eval_outputs: list[str]      # loss, logits
    batchnorms: list[dict]       # rows of TrainableSuffix.batchnorm_table() for blocks >= k
    timings: dict = field(default_factory=dict, compare=False)   # seconds, for reports

    @property
    def folder(self) -> Path:
        return self.training_model.parent

    def files(self) -> list[Path]:
        return [self.training_model, self.eval_model, self.optimizer_model]


def boundary_folder(folder: Path, k: int) -> Path:
    return Path(folder) / ORT_FOLDER / f"k{k:02d}"


def _block_of(name: str) -> int:
    return int(name.split(".")[1])


def _lower(model: BlockModel, example: torch.Tensor, opset: int):
    """The whole model in training mode as one ONNX graph, with BatchNorm batch statistics."""
    import onnx

    whole = TrainableSuffix(model, 0, masks={}).train()   # deep copies: tracing moves its stats only
    stats = whole.stat_output_names()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # legacy exporter; num_batches_tracked increment dropped
        torch.onnx.export(
            whole, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[FEATURES_INPUT], output_names=[LOGITS_OUTPUT, *stats],
            dynamic_axes={FEATURES_INPUT: {0: "batch"}, LOGITS_OUTPUT: {0: "batch"}},
            training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    return whole, onnx.load_from_string(buffer.getvalue())


def _block_input(graph, k: int, initializers: set[str]) -> str:
    """The one tensor entering block ``k`` from outside it (cf. ort_prefix._boundary)."""
    scope = f"/blocks.{k}/"
    nodes = [n for n in graph.node if n.name.startswith(scope)]
    produced = {out for n in nodes for out in n.output}
    # The exporter shares equal constants between blocks (e.g. ReLU6's 6): not an activation.
    constants = {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    external: list[str] = []
    for node in nodes:
        for name in node.input:
            if (name and name not in produced and name not in initializers and name not in constants
                    and name not in external):
                external.append(name)
    if len(external) != 1:
        raise RuntimeError(f"cannot find the input of block {k} in the lowered graph "
                           f"(candidates {external[:4]}); the exporter's node naming changed")
    return external[0]


def _cut(inferred, input_name: str, output_names: list[str], new_input: str = FEATURES_INPUT,
         batch_dim: str = "batch"):
    """The subgraph from ``input_name`` (renamed ``new_input``) to ``output_names``.

    What ``onnx.utils.Extractor.extract_model`` does, in linear time (its reachability search
    rescans the whole graph per node: 0.3 s per boundary of a 17-block ResNet-32), keeping
    the nodes in their original (topological) order and only the initializers they use.
    """
    import onnx
    from onnx import helper

    graph = inferred.graph
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    initializers = {init.name: init for init in graph.initializer}
    keep: set[int] = set()
    used: set[str] = set()
    stack = list(output_names)
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        if name == input_name or name in initializers:
            continue
        index = producer.get(name)
        if index is None:
            raise RuntimeError(f"the cut from {input_name!r} also needs the graph input {name!r}")
        keep.add(index)
        stack.extend(n for n in graph.node[index].input if n)
    if input_name not in used:
        raise RuntimeError(f"the outputs {output_names[:2]} do not depend on {input_name!r}")

    nodes = []
    for index in sorted(keep):
        node = onnx.NodeProto()
        node.CopyFrom(graph.node[index])
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = new_input
        nodes.append(node)
    infos = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    if input_name not in infos:
        raise RuntimeError(f"shape inference gave no type for {input_name!r}")
    features = onnx.ValueInfoProto()
    features.CopyFrom(infos[input_name])
    features.name = new_input
    outputs = [infos[name] for name in output_names]
    value_info = [infos[name] for name in sorted(used - {input_name} - set(output_names) - set(initializers))
                  if name in infos]
    cut = helper.make_graph(nodes, graph.name, [features], outputs,
                            initializer=[initializers[n] for n in initializers if n in used],
                            value_info=value_info)
    model = helper.make_model(cut, opset_imports=inferred.opset_import, ir_version=inferred.ir_version,
                              producer_name=inferred.producer_name,
                              producer_version=inferred.producer_version)
    # Shape inference may have written the example's batch size; keep it dynamic.
    for value in (*model.graph.input, *model.graph.output):
        if value.name in (new_input, LOGITS_OUTPUT):
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = batch_dim
    return model


def _tensor_bytes(tensor) -> int:
    return tensor.ByteSize()


def large_tensors(path: Path, limit: int = MAX_INITIALIZER_BYTES,
                  names: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(name, bytes) of every initializer or Constant tensor over ``limit`` in an ONNX file,
    and of every initializer named in ``names`` (a model parameter baked into a graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for init in graph.initializer:
            if (init.data_location == onnx.TensorProto.EXTERNAL or _tensor_bytes(init) > limit
                    or init.name in names):
                found.append((init.name, _tensor_bytes(init)))
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR and _tensor_bytes(attribute.t) > limit:
                    found.append((f"{node.name or node.op_type}.{attribute.name}", _tensor_bytes(attribute.t)))
                graphs.extend(attribute.graphs)
                if attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
    return found


def _drop_weight_data(proto) -> None:
    """Replace every initializer's data by a 4-byte placeholder (dims and type kept).

    ``generate_artifacts`` moves every parameter to a graph input before ORT's gradient
    builder sees the graph, so the values reach only the checkpoint, which is deleted; but
    copying ResNet-18's 45 MB through its deep copies, checker and checkpoint writer was
    ~85 % of its time (3.5 s of 4.1 s over 10 boundaries). The graphs are byte-identical
    either way (checked on ResNet-18, all boundaries). onnx's checker needs one value field
    and does not check its size; neither does ORT 1.19's save_checkpoint (a newer ORT that
    did would fail loudly: pass ``placeholder_weights=False``).
    """
    for init in proto.graph.initializer:
        for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
            init.ClearField(name)
        init.raw_data = b"\0" * 4


def _reset_onnxblock_names() -> None:
    """Restart onnxblock's process-wide counter of generated names (``onnx::loss::<n>``).

    Without this the loss output's name depends on how many graphs the process built
    before, so the same model gave different bytes (and manifest hashes) per run and per
    boundary.
    """
    from onnxruntime.training.onnxblock import _graph_utils

    if hasattr(_graph_utils, "_GRAPH_TOKEN"):
        _graph_utils._GRAPH_TOKEN = 0


def export_training_artifacts(model: BlockModel, boundaries: list[int], example: torch.Tensor,
                              folder: Path, opset: int = 17,
                              placeholder_weights: bool = True) -> dict[int, BoundaryArtifacts]:
    """Weightless ORT training/eval/optimizer graphs of every boundary in ``folder/ort/kKK/``.

    ``example`` is a model input (the batch size is dynamic in every graph). The graphs
    name parameters as the model's state_dict (``blocks.<i>.…``); the device must build each
    boundary's checkpoint with ``parameters`` (trainable) and ``frozen`` (running statistics),
    e.g. with device_runner.backends.ort_checkpoint.write_checkpoint. The graphs do not
    depend on the weights' values (see ``_drop_weight_data``).
    """
    import onnx
    import onnx.shape_inference

    n = len(model.blocks)
    boundaries = sorted(set(int(k) for k in boundaries))
    if any(not 0 <= k < n for k in boundaries):
        raise ValueError(f"boundaries {boundaries} outside 0..{n - 1}")

    start = time.perf_counter()
    whole, proto = _lower(model, example, opset)
    lowering_s = time.perf_counter() - start

    trainable_all = [name for name, _ in whole.named_parameters()]
    table_all = whole.batchnorm_table()
    frozen_all = [row[key] for row in table_all for key in ("running_mean", "running_var")]
    initializers = {i.name for i in proto.graph.initializer}
    unknown = sorted(initializers - set(trainable_all) - set(frozen_all))
    if unknown:
        # Anything else would be baked into a graph where the device cannot see it.
        raise RuntimeError(f"lowered graph has unexpected initializers {unknown[:5]}")
    unused = [p for p in trainable_all if p not in initializers]
    if unused:
        raise RuntimeError(f"parameters {unused[:5]} are not in the lowered graph")
    if placeholder_weights:
        _drop_weight_data(proto)
    # Shape inference on the whole graph once gives every boundary its input's type.
    start = time.perf_counter()
    inferred = onnx.shape_inference.infer_shapes(proto)
    inputs_of = {k: (FEATURES_INPUT if k == 0 else _block_input(proto.graph, k, initializers))
                 for k in boundaries}
    inference_s = time.perf_counter() - start

    trainable_set, frozen_set = set(trainable_all), set(frozen_all)
    state_names = trainable_set | frozen_set
    results: dict[int, BoundaryArtifacts] = {}
    for k in boundaries:
        timings = {"lowering_s": lowering_s, "shape_inference_s": inference_s}
        start = time.perf_counter()
        table = [row for row in table_all if _block_of(row["name"]) >= k]
        stats = [row[key] for row in table for key in ("batch_mean_output", "batch_var_output")]
        cut = _cut(inferred, inputs_of[k], [LOGITS_OUTPUT, *stats])
        kept = [i.name for i in cut.graph.initializer]
        outside = [name for name in kept if _block_of(name) < k]
        if outside:
            raise RuntimeError(f"boundary {k}: graph reaches parameters of earlier blocks {outside[:3]}")
        trainable = [name for name in kept if name in trainable_set]
        frozen = [name for name in kept if name in frozen_set]
        expected = [p for p in trainable_all if _block_of(p) >= k]
        if sorted(trainable) != sorted(expected):
            raise RuntimeError(f"boundary {k}: graph parameters differ from blocks {k}.. "
                               f"({sorted(set(expected) ^ set(trainable))[:3]})")
        timings["cut_s"] = time.perf_counter() - start

        out = boundary_folder(folder, k)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        _reset_onnxblock_names()
        generate_suffix_artifacts(cut, trainable, frozen, stats, out)
        timings["generate_artifacts_s"] = time.perf_counter() - start

        start = time.perf_counter()
        for path in out.iterdir():        # the checkpoint (and anything else) holds weights
            if path.is_file() and path.name not in GRAPH_FILES:
                path.unlink()
        training = onnx.load(str(out / GRAPH_FILES[0]), load_external_data=False)
        training_outputs = [o.name for o in training.graph.output][: 2 + len(stats)]
        graph_inputs = [i.name for i in training.graph.input]
        parameters = [name for name in graph_inputs if name in set(trainable)]
        frozen = [name for name in graph_inputs if name in set(frozen)]
        _fix_eval_model(out / GRAPH_FILES[1], training_outputs[:2])
        for path in (out / name for name in GRAPH_FILES):
            leaks = large_tensors(path, names=state_names)
            if leaks:
                raise RuntimeError(f"{path} holds model parameters or tensors over "
                                   f"{MAX_INITIALIZER_BYTES} bytes (weights must live only in the "
                                   f"weight store): {leaks[:3]}")
        timings["finish_s"] = time.perf_counter() - start
        timings["bytes"] = {name: (out / name).stat().st_size for name in GRAPH_FILES}
        results[k] = BoundaryArtifacts(
            k=k, training_model=out / GRAPH_FILES[0], eval_model=out / GRAPH_FILES[1],
            optimizer_model=out / GRAPH_FILES[2], parameters=parameters, frozen=frozen,
            training_outputs=training_outputs, eval_outputs=training_outputs[:2],
            batchnorms=table, timings=timings)
    return results
