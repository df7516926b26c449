"""Which standard-ONNX form of a convolution's weight gradient runs fastest in ONNX Runtime?

The device step computes each convolution's weight gradient in standard ONNX operators
(``spfde_edge/export/step_graph.py``: ``convolution_backward``), since plain ONNX Runtime has
no weight-gradient kernel. For every 3x3 convolution of the suffix (blocks [k, n), shapes from
one forward at ``--batch``), four forms of ``dW[o, c, i, j] = sum g[n, o, y, x] * x[n, c, s*y+i-p, s*x+j-p]``
are built as ONNX graphs and timed on one ONNX Runtime session each, interleaved:

* **taps** (what the exporter writes): the output gradient and the input channels-first, then
  per kernel tap one product of the output-gradient window and the input window that tap
  reads, both cut from the unpadded tensors;
* **padded taps**: the input padded once, so only the input is cut per tap and the output
  gradient is used whole;
* **im2col**: the nine input windows concatenated, one product;
* **convolution**: the input as a batch of channels convolved with the output gradient as
  filters (dilation = stride), the classic formulation.

Every form is checked against PyTorch's ``convolution_backward`` before it is timed. PyTorch's
(oneDNN) weight gradient is timed beside them for scale.

    python benchmarks/weight_gradient_forms.py                 # resnet18 k=5 and resnet32 x2 k=8, batch 32
    python benchmarks/weight_gradient_forms.py --quick         # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_step import format_table  # noqa: E402
from sparse_products import DEFAULT_CASES, suffix_layers  # noqa: E402

FORMS = ("taps", "padded_taps", "im2col", "convolution")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL:WIDTH:K")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="resnet32 x0.5 from block 11, batch 8, 3 reps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/weight_gradient_forms"))
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.batch, args.reps = ["resnet32:0.5:11"], 8, 3
    return args


class Graph:
    """A small ONNX graph builder: constants as initializers, nodes in order."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def const(self, values) -> str:
        from onnx import TensorProto, helper

        name = f"c{len(self.initializers)}"
        values = [int(v) for v in values]
        self.initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = f"t{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def model(self, output: str, g_shape, x_shape) -> bytes:
        from onnx import TensorProto, helper

        self.nodes.append(helper.make_node("Identity", [output], ["dw"]))
        graph = helper.make_graph(self.nodes, "weight_gradient",
                                  [helper.make_tensor_value_info("g", TensorProto.FLOAT, list(g_shape)),
                                   helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                                  [helper.make_tensor_value_info("dw", TensorProto.FLOAT, None)], self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _tap_range(tap: int, size_in: int, size_out: int, stride: int, pad: int):
    """Output positions whose input position ``stride*y + tap - pad`` is inside the input."""
    first = next((y for y in range(size_out) if stride * y + tap - pad >= 0), None)
    last = next((y for y in reversed(range(size_out)) if stride * y + tap - pad <= size_in - 1), None)
    if first is None or last is None or first > last:
        return None
    return first, last, stride * first + tap - pad


def build(form: str, n: int, c: int, o: int, h: int, ho: int, k: int, s: int, p: int) -> bytes:
    b = Graph()
    g_t = b.op("Transpose", ["g"], perm=[1, 0, 2, 3])
    x_t = b.op("Transpose", ["x"], perm=[1, 0, 2, 3])
    axes = b.const([2, 3])
    if form == "convolution":
        full = b.op("Conv", [x_t, g_t], pads=[p, p, p, p], dilations=[s, s])
        cut = b.op("Slice", [full, b.const([0, 0]), b.const([k, k]), axes])
        return b.model(b.op("Transpose", [cut], perm=[1, 0, 2, 3]), (n, o, ho, ho), (n, c, h, h))
    stride = b.const([s, s])
    g_rows = b.op("Reshape", [g_t, b.const([o, -1])]) if form != "taps" else None
    padded = b.op("Pad", [x_t, b.const([0, 0, p, p, 0, 0, p, p])]) if form in ("padded_taps", "im2col") else x_t
    windows, taps = [], []
    for i in range(k):
        for j in range(k):
            if form == "taps":
                rows, cols = _tap_range(i, h, ho, s, p), _tap_range(j, h, ho, s, p)
                (r0, r1, ri), (c0, c1, ci) = rows, cols
                g_win = b.op("Reshape", [b.op("Slice", [g_t, b.const([r0, c0]), b.const([r1 + 1, c1 + 1]), axes]),
                                         b.const([o, -1])])
                x_win = b.op("Slice", [x_t, b.const([ri, ci]), b.const([ri + s * (r1 - r0) + 1, ci + s * (c1 - c0) + 1]),
                                       axes, stride])
                taps.append(b.op("Gemm", [g_win, b.op("Reshape", [x_win, b.const([c, -1])])], transB=1))
            else:
                x_win = b.op("Slice", [padded, b.const([i, j]), b.const([i + s * (ho - 1) + 1, j + s * (ho - 1) + 1]),
                                       axes, stride])
                if form == "padded_taps":
                    taps.append(b.op("Gemm", [g_rows, b.op("Reshape", [x_win, b.const([c, -1])])], transB=1))
                else:
                    windows.append(x_win)
    if form == "im2col":
        cols = b.op("Reshape", [b.op("Concat", windows, axis=0), b.const([k * k * c, -1])])
        per_tap = b.op("Reshape", [b.op("Gemm", [g_rows, cols], transB=1), b.const([o, k * k, c])])
        return b.model(b.op("Reshape", [b.op("Transpose", [per_tap], perm=[0, 2, 1]), b.const([o, c, k, k])]),
                       (n, o, ho, ho), (n, c, h, h))
    stacked = b.op("Concat", [b.op("Unsqueeze", [t, b.const([2])]) for t in taps], axis=2)
    return b.model(b.op("Reshape", [stacked, b.const([o, c, k, k])]), (n, o, ho, ho), (n, c, h, h))


def measure(entry: dict, threads: int, reps: int, rng) -> dict:
    import onnxruntime
    import torch

    module = entry["module"]
    n, c, h, _ = entry["input_shape"]
    o, k, s, p = module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0]
    ho = (h + 2 * p - k) // s + 1
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    g = rng.standard_normal((n, o, ho, ho)).astype(np.float32)
    args = (torch.from_numpy(g), torch.from_numpy(x), torch.zeros(o, c, k, k), None, [s, s], [p, p], [1, 1], False,
            [0, 0], 1, [False, True, False])
    reference = torch.ops.aten.convolution_backward(*args)[1].numpy()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    sessions = {f: onnxruntime.InferenceSession(build(f, n, c, o, h, ho, k, s, p), options,
                                                providers=["CPUExecutionProvider"]) for f in FORMS}
    row = {"layer": entry["layer"], "shape": f"{c}->{o} {h}x{h} s{s}"}
    feeds = {"g": g, "x": x}
    for form, session in sessions.items():
        got = session.run(None, feeds)[0]
        row[f"{form}_rel_error"] = float(np.abs(got - reference).max() / np.abs(reference).max())
    times = {f: [] for f in [*FORMS, "pytorch"]}
    for rep in range(reps + 1):
        order = list(times) if rep % 2 == 0 else list(times)[::-1]
        for form in order:
            start = time.perf_counter()
            if form == "pytorch":
                torch.ops.aten.convolution_backward(*args)
            else:
                sessions[form].run(None, feeds)
            if rep:                                   # the first round warms up
                times[form].append(time.perf_counter() - start)
    for form, values in times.items():
        row[f"{form}_ms"] = 1e3 * statistics.median(values)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = {"threads": args.threads, "batch": args.batch, "cases": []}
    for case in args.cases:
        model_name, width, k = case.split(":")
        layers = [e for e in suffix_layers(model_name, float(width), int(k), args.batch, args.input_size)
                  if getattr(e["module"], "kernel_size", (1,))[0] == 3 and e["module"].groups == 1]
        seen, rows = set(), []
        load_before = os.getloadavg()[0]
        for entry in layers:                          # one row per distinct shape
            key = (entry["input_shape"], entry["module"].out_channels, entry["module"].stride)
            if key not in seen:
                seen.add(key)
                rows.append(measure(entry, args.threads, args.reps, rng))
        totals = {f: sum(r[f"{f}_ms"] for r in rows) for f in [*FORMS, "pytorch"]}
        results["cases"].append({"case": case, "rows": rows, "totals_ms": totals,
                                 "load": [load_before, os.getloadavg()[0]]})
        print(f"\n{case}, batch {args.batch}, {args.threads} thread(s), load {load_before:.1f} -> "
              f"{os.getloadavg()[0]:.1f}: weight gradient ms per distinct 3x3 shape (relative to taps)")
        print(format_table(["layer", "shape", *FORMS, "PyTorch"],
                           [[r["layer"], r["shape"]] + [f"{r[f'{f}_ms']:.2f} ({r[f'{f}_ms'] / r['taps_ms']:.2f})"
                                                        for f in [*FORMS, "pytorch"]] for r in rows]))
        print("sum: " + ", ".join(f"{f} {t:.1f} ms" for f, t in totals.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
