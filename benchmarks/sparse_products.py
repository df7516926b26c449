"""Can the suffix's sparse weights pay on a CPU? Each layer's products, dense vs sparse, side by side.

Issue 16 asks to measure sparse matrix products (1x1 convolutions, the classifier, ...) at
>= 90 % sparsity and use them where they win. For every convolution and linear layer of the
suffix (blocks [k, n) of the model, shapes recorded from one forward at ``--batch``), with a
random mask at each ``--densities`` value:

* **dense** (what the device step and PyTorch compute): PyTorch (oneDNN) forward, input
  gradient and weight gradient of the masked weight;
* **sparse**: the weight as a ``scipy.sparse`` CSR matrix: forward ``W @ cols`` and input
  gradient ``W.T @ G`` (cols: the input channels-first, 3x3 through im2col; the input
  gradient folded back), *including* the layout changes to and from NCHW that a graph
  runtime would need around them. scipy has no masked (SDDMM) product, so the weight
  gradient stays dense in both.

Per layer the table shows both, their ratio, and the layer's share of the dense time; the
summary says how much of the suffix's dense convolution/linear time the sparse products
could save if every layer took whichever is faster (an upper bound: splitting the step's
graph at each sparse product has its own cost, not counted). scipy's products run on one
thread; ``--threads`` applies to PyTorch.

    python benchmarks/sparse_products.py                         # resnet18 k=5 and resnet32 x2 k=8, batch 32
    python benchmarks/sparse_products.py --quick                 # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_step import format_table  # noqa: E402  (the benchmarks' one table layout)

DEFAULT_CASES = ["resnet18:1:5", "resnet32:2:8"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL:WIDTH:K",
                   help="suffix of MODEL at WIDTH from block K (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.05])
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (scipy uses one)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="resnet32 x0.5 from block 11, batch 8, 3 reps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_products"))
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.batch, args.reps, args.densities = ["resnet32:0.5:11"], 8, 3, [0.1]
    return args


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def suffix_layers(model_name: str, width: float, k: int, batch: int, size: int) -> list[dict]:
    """Every Conv2d / Linear of blocks [k, n) with the input shape it sees."""
    import torch
    from torch import nn

    from spfde_edge.models import create_model

    model = create_model(model_name, width=width).eval()
    layers, hooks = [], []
    for index, block in enumerate(model.blocks):
        if index < k:
            continue
        for name, module in block.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                def record(mod, inputs, _out, label=f"blocks.{index}.{name}"):
                    layers.append({"layer": label, "module": mod, "input_shape": tuple(inputs[0].shape)})
                hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(torch.zeros(batch, 3, size, size))
    for hook in hooks:
        hook.remove()
    return layers


def _conv_geometry(module):
    kh, kw = module.kernel_size
    return kh, kw, module.stride[0], module.padding[0]


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """(N, C, H, W) -> (C*kh*kw, N*Ho*Wo), the rows ordered as the weight's (c, i, j)."""
    n, c, h, w = x.shape
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = windows.shape[2], windows.shape[3]
    return np.ascontiguousarray(windows.transpose(1, 4, 5, 0, 2, 3)).reshape(c * kh * kw, n * ho * wo)


def col2im(cols: np.ndarray, shape, kh: int, kw: int, stride: int, pad: int, ho: int, wo: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: each tap's rows added back where they were read."""
    n, c, h, w = shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.float32)
    taps = cols.reshape(c, kh, kw, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += taps[:, i, j].transpose(1, 0, 2, 3)
    return out[:, :, pad:pad + h, pad:pad + w] if pad else out


def measure_layer(entry: dict, density: float, reps: int, rng: np.random.Generator) -> dict:
    import scipy.sparse
    import torch
    from torch import nn

    module = entry["module"]
    weight = module.weight.detach().numpy().copy()
    weight *= rng.random(weight.shape) < density
    x = rng.standard_normal(entry["input_shape"]).astype(np.float32)
    tw, tx = torch.from_numpy(weight), torch.from_numpy(x)
    row = {"layer": entry["layer"], "input_shape": list(entry["input_shape"]), "weight_shape": list(weight.shape),
           "density": density}
    if isinstance(module, nn.Linear):
        y = tx @ tw.t()
        g = torch.randn_like(y)
        row["kind"] = "linear"
        row["dense_forward_ms"] = median_ms(lambda: tx @ tw.t(), reps)
        row["dense_input_grad_ms"] = median_ms(lambda: g @ tw, reps)
        row["dense_weight_grad_ms"] = median_ms(lambda: g.t() @ tx, reps)
        w_csr, gn = scipy.sparse.csr_matrix(weight), g.numpy()
        row["sparse_forward_ms"] = median_ms(lambda: np.ascontiguousarray((w_csr @ x.T).T), reps)
        row["sparse_input_grad_ms"] = median_ms(lambda: np.ascontiguousarray((w_csr.T @ gn.T).T), reps)
        sparse_y = (w_csr @ x.T).T
        reference = y.numpy()
        dense_gx = (g @ tw).numpy()
        row["input_grad_rel_error"] = float(np.abs((w_csr.T @ gn.T).T - dense_gx).max() / np.abs(dense_gx).max())
    else:
        if module.groups != 1:
            return {**row, "kind": "grouped conv", "skipped": "grouped/depthwise: no CSR product"}
        kh, kw, stride, pad = _conv_geometry(module)
        row["kind"] = f"conv {kh}x{kw} s{stride}"
        y = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)
        g = torch.randn_like(y)
        n, o, ho, wo = y.shape
        args = (None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
        row["dense_forward_ms"] = median_ms(lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad), reps)
        row["dense_input_grad_ms"] = median_ms(
            lambda: torch.ops.aten.convolution_backward(g, tx, tw, *args, [True, False, False]), reps)
        row["dense_weight_grad_ms"] = median_ms(
            lambda: torch.ops.aten.convolution_backward(g, tx, tw, *args, [False, True, False]), reps)
        w_csr = scipy.sparse.csr_matrix(weight.reshape(o, -1))
        w_t = w_csr.T.tocsr()
        gn = g.numpy()

        def sparse_forward():
            out = w_csr @ im2col(x, kh, kw, stride, pad)                    # (O, N*Ho*Wo)
            return np.ascontiguousarray(out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))

        def sparse_input_grad():
            grad = np.ascontiguousarray(gn.transpose(1, 0, 2, 3)).reshape(o, -1)
            return col2im(w_t @ grad, x.shape, kh, kw, stride, pad, ho, wo)

        row["sparse_forward_ms"] = median_ms(sparse_forward, reps)
        row["sparse_input_grad_ms"] = median_ms(sparse_input_grad, reps)
        sparse_y = sparse_forward()
        reference = y.numpy()
        dense_gx = torch.ops.aten.convolution_backward(g, tx, tw, *args, [True, False, False])[0].numpy()
        row["input_grad_rel_error"] = float(np.abs(sparse_input_grad() - dense_gx).max() / np.abs(dense_gx).max())
    row["forward_rel_error"] = float(np.abs(sparse_y - reference).max() / max(np.abs(reference).max(), 1e-12))
    row["dense_ms"] = row["dense_forward_ms"] + row["dense_input_grad_ms"] + row["dense_weight_grad_ms"]
    row["sparse_ms"] = row["sparse_forward_ms"] + row["sparse_input_grad_ms"] + row["dense_weight_grad_ms"]
    best = min(row["dense_forward_ms"], row["sparse_forward_ms"]) + \
        min(row["dense_input_grad_ms"], row["sparse_input_grad_ms"]) + row["dense_weight_grad_ms"]
    row["best_ms"] = best
    row["forward_sparse_over_dense"] = row["sparse_forward_ms"] / row["dense_forward_ms"]
    row["input_grad_sparse_over_dense"] = row["sparse_input_grad_ms"] / row["dense_input_grad_ms"]
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "threads": args.threads},
               "batch": args.batch, "input_size": args.input_size, "cases": []}
    for case in args.cases:
        model_name, width, k = case.split(":")
        layers = suffix_layers(model_name, float(width), int(k), args.batch, args.input_size)
        for density in args.densities:
            load_before = os.getloadavg()[0]
            rows = [measure_layer(entry, density, args.reps, rng) for entry in layers]
            timed = [r for r in rows if "skipped" not in r]
            dense = sum(r["dense_ms"] for r in timed)
            summary = {"case": case, "density": density, "layers": rows, "dense_ms": dense,
                       "sparse_ms": sum(r["sparse_ms"] for r in timed), "best_ms": sum(r["best_ms"] for r in timed),
                       "load_before": load_before, "load_after": os.getloadavg()[0]}
            summary["best_saving"] = 1 - summary["best_ms"] / dense
            summary["layers_where_sparse_forward_wins"] = sum(r["forward_sparse_over_dense"] < 1 for r in timed)
            summary["layers_where_sparse_input_grad_wins"] = sum(r["input_grad_sparse_over_dense"] < 1 for r in timed)
            results["cases"].append(summary)
            print(f"\n{case} (suffix from block {k}), batch {args.batch}, density {density}, "
                  f"PyTorch threads {args.threads}, load {load_before:.1f} -> {summary['load_after']:.1f}")
            print(format_table(
                ["layer", "kind", "dense fwd / igrad / wgrad ms", "sparse fwd / igrad ms", "sparse/dense fwd, igrad",
                 "share of dense"],
                [[r["layer"], r["kind"], "skipped", r["skipped"], "", ""] if "skipped" in r else
                 [r["layer"], r["kind"],
                  f"{r['dense_forward_ms']:.2f} / {r['dense_input_grad_ms']:.2f} / {r['dense_weight_grad_ms']:.2f}",
                  f"{r['sparse_forward_ms']:.2f} / {r['sparse_input_grad_ms']:.2f}",
                  f"{r['forward_sparse_over_dense']:.2f}, {r['input_grad_sparse_over_dense']:.2f}",
                  f"{100 * r['dense_ms'] / dense:.1f} %"] for r in rows]))
            print(f"dense {dense:.1f} ms; all sparse {summary['sparse_ms']:.1f} ms; the faster of each "
                  f"{summary['best_ms']:.1f} ms = {100 * summary['best_saving']:.1f} % less "
                  f"(sparse forward wins on {summary['layers_where_sparse_forward_wins']} of {len(timed)} layers, "
                  f"input gradient on {summary['layers_where_sparse_input_grad_wins']})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
