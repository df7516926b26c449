"""How close the device's training step gets to the CPU's fp32 matmul rate.

1. The ceiling: a large fp32 GEMM (n x n x n, 2 n^3 FLOPs) on numpy's BLAS and on torch,
   with the same threads as the step; repetitions alternate, the better median is the rate.
2. The work: FLOPs of one training step of the suffix (forward + input and weight
   gradients, ``spfde_edge.cost``), dense and at the bundle's sparsity. The ORT graph
   computes *dense* convolutions of ``weight * mask``, so the executed FLOPs are the dense
   ones; the sparse count is the useful work.
3. The step: the device runner's training step (``benchmarks/device_step.py``'s
   ``DeviceStep``: ORT training + numpy SGD), median over repetitions.

Achieved FLOP/s = executed FLOPs / step time, reported as a fraction of the GEMM rate.

    python benchmarks/roofline.py                        # resnet18 + resnet32 (width 2), 2 splits, batch 16/32/64
    python benchmarks/roofline.py --quick                # smoke run, < 1 minute (after the bundle export)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_step  # noqa: E402  (the same bundles, backends and helpers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet32"], choices=list(device_step.DEFAULT_WIDTHS))
    p.add_argument("--width", nargs="*", default=[], metavar="MODEL=W")
    p.add_argument("--splits", nargs="+", default=["middle", "last-third"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemm-n", type=int, default=2048, help="GEMM side (2 n^3 FLOPs per product)")
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--export-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="BLAS, torch and ORT threads (see device_step.py)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--bundle-dir", default=None, help="as in device_step.py")
    p.add_argument("--out", default="benchmarks/results/roofline")
    p.add_argument("--quick", action="store_true", help="tiny resnet32, small GEMM (< 1 minute)")
    args = p.parse_args(argv)
    # The model, width and split options mean the same as in device_step.py.
    shared = device_step.parse_args(["--models", *args.models, "--splits", *args.splits,
                                     *(["--width", *args.width] if args.width else []),
                                     *(["--quick"] if args.quick else []), "--out", args.out,
                                     *(["--bundle-dir", args.bundle_dir] if args.bundle_dir else [])])
    args.widths, args.bundle_dir = shared.widths, shared.bundle_dir
    if args.quick:
        args.models, args.splits, args.batch_sizes = shared.models, shared.splits, [16, 32]
        args.reps, args.warmup, args.gemm_n, args.gemm_reps, args.export_batch = 3, 1, 512, 3, 16
    return args


def gemm_rate(n: int, reps: int, threads: int) -> dict:
    """fp32 GEMM FLOP/s of numpy and torch, same threads, interleaved; median of each."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2.0 * n ** 3
    times = {"numpy": [], "torch": []}
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b), torch.mm(ta, tb)  # warm-up
        for rep in range(reps):
            for name in (("numpy", "torch") if rep % 2 == 0 else ("torch", "numpy")):
                started = time.perf_counter()
                np.matmul(a, b) if name == "numpy" else torch.mm(ta, tb)
                times[name].append(time.perf_counter() - started)
    rates = {name: flops / statistics.median(t) for name, t in times.items()}
    best = max(rates, key=rates.get)
    return {"n": n, "flops": flops, "threads": threads, "numpy_flops_per_s": rates["numpy"],
            "torch_flops_per_s": rates["torch"], "best": best, "flops_per_s": rates[best],
            "numpy_ms_all": [1e3 * t for t in times["numpy"]], "torch_ms_all": [1e3 * t for t in times["torch"]]}


def suffix_flops_per_sample(model: str, width: float, k: int, densities: dict[str, float]) -> dict:
    """Training FLOPs per sample of blocks [k, n): dense (executed) and at the masks' density."""
    from spfde_edge import cost
    from spfde_edge.models import create_model

    profile = cost.profile_model(create_model(model, num_classes=device_step.NUM_CLASSES, width=width),
                                 (3, device_step.INPUT_SIZE, device_step.INPUT_SIZE))

    def suffix(d: dict) -> dict:
        blocks = cost.training_flops_per_sample(profile, d, k).per_block[k:]
        forward = sum(b.forward for b in blocks)
        backward = sum(b.backward_input + b.backward_weight for b in blocks)
        return {"forward": forward, "backward": backward, "total": forward + backward}

    return {"dense": suffix({}), "sparse": suffix(densities)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from device_runner.bundle import load_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = Path(args.bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"benchmark": "roofline", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python benchmarks/roofline.py", *(sys.argv[1:] if argv is None else argv)]),
              "config": vars(args), "machine": device_step.machine(),
              "gemm": gemm_rate(args.gemm_n, args.gemm_reps, args.threads), "rows": []}
    peak = result["gemm"]["flops_per_s"]
    for model in args.models:
        width = args.widths[model]
        num_blocks = device_step.num_blocks_of(model, width)
        for spec in args.splits:
            k = device_step.split_point(spec, num_blocks)
            bundle = device_step.ensure_bundle(model, width, k, args.export_batch, bundle_dir)
            loaded = load_bundle(bundle, verify=False)
            stage = loaded.stage(k)
            for batch_size in args.batch_sizes:
                step = device_step.DeviceStep(loaded, k, num_blocks, args.threads, args.lr, args.momentum,
                                              args.weight_decay)
                if batch_size == args.batch_sizes[0]:
                    densities = {w: float(step.trainer.get_parameter(m).mean()) for m, w in stage.masks}
                    flops = suffix_flops_per_sample(model, width, k, densities)
                features, labels = device_step.batch(stage, batch_size, seed=batch_size)
                times = device_step.time_interleaved([step], features, labels, args.reps, args.warmup)["ort"]
                seconds = statistics.median(times)
                dense, sparse = batch_size * flops["dense"]["total"], batch_size * flops["sparse"]["total"]
                result["rows"].append({
                    "model": model, "width": width, "k": k, "trained_blocks": num_blocks - k,
                    "batch_size": batch_size, "step_ms": 1e3 * seconds, "step_ms_all": [1e3 * t for t in times],
                    "dense_flops": dense, "sparse_flops": sparse, "density": sparse / dense,
                    "flops_per_sample": flops,
                    "achieved_flops_per_s": dense / seconds, "fraction_of_gemm": dense / seconds / peak,
                    "useful_flops_per_s": sparse / seconds, "useful_fraction_of_gemm": sparse / seconds / peak})
                (out / "results.json").write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
    return result


def tables(result: dict) -> str:
    g = result["gemm"]
    head = (f"fp32 GEMM {g['n']}^3, {g['threads']} thread(s): numpy {g['numpy_flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"torch {g['torch_flops_per_s'] / 1e9:.1f} GFLOP/s -> ceiling {g['flops_per_s'] / 1e9:.1f} GFLOP/s")
    rows = [[f"{r['model']}x{r['width']:g}", r["k"], r["batch_size"], r["step_ms"], r["dense_flops"] / 1e9,
             r["sparse_flops"] / 1e9, r["achieved_flops_per_s"] / 1e9, r["fraction_of_gemm"],
             r["useful_fraction_of_gemm"]] for r in result["rows"]]
    return "\n".join([head, "device training step (ORT + numpy SGD): executed = dense FLOPs, useful = sparse",
                      device_step.format_table(["model", "k", "batch", "step ms", "dense GF", "sparse GF",
                                                "GFLOP/s", "of GEMM", "useful of GEMM"], rows)])


if __name__ == "__main__":
    main()
