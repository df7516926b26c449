"""``python -m device_runner export-model RUN --out model.onnx``: the device-trained model as one ONNX graph.

Input ``image``: float32 ``[N, 3, H, W]``, RGB pixels in 0..255 (H = W = the bundle's input
size; N is dynamic). The bundle's normalisation runs inside the graph as
``Div(255) → Sub(mean) → Div(std)``, exactly the runner's ``normalize``. Output ``logits``
``[N, classes]``; the class names are in the model's metadata (``classes``, JSON).

The graph is composed from the graphs the run itself used, with the ``onnx`` package only:
the bundle's ``prefix.onnx`` of the run's first stage (host weights, masks and BatchNorm
already folded by the exporter); for every stage change of the run, the slice of the
previous stage's eval graph covering the blocks frozen there (what the runner's bridges
run); and the current stage's eval graph cut at ``logits`` (the loss and ``labels``
dropped). Graph inputs that carry parameters become initializers holding the run's arrays;
each ``weight * Cast(mask)`` is replaced by the product itself, so masked weights are stored
as exact zeros and the graph has no mask operators; BatchNormalization stays in inference
mode with the run's running statistics. A weight whose zeros make it smaller as an ONNX
``sparse_initializer`` (float32 values + int64 indices: below 1/3 density) is stored that
way; ONNX Runtime turns sparse initializers into dense tensors when it loads the model.

A format-2 bundle's model is simpler: every block's ``infer.onnx`` in order, its parameter
inputs baked from the run's model state (masked weights are already exact zeros there).

Before anything is written, the graph is checked with ``onnx.checker`` and run on plain
ONNX Runtime against :class:`TrainedModel` on the run's held-out images; above
``PARITY_LIMIT`` (max |Δlogit|) nothing is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .backends._ort import inference_options, onnxruntime
from .backends.ort_prefix import _boundary
from .errors import BundleError, DataError, ExportError
from .files import atomic_write_bytes
from .trained_model import TrainedModel

PARITY_LIMIT = 1e-5
MAX_IR_VERSION = 10   # ONNX Runtime 1.19 loads IR <= 10
INPUT, OUTPUT = "image", "logits"
RANDOM_PARITY_IMAGES = 64


# --- graph pieces -------------------------------------------------------------------------------
def _load(path: Path):
    import onnx
    return onnx.load(os.fspath(path))


def _cut(model, inputs: list[str], output: str):
    """The part of ``model`` from ``inputs`` to ``output`` (unused inputs, e.g. ``labels``, dropped)."""
    import onnx.utils
    return onnx.utils.Extractor(model).extract_model(inputs, [output])


def _copy(message):
    twin = type(message)()
    twin.CopyFrom(message)
    return twin


def _bake(graph, values: dict[str, np.ndarray], masks: list[tuple[str, str]]) -> None:
    """Parameter inputs -> initializers; ``Mul(weight, Cast(mask))`` -> the masked weight itself."""
    from onnx import numpy_helper

    params = [i.name for i in graph.input if i.name in values]
    missing = [i.name for i in graph.input[1:] if i.name not in values]
    if missing:
        raise BundleError(f"the run's state lacks {missing[:3]}, which the eval graph needs; "
                          "the run folder does not belong to this bundle")
    baked = {n: np.asarray(values[n]) for n in params}
    drop = set()  # output names of the Cast and Mul nodes that go
    for mask, weight in masks:
        if mask not in baked:
            continue
        casts = [n for n in graph.node if n.op_type == "Cast" and list(n.input) == [mask]]
        muls = [n for n in graph.node if n.op_type == "Mul" and casts and casts[0].output[0] in n.input
                and weight in n.input]
        if len(casts) != 1 or len(muls) != 1:
            raise BundleError(f"cannot find weight * mask for {weight} in the eval graph; the exporter's "
                              "graph changed (re-export the bundle with this spfde_edge)")
        product = muls[0].output[0]
        for node in graph.node:  # consumers read the masked weight directly
            for i, name in enumerate(node.input):
                if name == product:
                    node.input[i] = weight
        baked[weight] = (baked[weight] * (baked[mask] != 0)).astype(baked[weight].dtype)
        del baked[mask]
        drop.update({casts[0].output[0], product})
    # Copies: a message taken out of a repeated field must not be used after the field is cleared.
    kept = [_copy(n) for n in graph.node if n.output[0] not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    data_input = _copy(graph.input[0])
    del graph.input[:]
    graph.input.append(data_input)
    graph.initializer.extend(numpy_helper.from_array(v, name=n) for n, v in baked.items())


def _rename(graph, tag: str, input_name: str, output_name: str) -> None:
    """Give every tensor of ``graph`` a name unique to this part: its data input becomes
    ``input_name`` (the previous part's output), its output ``output_name``; initializers and
    intermediates get the ``tag/`` prefix unless they carry a parameter name (``blocks.*``)."""
    old_in, old_out = graph.input[0].name, graph.output[0].name

    def new(name: str) -> str:
        if not name:
            return name
        if name == old_in:
            return input_name
        if name == old_out:
            return output_name
        return name if name.startswith("blocks.") else f"{tag}/{name}"

    for node in graph.node:
        node.name = f"{tag}/{node.name}"
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = new(tensor.name)
    graph.input[0].name, graph.output[0].name = input_name, output_name
    del graph.value_info[:]


def _normalisation_nodes(mean: list[float], std: list[float], output: str):
    from onnx import helper, numpy_helper

    # The runner's normalize(): (x / 255 - mean) / std, per channel, in float32.
    consts = [numpy_helper.from_array(np.float32(255.0), "normalize/255"),
              numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, -1, 1, 1), "normalize/mean"),
              numpy_helper.from_array(np.asarray(std, np.float32).reshape(1, -1, 1, 1), "normalize/std")]
    nodes = [helper.make_node("Div", [INPUT, "normalize/255"], ["normalize/scaled"], name="normalize/Div_255"),
             helper.make_node("Sub", ["normalize/scaled", "normalize/mean"], ["normalize/centred"],
                              name="normalize/Sub_mean"),
             helper.make_node("Div", ["normalize/centred", "normalize/std"], [output], name="normalize/Div_std")]
    return nodes, consts


def _block_parts(model: TrainedModel) -> list:
    """Format 2: (tag, graph) of every block's infer program with the run's weights baked in;
    a program shared by blocks of one structure is loaded once per block and named per block."""
    state = model.pipeline.state
    parts = []
    for block in model.bundle.blocks:
        part = _load(block.infer)
        local = f"blocks.{block.index}."
        for name in [i.name for i in part.graph.input[1:]]:
            _rename_value(part.graph, name, local + name)
        _bake(part.graph, state.weights, [])
        parts.append((f"block_{block.index}", part))
    return parts


def _rename_value(graph, old: str, new: str) -> None:
    for value in graph.input:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]


def _stage_parts(model: TrainedModel) -> list:
    """Format 1: (tag, graph) of the bundle prefix, each bridge and the current suffix."""
    bundle, starts, position = model.bundle, model.starts, model.position
    parts = []
    first = bundle.stage(starts[0][0])
    if first.k > 0 and first.prefix_onnx is not None:
        prefix = _load(first.prefix_onnx)
        parts.append(("prefix", prefix))
    frozen = model.frozen_params
    for j in range(1, position + 1):
        k_from, k_to = starts[j - 1][0], starts[j][0]
        stage = bundle.stage(k_from)
        full = _load(stage.eval_model)
        names = [i.name for i in full.graph.input if i.name.startswith("blocks.")
                 and k_from <= int(i.name.split(".")[1]) < k_to]
        parameters = {i.name for i in full.graph.input} - {"features"}
        bridge = _cut(full, ["features", *names], _boundary(full.graph, k_to, parameters))
        _bake(bridge.graph, frozen, list(stage.masks))
        parts.append((f"bridge_{k_from}_{k_to}", bridge))
    stage = bundle.stage(model.stage_k)
    full = _load(stage.eval_model)
    suffix = _cut(full, [i.name for i in full.graph.input if i.name != "labels"], OUTPUT)
    _bake(suffix.graph, model.suffix_parameters(), list(stage.masks))
    parts.append((f"suffix_{stage.k}", suffix))
    return parts


def compose(model: TrainedModel):
    """The ONNX ModelProto of ``model``: normalisation, prefix, bridges, suffix (dense weights)."""
    import onnx
    from onnx import TensorProto, helper

    bundle = model.bundle
    parts = _block_parts(model) if bundle.format_version == 2 else _stage_parts(model)  # (tag, graph)
    nodes, initializers = _normalisation_nodes(bundle.mean, bundle.std, "normalize/output")
    upstream = "normalize/output"
    opsets: dict[str, int] = {}
    for index, (tag, part) in enumerate(parts):
        output = OUTPUT if index == len(parts) - 1 else f"{tag}/output"
        _rename(part.graph, tag, upstream, output)
        nodes.extend(part.graph.node)
        initializers.extend(part.graph.initializer)
        for opset in part.opset_import:
            if opsets.setdefault(opset.domain, opset.version) != opset.version:
                raise ExportError(f"the bundle's graphs use opset {opsets[opset.domain]} and {opset.version} "
                                  f"of domain '{opset.domain}'; re-export the bundle")
        upstream = output
    size = bundle.input_size
    graph = helper.make_graph(
        nodes, f"{bundle.model_name}_device_trained",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", len(bundle.classes)])],
        initializers)
    ir_version = min(MAX_IR_VERSION, max(p.ir_version for _, p in parts))
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                            ir_version=ir_version, producer_name="device_runner export-model")
    meta = {"classes": json.dumps(bundle.classes), "input": f"float32 [N, 3, {size}, {size}] RGB pixels 0..255",
            "normalization": json.dumps({"mean": bundle.mean, "std": bundle.std}),
            "source_run": str(model.run), "source_model": model.describe()}
    onnx.helper.set_model_props(out, meta)
    return out


# --- sparse storage -----------------------------------------------------------------------------
def sparsify(model) -> tuple[int, int]:
    """Move every float initializer that is smaller as a sparse tensor (values + int64 linear
    indices) to ``sparse_initializer``. Returns (tensors moved, bytes of tensor data saved)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    keep, moved, saved = [], 0, 0
    for tensor in map(_copy, graph.initializer):
        array = numpy_helper.to_array(tensor)
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat)
        dense_bytes = flat.nbytes
        sparse_bytes = nonzero.size * (flat.itemsize + 8)
        if tensor.data_type != TensorProto.FLOAT or flat.size == 0 or nonzero.size == 0 \
                or sparse_bytes >= dense_bytes:
            keep.append(tensor)
            continue
        values = numpy_helper.from_array(flat[nonzero], name=tensor.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), name=f"{tensor.name}.indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved += 1
        saved += dense_bytes - sparse_bytes
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved, saved


def masked_weights(model) -> dict[str, np.ndarray]:
    """Every weight initializer of the exported ``model``, dense, by name (sparse ones densified)."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sparse.dims)), np.float32)
        dense[numpy_helper.to_array(sparse.indices).reshape(-1)] = numpy_helper.to_array(sparse.values)
        out[sparse.values.name] = dense.reshape(tuple(sparse.dims))
    return out


# --- parity and the command ---------------------------------------------------------------------
def session(model_bytes: bytes, threads: int | None = None):
    return onnxruntime.InferenceSession(model_bytes, inference_options(threads), providers=["CPUExecutionProvider"])


def parity_images(model: TrainedModel) -> tuple[np.ndarray, str]:
    """The run's held-out images; random images when the run's data cannot be read here."""
    try:
        data = model.held_out()
        return data.images, f"{len(data)} images of the run's {data.source}"
    except DataError as exc:
        size = model.input_size
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (RANDOM_PARITY_IMAGES, 3, size, size), dtype=np.uint8)
        return images, f"{RANDOM_PARITY_IMAGES} random images (the run's data is not readable here: {exc})"


def export_model(run: str | Path, out: str | Path, threads: int | None = None, sparse: bool = True,
                 model: TrainedModel | None = None) -> dict:
    """Compose, check, measure parity, then write ``out`` atomically; ExportError writes nothing."""
    import onnx

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    model = model or TrainedModel(run, threads)
    composed = compose(model)
    dense_bytes = composed.ByteSize()
    try:
        # Shape inference types a sparse initializer as sparse_tensor, which Conv refuses, so the
        # full check runs on the dense graph and the structural check on the sparse one.
        onnx.checker.check_model(composed, full_check=True)
        moved, saved = sparsify(composed) if sparse else (0, 0)
        onnx.checker.check_model(composed)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the composed graph is not valid ONNX ({str(exc).splitlines()[0][:300]}); "
                          "nothing was written") from None
    data = composed.SerializeToString()
    images, parity_source = parity_images(model)
    expected = model.logits(images)
    try:
        got = session(data, threads).run([OUTPUT], {INPUT: images.astype(np.float32)})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run the composed graph: {str(exc).splitlines()[0][:300]}; "
                          "nothing was written") from None
    max_abs = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not np.isfinite(max_abs) or max_abs > PARITY_LIMIT:
        raise ExportError(f"the composed graph's logits differ from the run's by {max_abs:.3g} (max abs, "
                          f"limit {PARITY_LIMIT:g}) on {parity_source}; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return {"out": str(out), "bytes": len(data), "dense_bytes": dense_bytes, "sparse_tensors": moved,
            "sparse_saved_bytes": saved, "parity_max_abs": max_abs, "parity_limit": PARITY_LIMIT,
            "parity_data": parity_source, "ir_version": composed.ir_version,
            "opset": {o.domain or "ai.onnx": o.version for o in composed.opset_import},
            "input": {"name": INPUT, "dtype": "float32", "shape": ["N", 3, model.input_size, model.input_size],
                      "range": "RGB pixels 0..255; normalisation inside the graph"},
            "output": {"name": OUTPUT, "shape": ["N", len(model.classes)]}, "classes": model.classes,
            "model": model.describe()}


def summary(result: dict) -> str:
    return "\n".join([
        f"wrote {result['out']}: {result['bytes']:,} bytes ({result['sparse_tensors']} weight(s) stored sparse, "
        f"{result['sparse_saved_bytes']:,} bytes saved; dense it would be {result['dense_bytes']:,})",
        f"parity with the run's model: max |Δlogit| {result['parity_max_abs']:.2e} (limit "
        f"{result['parity_limit']:g}) on {result['parity_data']}",
        f"input {result['input']['name']}: float32 [N, 3, {result['input']['shape'][2]}, "
        f"{result['input']['shape'][3]}], RGB pixels 0..255; output {result['output']['name']}: "
        f"[N, {result['output']['shape'][1]}]; ONNX IR {result['ir_version']}, opset "
        f"{', '.join(f'{d} {v}' for d, v in result['opset'].items())}",
    ])
