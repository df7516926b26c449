"""The frozen prefix in int8 against float32: speed and held-out top-1, on a trained model.

For each ``--models`` entry: host training on CIFAR-10 JPEGs (HOST split) and export, each
a real CLI in its own process (``close_the_loop.Steps``, reused when done); then, in this
process and on the torch-free device side, for every split point k, the prefix (blocks
[0, k)) three ways:

* ``fed``: today's block chain before this benchmark's change, weights fed as inputs
  (``block_chain.InferChain``);
* ``float32``: constant-weight sessions (``frozen_segment.FrozenSegment``): BatchNorm
  folded, NCHWc convolutions;
* ``int8``: the same segment after static int8 quantization, calibrated as the runner does
  (the first ``CALIBRATION_SAMPLES`` of the device's training images, DEVICE split);

timed interleaved at ``--batch`` on ``--threads`` (median of ``--reps``), and the whole
model's top-1 on the TEST split (images neither side trained on) with each prefix under the
same float32 suffix, plus the int8 features' relative error against float32.

    python benchmarks/int8_prefix.py                          # resnet18 and resnet32 x2 (~25 min here)
    python benchmarks/int8_prefix.py --quick                  # smoke run, < 3 minutes
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.close_the_loop import (  # noqa: E402
    Steps, _machine, add_split_arguments, default_folders, prepared_splits, py)

WIDTHS = {"resnet18": "1", "resnet32": "2"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet32", "resnet18"])
    add_split_arguments(p, "int8_prefix", host_per_class=500, device_per_class=100, test_per_class=200)
    p.add_argument("--host-epochs", type=int, default=10)
    p.add_argument("--splits", nargs="+", default=["middle", "last-third"],
                   help="middle (k = n // 2), last-third, or an integer k")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", nargs="*", default=[], type=Path,
                   help="measure these format-2 bundles too (no training: e.g. fresh exports for speed)")
    p.add_argument("--quick", action="store_true", help="smoke run: resnet32 x0.5, few images, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.host_per_class, args.device_per_class, args.test_per_class = ["resnet32"], 20, 13, 10
        args.host_epochs, args.reps, args.threads = 1, 3, [1]
        WIDTHS["resnet32"] = "0.5"
    default_folders(args, "int8_prefix")
    return args


def split_k(spec: str, n: int) -> int:
    from benchmarks.device_step import split_point

    return split_point(spec, n)


def top1(prefix, suffix, images: np.ndarray, labels: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """(top-1 percent, the prefix's features) of prefix + suffix on ``images`` (normalised)."""
    correct, features = 0, []
    for start in range(0, len(images), batch):
        f = prefix(images[start:start + batch])
        features.append(f)
        correct += int((suffix(f).argmax(1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(images), np.concatenate(features)


def measure(bundle_dir: Path, data: Path, args) -> list[dict]:
    from device_runner.backends.block_chain import BlockSessions, InferChain
    from device_runner.backends.frozen_segment import CALIBRATION_SAMPLES, FrozenSegment
    from device_runner.bundle import load_bundle
    from device_runner.data import load_data, normalize
    from device_runner.model_state import ModelState

    bundle = load_bundle(bundle_dir)
    state = ModelState.load(bundle.weights_path)
    device = load_data(f"imagefolder:{data / 'device'}", bundle.input_size, bundle.classes)
    test = load_data(f"imagefolder:{data / 'test'}", bundle.input_size, bundle.classes)
    calibration = normalize(device.images[:CALIBRATION_SAMPLES], bundle.mean, bundle.std)
    test_x = normalize(test.images, bundle.mean, bundle.std)
    rng = np.random.default_rng(args.seed)
    timed_x = test_x[rng.choice(len(test_x), args.batch, replace=False)]
    n = bundle.num_blocks
    rows = []
    for spec in args.splits:
        k = split_k(spec, n)
        blocks = bundle.blocks[:k]
        for threads in args.threads:
            sessions = BlockSessions(threads)
            fed = InferChain(blocks, state, sessions)
            float32 = FrozenSegment(blocks, state, threads)
            int8 = FrozenSegment(blocks, state, threads)
            quantize_s = int8.quantize(calibration)
            int8.use("int8")
            suffix = InferChain(bundle.blocks[k:], state, BlockSessions(threads)).forward
            ways = {"fed": fed.forward, "float32": float32.forward, "int8": int8.forward}
            for way in ways.values():
                way(timed_x)
            load_before = list(os.getloadavg())
            ms = {name: [] for name in ways}
            for rep in range(args.reps):
                for name in (list(ways) if rep % 2 == 0 else list(ways)[::-1]):
                    started = time.perf_counter()
                    ways[name](timed_x)
                    ms[name].append(1e3 * (time.perf_counter() - started))
            load_after = list(os.getloadavg())
            row = {"model": bundle.manifest.model.name, "width": bundle.manifest.model.width, "k": k,
                   "num_blocks": n, "threads": threads, "batch": args.batch,
                   "calibration_samples": len(calibration), "quantize_s": round(quantize_s, 2),
                   "load_avg_before": load_before, "load_avg_after": load_after}
            for name, values in ms.items():
                row[f"{name}_ms"] = statistics.median(values)
                row[f"{name}_ms_all"] = values
            row["int8_speedup_vs_float32"] = row["float32_ms"] / row["int8_ms"]
            row["int8_speedup_vs_fed"] = row["fed_ms"] / row["int8_ms"]
            row["float32_speedup_vs_fed"] = row["fed_ms"] / row["float32_ms"]
            if threads == args.threads[0]:   # accuracy does not depend on threads
                acc_fed, f_fed = top1(fed.forward, suffix, test_x, test.labels, 64)
                acc32, f32 = top1(float32.forward, suffix, test_x, test.labels, 64)
                acc8, f8 = top1(int8.forward, suffix, test_x, test.labels, 64)
                row.update(test_images=len(test_x), top1_fed=acc_fed, top1_float32=acc32, top1_int8=acc8,
                           top1_change=acc8 - acc32,
                           feature_rel_error=float(np.linalg.norm(f8 - f32) / np.linalg.norm(f32)),
                           float32_vs_fed_rel_error=float(np.linalg.norm(f32 - f_fed) / np.linalg.norm(f_fed)))
            rows.append(row)
            acc = (f", top-1 float32 {row['top1_float32']:.2f}% int8 {row['top1_int8']:.2f}% "
                   f"(feature error {row['feature_rel_error']:.3f})" if "top1_int8" in row else "")
            print(f"  k={k} threads {threads}: fed {row['fed_ms']:.1f} ms, float32 {row['float32_ms']:.1f}, "
                  f"int8 {row['int8_ms']:.1f} (x{row['int8_speedup_vs_float32']:.2f} vs float32){acc}; "
                  f"load {load_before[0]:.2f} -> {load_after[0]:.2f}", flush=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.work)
    data = args.work / "data"
    sizes = {"host": args.host_per_class, "device": args.device_per_class, "test": args.test_per_class}
    prepared_splits(Path(args.data_dir), args.work, sizes, args.seed)
    rows = []
    for model in args.models:
        width = WIDTHS.get(model, "1")
        host, bundle = args.work / f"{model}-host", args.work / f"{model}-bundle"
        steps.run(f"{model}_host_train", py("-m", "spfde_edge.train", "--model", model, "--width", width,
                                            "--dataset", "imagefolder", "--data-dir", str(data / "host"),
                                            "--epochs", str(args.host_epochs), "--sparsity", "0.9", "--dst", "mest",
                                            "--delta-tau", "2", "--lr", "0.05", "--seed", str(args.seed),
                                            "--device", "cpu", "--cache-dir", str(args.work / "cache"),
                                            "--threads", "2", "--out", str(host)))
        steps.run(f"{model}_export", py("-m", "spfde_edge.export", "--checkpoint", str(host), "--out", str(bundle),
                                        "--force", "--no-ort-training"))
        print(f"{model} x{width}: {bundle}", flush=True)
        rows += measure(bundle, data, args)
    for bundle in args.bundle:
        print(f"{bundle} (given)", flush=True)
        rows += measure(bundle, data, args)
    result = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": _machine(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "wall_s": round(time.perf_counter() - started, 1), "steps": steps.records, "rows": rows}
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'results.json'} ({result['wall_s']:.0f} s)")
    failed = [name for name, record in steps.records.items() if record["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed steps: {', '.join(failed)}")
    return result


def table(rows: list[dict]) -> str:
    lines = ["| model | k | threads | fed ms | float32 ms | int8 ms | int8 vs float32 | int8 vs fed | "
             "top-1 float32 | top-1 int8 | change (pt) | feature error | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{r['top1_float32']:.2f} | {r['top1_int8']:.2f} | {r['top1_change']:+.2f} | "
               f"{r['feature_rel_error']:.3f}" if "top1_int8" in r else "— | — | — | —")
        lines.append(f"| {r['model']} x{r['width'] or 1:g} | {r['k']} | {r['threads']} | {r['fed_ms']:.1f} | "
                     f"{r['float32_ms']:.1f} | {r['int8_ms']:.1f} | {r['int8_speedup_vs_float32']:.2f}x | "
                     f"{r['int8_speedup_vs_fed']:.2f}x | {acc} | "
                     f"{r['load_avg_before'][0]:.1f} -> {r['load_avg_after'][0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
