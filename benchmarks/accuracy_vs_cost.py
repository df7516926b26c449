"""The SpFDE paper's accuracy-versus-cost table at small scale.

Every row trains the same model for the same epochs and seeds, each run in its own process
(so peak RSS is per run), through the real CLI. Prints a table and writes JSON.

    python benchmarks/accuracy_vs_cost.py --data-dir ../shared/data/cifar10/train --epochs 12 \
        --train-subset 5000 --seeds 0 1 --out benchmarks/results/accuracy_vs_cost
    python benchmarks/accuracy_vs_cost.py --quick      # smoke run on synthetic data, < 1 minute
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = {  # name -> options on top of the common ones (paper: 90% sparsity, MEST)
    "dense": ["--sparsity", "0", "--dst", "static"],
    "sparse": [],
    "spfde-20+20": ["--freeze-flops", "0.2", "--sieve", "0.2"],
    "spfde-25+25": ["--freeze-flops", "0.25", "--sieve", "0.25"],
    "spfde-30+30": ["--freeze-flops", "0.3", "--sieve", "0.3"],
    "freeze-only-20": ["--freeze-flops", "0.2"],
    "sieve-only-20": ["--sieve", "0.2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/cifar10/train", help="CIFAR-10 class folders")
    p.add_argument("--dataset", default="imagefolder")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--delta-tau", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/accuracy_vs_cost")
    p.add_argument("--quick", action="store_true", help="tiny synthetic smoke run (< 1 minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.data_dir, args.width, args.epochs, args.batch_size = "synthetic", None, 0.25, 4, 32
        args.seeds, args.rows, args.train_subset = [0], ["dense", "sparse", "spfde-20+20"], None
    return args


def common_options(args) -> list[str]:
    opts = ["--model", args.model, "--dataset", args.dataset, "--epochs", str(args.epochs),
            "--delta-tau", str(args.delta_tau), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--sparsity", str(args.sparsity), "--dst", "mest", "--device", "cpu"]
    if args.data_dir:
        opts += ["--data-dir", args.data_dir]
    if args.width is not None:
        opts += ["--width", str(args.width)]
    if args.train_subset:
        opts += ["--train-subset", str(args.train_subset)]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    if args.quick:
        opts += ["--synthetic-size", "128", "--input-size", "16", "--threads", "1"]
    return opts


def run_row(args, row: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{row}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.exists():  # finished earlier: reuse, so a long benchmark can be resumed
        return json.loads(summary_path.read_text())
    cmd = [sys.executable, "-m", "spfde_edge.train", *common_options(args), *ROWS[row],
           "--seed", str(seed), "--out", str(run_dir)]
    if (run_dir / "checkpoint.pt").exists():
        cmd = [sys.executable, "-m", "spfde_edge.train", "--resume", str(run_dir)]
    started = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"row {row} seed {seed} failed:\n{result.stderr[-2000:]}")
    summary = json.loads(summary_path.read_text())
    summary["process_wall_s"] = time.perf_counter() - started
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def tabulate(rows: dict[str, list[dict]]) -> list[dict]:
    sparse = rows.get("sparse")
    ref_flops = statistics.fmean(s["train_flops"] for s in sparse) if sparse else None
    ref_wall = statistics.fmean(s["wall_s"] for s in sparse) if sparse else None
    table = []
    for name, runs in rows.items():
        acc, acc_std = mean_std([100 * s["val_acc"] for s in runs])
        flops = statistics.fmean(s["train_flops"] for s in runs)
        wall = statistics.fmean(s["wall_s"] for s in runs)
        table.append({
            "row": name, "seeds": len(runs), "val_top1": acc, "val_top1_std": acc_std,
            "train_flops": flops, "flops_vs_sparse": flops / ref_flops if ref_flops else None,
            "wall_s": wall, "wall_vs_sparse": wall / ref_wall if ref_wall else None,
            "memory_avg_mb": statistics.fmean(s["memory_model_mb"]["average"] for s in runs),
            "memory_min_mb": statistics.fmean(s["memory_model_mb"]["minimum"] for s in runs),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in runs),
            "freeze_reduction": statistics.fmean(s["freeze_reduction"] for s in runs),
            "sieve_reduction": statistics.fmean(s["sieve_reduction"] for s in runs),
        })
    return table


def print_table(table: list[dict]) -> None:
    head = (f"{'row':<16}{'val top-1 %':>14}{'train FLOPs':>13}{'vs sparse':>10}{'wall vs sp.':>12}"
            f"{'mem avg MB':>11}{'mem min MB':>11}{'peak RSS MB':>12}")
    print(head)
    print("-" * len(head))
    for r in table:
        rel = f"{r['flops_vs_sparse']:.3f}" if r["flops_vs_sparse"] else "-"
        wall = f"{r['wall_vs_sparse']:.3f}" if r["wall_vs_sparse"] else "-"
        print(f"{r['row']:<16}{r['val_top1']:>8.2f} ±{r['val_top1_std']:>4.2f}{r['train_flops']:>13.3e}"
              f"{rel:>10}{wall:>12}{r['memory_avg_mb']:>11.1f}{r['memory_min_mb']:>11.1f}"
              f"{r['peak_rss_mb']:>12.0f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seeds outer, rows inner: machine drift spreads over all rows
        for row in args.rows:
            rows.setdefault(row, []).append(run_row(args, row, seed, out))
            print(f"done {row} seed {seed}", flush=True)
    table = tabulate(rows)
    print_table(table)
    result = {"command": " ".join(sys.argv), "options": vars(args), "table": table,
              "date": time.strftime("%Y-%m-%d"), "machine": _machine()}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _machine() -> dict:
    import os
    import platform
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


if __name__ == "__main__":
    main()
