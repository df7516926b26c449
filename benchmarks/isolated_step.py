"""The device training step with each backend in its own process, as on a device.

``device_step.py`` times every backend (and PyTorch) in one process, step by step
interleaved: good against a changing load, but each step then starts with caches and
allocator state another backend left, and on resnet32 ×2 that alone moved the block chain
from par to 1.12× format 1's step graph (measured 2026-12-01, quiet machine). A device
runs one backend per process, so this benchmark does too: for every round, one process per
backend (order reversed every other round) takes ``--warmup`` untimed and ``--steps`` timed
steps (train step + numpy SGD) on the same features and labels; the medians over all rounds
are compared as format 2 / format 1 on the same runtime (``chain/step``, ``ort2/ort``).
Bundles come from ``device_step.py``'s cache (``--bundle-dir``, exported when missing).
Prints a table and writes ``results.json``; every row keeps the load average before and after.

    python benchmarks/isolated_step.py                                   # resnet18 k=5, resnet32 x2 k=8, 1 thread
    python benchmarks/isolated_step.py --models resnet32 --threads 2 --rounds 5
    python benchmarks/isolated_step.py --quick                           # tiny resnet32, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import device_step  # noqa: E402  (the path above)

PAIRS = [("chain", "step"), ("ort2", "ort")]   # format 2 / format 1 on the same runtime


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet32"], choices=list(device_step.DEFAULT_WIDTHS))
    p.add_argument("--splits", nargs="+", default=["middle"], help="as device_step.py: middle, last-third or k")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="processes per backend (default 3)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per process (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process first (default 2)")
    p.add_argument("--backends", nargs="+", default=["step", "chain", "ort", "ort2"],
                   choices=list(device_step.DEVICE_BACKENDS))
    p.add_argument("--bundle-dir", default="export/bench")
    p.add_argument("--out", default="benchmarks/results/isolated_step")
    p.add_argument("--quick", action="store_true", help="tiny resnet32 smoke run (as device_step.py --quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec: one backend process
    args = p.parse_args(argv)
    args.widths = dict(device_step.DEFAULT_WIDTHS)
    if args.quick:   # device_step.py --quick's model, split and batch: its cached bundles fit
        args.models, args.splits, args.batch = ["resnet32"], ["last-third"], 16
        args.widths["resnet32"] = 0.25
        args.rounds, args.steps, args.warmup = 1, 2, 1
    return args


def run_worker(spec: dict) -> dict:
    """One process, one backend: step times (s) and peak RSS (MB)."""
    import resource

    from device_runner.bundle import load_bundle

    bundle = load_bundle(spec["bundle"])
    k = spec["k"]
    backend = device_step.DEVICE_BACKENDS[spec["backend"]](bundle, k, bundle.num_blocks, spec["threads"],
                                                          0.01, 0.9, 5e-4)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((spec["batch"], *bundle.stage(k).feature_shape)).astype(np.float32)
    labels = rng.integers(0, len(bundle.classes), spec["batch"])
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        backend.step(features, labels)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - started)
    return {"times": times, "first_loss": backend.losses[0],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(args, model: str, width: float, k: int, bundles: dict[int, Path]) -> dict:
    times = {b: [] for b in args.backends}
    peaks = {b: [] for b in args.backends}
    losses = {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.rounds):
        order = args.backends if round_ % 2 == 0 else args.backends[::-1]
        for name in order:
            spec = {"backend": name, "bundle": str(bundles[device_step.DEVICE_BACKENDS[name].format]), "k": k,
                    "batch": args.batch, "threads": args.threads, "steps": args.steps, "warmup": args.warmup}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"error: the {name} process failed: {done.stderr.strip()[-800:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times[name] += result["times"]
            peaks[name].append(result["peak_mb"])
            losses[name] = result["first_loss"]
    row = {"model": model, "width": width, "k": k, "batch": args.batch, "threads": args.threads,
           "rounds": args.rounds, "steps_per_process": args.steps,
           "load_avg": [load_before, os.getloadavg()[0]]}
    for name in args.backends:
        row[f"{name}_ms"] = 1000 * statistics.median(times[name])
        row[f"{name}_ms_all"] = [1000 * t for t in times[name]]
        row[f"{name}_peak_mb"] = max(peaks[name])
    for new, old in PAIRS:
        if new in times and old in times:
            row[f"{new}_vs_{old}"] = row[f"{new}_ms"] / row[f"{old}_ms"]
            row[f"{new}_vs_{old}_loss_rel"] = abs(losses[new] - losses[old]) / abs(losses[old])
    return row


def table(rows: list[dict], backends: list[str]) -> str:
    head = ["model", "k", "batch", "threads", *[f"{b} ms" for b in backends],
            *[f"{n}/{o}" for n, o in PAIRS if n in backends and o in backends], "load"]
    lines = ["training step, ms (median over all processes' timed steps), each backend in its own process",
             "  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = [f"{r['model']}x{r['width']:g}", r["k"], r["batch"], r["threads"],
                 *[f"{r[b + '_ms']:.1f}" for b in backends],
                 *[f"{r[n + '_vs_' + o]:.3f}" for n, o in PAIRS if n in backends and o in backends],
                 f"{r['load_avg'][0]:.2f}>{r['load_avg'][1]:.2f}"]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(json.dumps(result))
        return result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = Path(args.bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"benchmark": "isolated_step", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python benchmarks/isolated_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "config": {k: v for k, v in vars(args).items() if k != "worker"}, "machine": device_step.machine(),
              "rows": []}
    formats = sorted({device_step.DEVICE_BACKENDS[b].format for b in args.backends})
    for model in args.models:
        width = args.widths[model]
        num_blocks = device_step.num_blocks_of(model, width)
        for spec in args.splits:
            k = device_step.split_point(spec, num_blocks)
            bundles = {fmt: device_step.ensure_bundle(model, width, k, args.batch, bundle_dir, fmt) for fmt in formats}
            row = measure(args, model, width, k, bundles)
            result["rows"].append(row)
            print(table([row], args.backends).splitlines()[-1], flush=True)
            (out / "results.json").write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(result["rows"], args.backends)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'results.json'} and table.txt ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
