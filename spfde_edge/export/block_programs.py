"""Each block of the model as three standard-ONNX programs, lowered once (bundle format 2).

A stage is "blocks before k run forward only, blocks from k train". Instead of one graph
per stage (whose cost and size grow with stages × depth), every block ``i`` is exported once:

Inputs and outputs carry the block's own tensor names (``conv1.weight``, ``conv1.weight.grad``,
``bn1.running_mean.new``), so blocks of the same structure share their programs.

* ``infer.onnx``: eval-mode forward ``(x, parameters, running stats) -> y``; frozen blocks,
  evaluation and the trained model on the device;
* ``train.onnx``: training-mode forward ``(x, parameters, running stats) -> (y, updated running
  stats, saved tensors)``; the saved tensors are what its backward needs;
* ``backward.onnx``: ``(parameters it needs, x if needed, saved tensors, grad_y) ->
  (one gradient per parameter, grad_x)``; ``backward_first.onnx`` is the same without
  ``grad_x`` (the first trainable block has no one to pass it to).

Parameters are graph *inputs*: the weights live once, in the bundle's weight store, and the
device feeds the same arrays to every program. Masks are not in any graph: masked weights
are stored as exact zeros and the device multiplies gradients by the mask before its SGD
step, so they stay zero (and the dense gradient RigL grows by comes for free).

How a block is split (the idea of AOTAutograd's partitioner, written for this graph shape):
``torch.export`` of ``sum(block(x) * grad_y)`` with ``x`` requiring grad, lowered by
``_decompose_exported_program(joint_loss_index=0)`` with the step graph's decompositions
(BatchNorm in reductions, ``convolution_backward`` in forward convolutions, see
step_graph.py), gives one joint graph whose outputs include the parameter gradients and
``GRADIENT_TO_USER_INPUT``. Nodes that do not depend on ``grad_y`` and that ``y`` or the
running statistics need are the forward; the rest is the backward; forward values the
backward reads become the saved outputs. The batch size stays symbolic: a size the
backward needs is read from ``grad_y`` again instead of being saved.
"""
from __future__ import annotations

import operator
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from device_runner.errors import BundleError

from .step_graph import STEP_OPSET, _decomposed_already, cached_onnx_registry, decomposition_table

INPUT, OUTPUT, GRAD_OUTPUT, GRAD_INPUT = "x", "y", "grad_y", "grad_x"
NEW_SUFFIX, GRAD_SUFFIX, SAVED_PREFIX = ".new", ".grad", "saved."
PROGRAM_FILES = ("infer.onnx", "train.onnx", "backward.onnx", "backward_first.onnx")
EXAMPLE_BATCH = 3   # odd, so torch.export never confuses the batch with a channel count


@dataclass
class BlockPrograms:
    """What the device needs to run block ``index`` (paths are absolute here)."""

    index: int
    folder: Path
    parameters: list[str]              # trainable, model names (blocks.<i>.…), train/infer input order;
                                       # the graphs name them without the ``blocks.<i>.`` prefix
    running_stats: list[str]           # BatchNorm running mean/var, model names
    backward_parameters: list[str]     # the parameters backward.onnx takes
    backward_needs_input: bool         # backward.onnx takes x
    saved: list[str]                   # saved.<j> names, in train.onnx output order
    input_shape: list[int]             # per sample
    output_shape: list[int]
    lowered: int = 0                   # torch lowerings done for this block (export cost, tests)
    seconds: dict[str, float] = field(default_factory=dict)

    def path(self, program: str) -> Path:
        return self.folder / f"{program}.onnx"


def structure_key(model: nn.Module, index: int, input_shape: tuple[int, ...]) -> str:
    """Blocks with equal keys have identical programs (same modules, shapes and input)."""
    block = model.blocks[index]
    shapes = [(n, tuple(t.shape), str(t.dtype)) for n, t in block.state_dict().items()]
    return repr((repr(block), shapes, tuple(input_shape), block.training))


def block_state(model: nn.Module, index: int) -> tuple[list[str], list[str]]:
    """(parameter names, running-stat names) of block ``index``, as model state names."""
    block = model.blocks[index]
    prefix = f"blocks.{index}."
    parameters = [prefix + n for n, _ in block.named_parameters()]
    running = [prefix + n for n, _ in block.named_buffers() if n.endswith(("running_mean", "running_var"))]
    for name, module in block.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            raise BundleError(f"BatchNorm {prefix}{name} uses a cumulative average (momentum=None), "
                              "which the device cannot continue; give it a momentum (PyTorch's is 0.1)")
    return parameters, running


class _Joint(nn.Module):
    """``(x, grad_y) -> (sum(block(x) * grad_y), block(x))``: its joint graph is the block's
    forward and backward, with ``grad_y`` as the incoming gradient."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, grad_y: torch.Tensor):
        y = self.block(x)
        return (y * grad_y).sum(), y.detach()


class _Infer(nn.Module):
    """The block in eval mode with its state as inputs (functional_call)."""

    def __init__(self, block: nn.Module, names: list[str]):
        super().__init__()
        self.block, self.names = block, names

    def forward(self, *inputs: torch.Tensor):
        return torch.func.functional_call(self.block, dict(zip(self.names, inputs[1:])), (inputs[0],))


class _Program(nn.Module):
    """An fx graph as a module for ``torch.onnx.export``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return tuple(self.gm(*inputs))


def _ancestors(roots: list[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def _is_symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float))


def _batch_dims(node: fx.Node) -> dict[int, str]:
    """Dynamic axes of a placeholder's value: the symbolic ones must be the batch itself."""
    dims = {}
    for axis, size in enumerate(node.meta["val"].shape):
        if isinstance(size, torch.SymInt):
            if len(size.node.expr.free_symbols) != 1 or not size.node.expr.is_Symbol:
                raise BundleError(f"block input {node.name}: axis {axis} has size {size}; format 2 "
                                  "keeps only the batch dynamic, so the model's shapes must follow the input size")
            dims[axis] = "batch"
    return dims


@dataclass
class _Split:
    forward: fx.GraphModule
    forward_inputs: list[str]          # onnx names
    forward_outputs: list[str]
    backward: fx.GraphModule
    backward_inputs: list[str]
    backward_outputs: list[str]
    forward_examples: list[fx.Node]    # placeholders of the joint graph, for shapes
    backward_examples: list[fx.Node]


def _split_joint(joint, parameters: list[str], running: list[str], local: str) -> _Split:
    """Partition the joint graph of one block into forward and backward graphs."""
    gm = joint.graph_module
    signature = joint.graph_signature
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    name_of = {}    # placeholder -> onnx name
    for spec, node in zip(signature.input_specs, placeholders):
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            name_of[node] = local + spec.target.removeprefix("block.")
        else:
            name_of[node] = {"x": INPUT, "grad_y": GRAD_OUTPUT}[spec.arg.name]
    by_name = {v: k for k, v in name_of.items()}
    x_node, g_node = by_name[INPUT], by_name[GRAD_OUTPUT]
    # torch.export unifies equal sizes, so the forward may read the batch size off grad_y:
    # read it off x instead (the backward reads it off grad_y again, see in_backward).
    for node in list(g_node.users):
        if node.target is torch.ops.aten.sym_size.int:
            with gm.graph.inserting_after(x_node):
                replacement = gm.graph.call_function(torch.ops.aten.sym_size.int, (x_node, node.args[1]))
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
    outputs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    new_running, grads, grad_x, y_node = {}, {}, None, None
    for spec, node in zip(signature.output_specs, outputs):
        kind = spec.kind.name
        if kind == "BUFFER_MUTATION":
            target = local + spec.target.removeprefix("block.")
            if target in running:
                new_running[target] = node
        elif kind == "USER_OUTPUT":
            y_node = node
        elif kind == "GRADIENT_TO_PARAMETER":
            grads[local + spec.target.removeprefix("block.")] = node
        elif kind == "GRADIENT_TO_USER_INPUT":
            grad_x = node
    if y_node is None or grad_x is None or sorted(grads) != sorted(parameters) \
            or sorted(new_running) != sorted(running):
        raise RuntimeError(f"unexpected joint graph of block {local}: grads {sorted(grads)[:4]}, "
                           f"running {sorted(new_running)[:4]}")

    forward_roots = [y_node] + [new_running[n] for n in running]
    forward_set = _ancestors(forward_roots)
    if g_node in forward_set:
        raise RuntimeError("the block's forward depends on its incoming gradient")
    backward_roots = [grads[n] for n in parameters] + [grad_x]
    backward_set = _ancestors(backward_roots) - forward_set
    # A forward op with several outputs (max-pool's values and indices) is saved through its
    # projections: an ONNX graph passes tensors, not tuples.
    projections = {n for n in backward_set if n.op == "call_function" and n.target is operator.getitem
                   and n.args[0] in forward_set}
    forward_set |= projections
    backward_set -= projections
    saved = [n for n in gm.graph.nodes if n in forward_set and n.op == "call_function"
             and not _is_symbolic(n) and any(u in backward_set for u in n.users)]
    recomputed_sym = {n for n in forward_set if n.op == "call_function" and _is_symbolic(n)
                      and any(u in backward_set for u in n.users)}

    # forward graph: its placeholders in (x, parameters, running) order
    fwd = fx.Graph()
    env = {}
    forward_inputs = [INPUT] + parameters + running
    for name in forward_inputs:
        env[by_name[name]] = fwd.placeholder("in_" + name.replace(".", "_"))
        env[by_name[name]].meta = dict(by_name[name].meta)
    for node in gm.graph.nodes:
        if node in forward_set and node.op == "call_function":
            env[node] = fwd.node_copy(node, lambda n: env[n])
    fwd.output(tuple(env[n] for n in forward_roots + saved))
    saved_names = [f"{SAVED_PREFIX}{j}" for j in range(len(saved))]
    forward_outputs = [OUTPUT] + [n + NEW_SUFFIX for n in running] + saved_names

    # backward graph: parameters and x only if it reads them, then saved, then grad_y
    bwd = fx.Graph()
    benv = {}
    needed_inputs = {n for node in backward_set for n in node.all_input_nodes if n.op == "placeholder"}
    needed_inputs |= {n for s in recomputed_sym for n in _ancestors([s]) if n.op == "placeholder"}
    backward_parameters = [n for n in parameters if by_name[n] in needed_inputs]
    needs_x = x_node in {n for node in backward_set for n in node.all_input_nodes}
    backward_inputs = backward_parameters + ([INPUT] if needs_x else []) + saved_names + [GRAD_OUTPUT]
    examples = []
    for name in backward_parameters + ([INPUT] if needs_x else []):
        benv[by_name[name]] = bwd.placeholder("in_" + name.replace(".", "_"))
        benv[by_name[name]].meta = dict(by_name[name].meta)
        examples.append(by_name[name])
    for j, node in enumerate(saved):
        benv[node] = bwd.placeholder(f"saved_{j}")
        benv[node].meta = dict(node.meta)
        examples.append(node)
    benv[g_node] = bwd.placeholder("grad_y")
    benv[g_node].meta = dict(g_node.meta)
    examples.append(g_node)

    def in_backward(node: fx.Node) -> fx.Node:
        """A forward size the backward needs, recomputed from grad_y (same batch)."""
        if node in benv:
            return benv[node]
        if node.op == "placeholder":
            raise RuntimeError(f"backward reads {node.name} without having it")
        if node.target is torch.ops.aten.sym_size.int and node.args[0] not in benv:
            if node.args[1] != 0:
                raise BundleError(f"the backward reads size {node.args[1]} of a forward tensor; format 2 "
                                  "keeps only the batch dynamic (axis 0)")
            benv[node] = bwd.call_function(torch.ops.aten.sym_size.int, (benv[g_node], 0))
            benv[node].meta = dict(node.meta)
            return benv[node]
        benv[node] = bwd.node_copy(node, in_backward)
        return benv[node]

    for node in gm.graph.nodes:
        if node in backward_set and node.op == "call_function":
            benv[node] = bwd.node_copy(node, in_backward)
    bwd.output(tuple(benv[n] for n in backward_roots))
    backward_outputs = [n + GRAD_SUFFIX for n in parameters] + [GRAD_INPUT]
    fwd.eliminate_dead_code()
    bwd.eliminate_dead_code()
    return _Split(fx.GraphModule(gm, fwd), forward_inputs, forward_outputs,
                  fx.GraphModule(gm, bwd), backward_inputs, backward_outputs,
                  [by_name[n] for n in forward_inputs], examples)


def _example(node: fx.Node, batch: int) -> torch.Tensor:
    value = node.meta["val"]
    shape = [batch if isinstance(s, torch.SymInt) else int(s) for s in value.shape]
    if value.dtype.is_floating_point:
        return torch.rand(shape, dtype=value.dtype) + 0.5   # positive: variances, rsqrt inputs
    return torch.zeros(shape, dtype=value.dtype)


def _to_onnx(gm: fx.GraphModule, examples: list[fx.Node], input_names: list[str],
             output_names: list[str], path: Path) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=2)
    args = tuple(_example(n, EXAMPLE_BATCH) for n in examples)
    dynamic = tuple({axis: batch for axis in _batch_dims(n)} or None for n in examples)
    with warnings.catch_warnings(), _decomposed_already(), cached_onnx_registry():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Program(gm), args, dynamo=True, opset_version=STEP_OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=(dynamic,), optimize=False, verbose=False,
                                    external_data=False)
    _save_lean(program, path)


def _save_lean(program, path: Path) -> None:
    """Save without the exporter's per-node debug metadata (stack traces, fx node text): it was
    95% of a backward graph's bytes; and with ReLU's backward as a product (graph_rewrites.py)."""
    import onnx

    from .graph_rewrites import where_zero_to_mul

    model = program.model_proto
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    where_zero_to_mul(model.graph)
    onnx.save(model, path)


def _drop_grad_input(source: Path, target: Path) -> None:
    """``backward.onnx`` without ``grad_x`` and the nodes only it needed (no re-lowering)."""
    import onnx

    from .suffix import keep_only_outputs

    model = onnx.load(source)
    graph = model.graph
    needed = keep_only_outputs(graph, [o.name for o in graph.output if o.name != GRAD_INPUT])
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save(model, target)


def export_block(model: nn.Module, index: int, example: torch.Tensor, folder: Path) -> BlockPrograms:
    """Lower block ``index`` once (train joint + infer) and write its four programs into ``folder``.

    ``example``: a batch of the block's input (only its per-sample shape matters).
    """
    from torch.export import Dim
    from torch.export.exported_program import _decompose_exported_program

    folder.mkdir(parents=True, exist_ok=True)
    block = model.blocks[index]
    local = f"blocks.{index}."
    parameters, running = block_state(model, index)
    # Graph inputs and outputs use the block's own names (``conv1.weight``), so blocks of the
    # same structure share one set of programs; the device adds ``blocks.<i>.`` for the store.
    own_parameters = [n.removeprefix(local) for n in parameters]
    own_running = [n.removeprefix(local) for n in running]
    seconds = {}
    was_training = block.training

    started = time.perf_counter()
    x = example[:EXAMPLE_BATCH].detach().clone().requires_grad_(True)
    if x.shape[0] < EXAMPLE_BATCH:
        x = x.new_zeros((EXAMPLE_BATCH, *x.shape[1:])).requires_grad_(True)
    with torch.no_grad():
        y = block.eval()(x)
    batch = Dim("batch", min=2)
    saved_state = {k: v.clone() for k, v in block.state_dict().items()}
    try:
        block.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(_Joint(block), (x, torch.ones_like(y)),
                                           dynamic_shapes=({0: batch}, {0: batch}))
            joint = _decompose_exported_program(exported, cia_to_decomp={},
                                                python_decomp_table=decomposition_table(),
                                                joint_loss_index=0, decompose_custom_triton_ops=False)
        split = _split_joint(joint, own_parameters, own_running, "")
        seconds["lower_train"] = time.perf_counter() - started

        t = time.perf_counter()
        _to_onnx(split.forward, split.forward_examples, split.forward_inputs, split.forward_outputs,
                 folder / "train.onnx")
        _to_onnx(split.backward, split.backward_examples, split.backward_inputs, split.backward_outputs,
                 folder / "backward.onnx")
        _drop_grad_input(folder / "backward.onnx", folder / "backward_first.onnx")
        seconds["onnx_train"] = time.perf_counter() - t

        t = time.perf_counter()
        block.eval()
        local_state = own_parameters + own_running
        tensors = dict(block.named_parameters())
        tensors.update(dict(block.named_buffers()))
        args = (x.detach(), *[tensors[n].detach() for n in local_state])
        dynamic = ({0: batch},) + (None,) * len(local_state)
        with warnings.catch_warnings(), cached_onnx_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_Infer(block, local_state), args, dynamo=True,
                                        opset_version=STEP_OPSET, input_names=[INPUT, *local_state],
                                        output_names=[OUTPUT], dynamic_shapes=(dynamic,), optimize=True,
                                        verbose=False, external_data=False)
        _save_lean(program, folder / "infer.onnx")
        seconds["infer"] = time.perf_counter() - t
    finally:
        block.load_state_dict(saved_state)   # tracing in train mode must not move running stats
        block.train(was_training)

    backward_inputs = split.backward_inputs
    return BlockPrograms(
        index=index, folder=folder, parameters=parameters, running_stats=running,
        backward_parameters=[local + n for n in backward_inputs if n in own_parameters],
        backward_needs_input=INPUT in backward_inputs,
        saved=[n for n in split.forward_outputs if n.startswith(SAVED_PREFIX)],
        input_shape=list(example.shape[1:]), output_shape=list(y.shape[1:]),
        lowered=2, seconds=seconds)
