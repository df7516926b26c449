"""Format 2's block chain against format 1's suffix backends: one training step, and a freeze.

The same model is exported twice (cached under ``--bundle-dir``): format 1 with the single
stage ``k`` (its ``step.onnx`` and ORT training artifacts), format 2 (per-block programs).
On the same features and labels, each trainer takes ``--reps`` timed steps after 3 warm-up
steps, the three interleaved step by step; then the block chain's boundary moves from k to
k+1 (new trainer on the same state, the frozen block's infer program, the first step at k+1),
also timed. Prints a table and writes ``results.json``.

    python benchmarks/block_chain_step.py                              # resnet18 x0.5, 32x32, k=4, batch 32
    python benchmarks/block_chain_step.py --model resnet32 --width 1 --k 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def export(args, fmt: int) -> Path:
    """The cached bundle of ``args``' model in format ``fmt`` (format 1: stage k only)."""
    out = Path(args.bundle_dir) / f"{args.model}-w{args.width}-s{args.input_size}-v{fmt}-k{args.k}"
    if (out / "manifest.json").is_file():
        return out
    import spfde_edge.export.prefix as prefix_io
    from spfde_edge.export import ExportOptions, export_bundle

    # The ExecuTorch prefix is not timed here; its lowering takes minutes.
    prefix_io.export_prefix_pte = lambda prefix, example, path: path.write_bytes(b"stub")
    prefix_io.run_pte = lambda path, x: prefix_io.run_onnx(path.with_name(prefix_io.ONNX_FILE), x.numpy())
    stages = {"stages": str(args.k)} if fmt == 1 else {}
    export_bundle(ExportOptions(model=args.model, width=args.width, input_size=args.input_size,
                                batch_size=args.batch, epochs=30, delta_tau=2, out=str(out), parity_steps=2,
                                bundle_format=fmt, **stages), log=lambda line: None)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--bundle-dir", default=str(ROOT / "runs" / "bench-bundles"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "block_chain_step"))
    args = parser.parse_args(argv)

    from device_runner.backends import training_build_present
    from device_runner.backends.block_chain import BlockChainTrainer, BlockSessions, InferChain
    from device_runner.backends.onnx_step import StepGraphTrainer
    from device_runner.bundle import load_bundle
    from device_runner.model_state import ModelState

    v1, v2 = load_bundle(export(args, 1)), load_bundle(export(args, 2))
    k, threads = args.k, args.threads
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.batch, *v2.stage(k).feature_shape)).astype(np.float32)
    labels = rng.integers(0, len(v2.classes), args.batch)
    lrs = {b: 0.01 for b in range(v2.num_blocks)}
    state, sessions = ModelState.load(v2.weights_path), BlockSessions(threads)
    trainers = {"block chain (format 2)": BlockChainTrainer(v2.stage(k), v2.blocks, state, sessions),
                "step.onnx (format 1)": StepGraphTrainer(v1.stage(k), threads)}
    if training_build_present():
        from device_runner.backends.ort_training import SuffixTrainer
        trainers["ORT training (format 1)"] = SuffixTrainer(v1.stage(k), threads)
    times = {name: [] for name in trainers}
    for rep in range(3 + args.reps):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_step(features, labels)
            trainer.sgd_step(lrs, 0.9, 5e-4)
            if rep >= 3:
                times[name].append(1e3 * (time.perf_counter() - started))
    freeze_ms = []
    for _ in range(args.reps):
        started = time.perf_counter()
        successor = BlockChainTrainer(v2.stage(k + 1), v2.blocks, state, sessions)
        successor.train_step(InferChain(v2.blocks[k:k + 1], state, sessions).forward(features), labels)
        freeze_ms.append(1e3 * (time.perf_counter() - started))
    rows = [{"trainer": name, "step_ms_p50": round(statistics.median(t), 1), "step_ms_all": [round(x, 1) for x in t]}
            for name, t in times.items()]
    rows.append({"trainer": f"block chain: freeze {k} -> {k + 1} + first step", "step_ms_p50":
                 round(statistics.median(freeze_ms), 1), "step_ms_all": [round(x, 1) for x in freeze_ms]})
    result = {"config": {**vars(args), "cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}, "rows": rows}
    print(f"{args.model} x{args.width}, {args.input_size}x{args.input_size}, batch {args.batch}, suffix from "
          f"block {k}, {threads} threads (train step + SGD, median of {args.reps})")
    for row in rows:
        print(f"  {row['trainer']:<44} {row['step_ms_p50']:8.1f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
