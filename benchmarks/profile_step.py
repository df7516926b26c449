"""Where the device training step's time goes, operator by operator, next to PyTorch's.

Runs the block-chain trainer (format 2 on plain ONNX Runtime, the default device backend) of
stage k with ONNX Runtime's profiler on every session, and PyTorch eager training of the same
suffix under ``torch.profiler``, on the same batch and threads, interleaved step by step.
Reports per step:

* ONNX Runtime: kernel time per (program, operator type), the sessions' ``model_run`` time,
  and what lies outside kernels (the Python loop, feeds, output copies);
* PyTorch: self CPU time per aten operator;

so the gap between the two can be put on named operators. The profilers add overhead to
both; the wall times beside the tables are the unprofiled medians of the same run.

    python benchmarks/profile_step.py --model resnet18 --k 5 --batch 32
    python benchmarks/profile_step.py --model resnet32 --width 2 --k 8
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.device_step import (  # noqa: E402
    DEFAULT_WIDTHS,
    BlockChainStep,
    TorchStep,
    batch,
    ensure_bundle,
    machine,
    num_blocks_of,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default: as device_step.py)")
    p.add_argument("--k", type=int, default=None, help="stage: blocks [0, k) frozen (default n // 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=14, help="rows per table")
    p.add_argument("--bundle-dir", default="export/bench")
    p.add_argument("--bundle", default=None, help="a format-2 bundle to profile instead of exporting --model")
    p.add_argument("--out", default="benchmarks/results/profile_step")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = DEFAULT_WIDTHS.get(args.model)
    return args


def _events(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def ort_breakdown(files: list[str], runs_per_step: dict[str, int], warmup: int, steps: int) -> dict:
    """ms per step by (program kind, operator type), and model_run per program kind, from the
    profiles; each session's first ``warmup`` steps are left out."""
    kernels: dict[tuple[str, str], float] = collections.Counter()
    runs: dict[str, float] = collections.Counter()
    for path in files:
        stem = Path(path).name.split("_20")[0]          # <prefix>-<structure>-<kind>
        kind = stem.rsplit("-", 1)[-1]
        per_step = runs_per_step[stem.split("-", 1)[1]]
        events = _events(path)
        model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        skip = warmup * per_step
        if len(model_runs) < skip + steps * per_step:
            raise SystemExit(f"error: {path} has {len(model_runs)} runs, expected {skip + steps * per_step}")
        cutoff = model_runs[skip - 1]["ts"] + model_runs[skip - 1]["dur"] if skip else -1
        for e in model_runs[skip:]:
            runs[kind] += e["dur"] / 1e3 / steps
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] > cutoff:
                kernels[(kind, e["args"]["op_name"])] += e["dur"] / 1e3 / steps
    return {"kernels": kernels, "model_run": runs}


def torch_breakdown(prof, steps: int) -> dict[str, float]:
    """Self CPU ms per step of each aten operator."""
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from device_runner.backends.block_chain import BlockChainTrainer, BlockSessions
    from device_runner.bundle import load_bundle
    from device_runner.model_state import ModelState

    torch.set_num_threads(args.threads)
    if args.bundle:
        bundle = load_bundle(args.bundle, verify=False)
        args.model, args.width = bundle.manifest.model.name, bundle.manifest.model.width
        n = bundle.num_blocks
    else:
        n = num_blocks_of(args.model, args.width)
    k = n // 2 if args.k is None else args.k
    if not args.bundle:
        bundle = load_bundle(ensure_bundle(args.model, args.width, k, args.batch, Path(args.bundle_dir), fmt=2),
                             verify=False)
    stage = bundle.stage(k)
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    features, labels = batch(stage, args.batch, seed=args.batch)

    # Unprofiled wall times first, interleaved (the profilers' own overhead stays out of them).
    plain = BlockChainStep(bundle, k, n, args.threads, **hyper)
    torch_step = TorchStep(args.model, args.width, k, plain.state(), dict(stage.masks), **hyper)
    walls = {"chain": [], "torch": []}
    for side in (plain, torch_step):
        for _ in range(args.warmup):
            side.step(features, labels)
    load_before = list(os.getloadavg())
    for rep in range(args.steps):
        for name, side in (((("chain", plain), ("torch", torch_step)))[:: 1 if rep % 2 == 0 else -1]):
            started = time.perf_counter()
            side.step(features, labels)
            walls[name].append(1e3 * (time.perf_counter() - started))
    del plain

    with tempfile.TemporaryDirectory() as tmp:
        sessions = BlockSessions(args.threads, profile_prefix=str(Path(tmp) / "p"))
        state = ModelState.load(bundle.weights_path)
        trainer = BlockChainTrainer(stage, bundle.blocks, state, sessions)
        runs_per_step = collections.Counter()
        for position, block in enumerate(trainer.blocks):
            runs_per_step[f"{block.program('train').parent.name}-train"] += 1
            kind = "backward_first" if position == 0 else "backward"
            runs_per_step[f"{block.program(kind).parent.name}-{kind}"] += 1
        lrs = {i: hyper["lr"] for i in range(k, n)}
        step_s = []
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            trainer.train_step(features, labels)
            trainer.sgd_step(lrs, hyper["momentum"], hyper["weight_decay"])
            if step >= args.warmup:
                step_s.append(1e3 * (time.perf_counter() - started))
        ort = ort_breakdown(sessions.end_profiling(), runs_per_step, args.warmup, args.steps)

    for _ in range(args.warmup):
        torch_step.step(features, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch_started = time.perf_counter()
        for _ in range(args.steps):
            torch_step.step(features, labels)
        torch_profiled_ms = 1e3 * (time.perf_counter() - torch_started) / args.steps
    aten = torch_breakdown(prof, args.steps)
    load_after = list(os.getloadavg())

    kernel_ms = sum(ort["kernels"].values())
    run_ms = sum(ort["model_run"].values())
    profiled_ms = statistics.median(step_s)
    result = {
        "model": args.model, "width": args.width, "k": k, "num_blocks": n, "batch_size": args.batch,
        "threads": args.threads, "steps": args.steps, "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": load_after,
        "chain_ms": statistics.median(walls["chain"]), "torch_ms": statistics.median(walls["torch"]),
        "chain_ms_all": walls["chain"], "torch_ms_all": walls["torch"],
        "chain_profiled_ms": profiled_ms, "torch_profiled_ms": torch_profiled_ms,
        "ort_kernel_ms": kernel_ms, "ort_model_run_ms": run_ms, "ort_outside_runs_ms": profiled_ms - run_ms,
        "ort_kernels": sorted(([kind, op, ms] for (kind, op), ms in ort["kernels"].items()), key=lambda r: -r[2]),
        "ort_model_run": dict(ort["model_run"]),
        "torch_ops": sorted(([op, ms] for op, ms in aten.items()), key=lambda r: -r[1]),
    }
    result["chain_vs_torch"] = result["chain_ms"] / result["torch_ms"]
    print(tables(result, args.top))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.model.replace(':', '_')}-k{k}-b{args.batch}-t{args.threads}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")
    return result


def tables(r: dict, top: int) -> str:
    lines = [f"{r['model']} x{r['width']} k={r['k']} batch {r['batch_size']}, {r['threads']} thread(s), "
             f"load {r['load_avg_before'][0]:.2f} -> {r['load_avg_after'][0]:.2f}",
             f"unprofiled median: chain {r['chain_ms']:.1f} ms, PyTorch {r['torch_ms']:.1f} ms "
             f"(chain/PyTorch {r['chain_vs_torch']:.2f})",
             f"profiled chain step {r['chain_profiled_ms']:.1f} ms = sessions' model_run "
             f"{r['ort_model_run_ms']:.1f} (kernels {r['ort_kernel_ms']:.1f}) + outside the runs "
             f"{r['ort_outside_runs_ms']:.1f}; profiled PyTorch step {r['torch_profiled_ms']:.1f} ms",
             "", "| ONNX Runtime program | operator | ms/step | share of kernels |", "|---|---|---|---|"]
    for kind, op, ms in r["ort_kernels"][:top]:
        lines.append(f"| {kind} | {op} | {ms:.1f} | {ms / r['ort_kernel_ms']:.0%} |")
    total = sum(ms for _, ms in r["torch_ops"])
    lines += ["", "| PyTorch operator | self ms/step | share |", "|---|---|---|"]
    for op, ms in r["torch_ops"][:top]:
        lines.append(f"| {op} | {ms:.1f} | {ms / total:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
