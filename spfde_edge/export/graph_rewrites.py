"""Rewrites of exported ONNX graphs that compute the same values faster on ONNX Runtime's CPU.

``where_zero_to_mul``: AOTAutograd writes ReLU's backward as ``where(y <= 0, 0, grad)``.
ONNX Runtime 1.19 runs ``Where`` with a broadcast scalar on a generic per-element path:
4.3 ms for a [32, 64, 16, 16] tensor against 1.4 ms for ``grad * cast(not(y <= 0))``, and
the ``Where`` nodes were 7 % of a resnet32 ×2 suffix's block-chain step (ORT profiler,
2026-12-01). The product is ``grad`` where the mask is 1 and ±0 where it is 0 (a signed
zero compares and sums like 0; a NaN gradient stays NaN instead of being zeroed, which
only matters once training has already diverged). Every export checks the rewritten
programs against PyTorch (block_bundle.check_block).
"""
from __future__ import annotations

import numpy as np

FLOAT = 1   # onnx.TensorProto.FLOAT


def _constant(name: str, producers: dict, initializers: dict):
    """The value of ``name`` if it is an initializer or a Constant, possibly through Cast or
    Identity nodes (a cast of zero is zero), else None."""
    from onnx import numpy_helper

    while True:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            values = [a for a in node.attribute if a.name == "value"]
            return numpy_helper.to_array(values[0].t) if values else None
        if node.op_type not in ("Cast", "Identity"):
            return None
        name = node.input[0]


def _is_float_zero(name: str, producers: dict, initializers: dict) -> bool:
    """A scalar 0 of type float: a float initializer or a Cast to float of a zero constant."""
    value = _constant(name, producers, initializers)
    if value is None or np.size(value) != 1 or float(np.asarray(value).ravel()[0]) != 0.0:
        return False
    node = producers.get(name)
    if node is not None and node.op_type == "Cast":
        return any(a.name == "to" and a.i == FLOAT for a in node.attribute)
    if node is not None and node.op_type == "Constant":
        return any(a.name == "value" and a.t.data_type == FLOAT for a in node.attribute)
    return name in initializers and initializers[name].data_type == FLOAT


def where_zero_to_mul(graph) -> int:
    """Replace every float ``Where(c, 0, x)`` by ``x * cast(not c)`` and ``Where(c, x, 0)`` by
    ``x * cast(c)``, in place; returns how many were replaced."""
    from onnx import helper

    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    rewritten, count = [], 0
    for node in graph.node:
        if node.op_type == "Where":
            condition, when_true, when_false = node.input
            out = node.output[0]
            if _is_float_zero(when_true, producers, initializers):
                keep, data = f"{out}__keep", when_false
                rewritten += [helper.make_node("Not", [condition], [f"{out}__not"], name=f"{node.name}__not"),
                              helper.make_node("Cast", [f"{out}__not"], [keep], to=FLOAT, name=f"{node.name}__cast")]
            elif _is_float_zero(when_false, producers, initializers):
                keep, data = f"{out}__keep", when_true
                rewritten.append(helper.make_node("Cast", [condition], [keep], to=FLOAT, name=f"{node.name}__cast"))
            else:
                rewritten.append(node)
                continue
            rewritten.append(helper.make_node("Mul", [data, keep], [out], name=f"{node.name}__mul"))
            count += 1
        else:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    return count
