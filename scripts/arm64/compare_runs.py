"""Compare two device_runner runs of the same bundle, data, seed and options, e.g. x86-64
against aarch64 under qemu: per-step losses, per-epoch metrics and the final checkpoint's
arrays. Prints tables; exit status 1 on a mismatch, 2 when a run folder is unusable.
Torch-free (numpy only).

    python scripts/arm64/compare_runs.py RUN_A RUN_B [--names x86-64 arm64] [--rtol 1e-4]

Losses match when |a - b| <= rtol * max(|a|, |b|); a float array when
||a - b|| <= rtol * max(||a||, ||b||) (relative norm), with a tiny absolute floor for arrays
that are all zero; integer and boolean arrays (masks, sieve counts, data order) must be equal.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TINY = 1e-12


class RunFolderError(Exception):
    pass


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_checkpoint(run: Path) -> Path:
    pointer = run / "checkpoint.json"
    if not pointer.is_file():
        raise RunFolderError(f"{run} has no checkpoint.json: did the run finish?")
    return run / json.loads(pointer.read_text())["folder"]


def checkpoint_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every array of every .npz under the checkpoint folder, keyed 'file:name'."""
    arrays = {}
    for path in sorted(folder.rglob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                arrays[f"{path.relative_to(folder)}:{key}"] = data[key]
    return arrays


def checkpoint_arrays_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    diff = np.linalg.norm(a - b)
    return 0.0 if diff == 0 else float(diff / max(scale, TINY))


def compare_steps(a: list[dict], b: list[dict], rtol: float, names) -> list[str]:
    problems = []
    if not a and not b:
        return ["no step_losses.jsonl in either run (run them through scripts/arm64/steplog.py)"]
    if len(a) != len(b):
        problems.append(f"{len(a)} logged steps in {names[0]} but {len(b)} in {names[1]}")
    print(f"\nper-step training loss ({min(len(a), len(b))} steps)")
    print(f"{'step':>4} {'stage':>5} {'epoch':>5} {'pos':>5} {'batch':>5} "
          f"{names[0]:>14} {names[1]:>14} {'rel diff':>9}")
    for i, (x, y) in enumerate(zip(a, b)):
        where = tuple(x[k] for k in ("stage", "epoch", "position", "batch"))
        if where != tuple(y[k] for k in ("stage", "epoch", "position", "batch")):
            problems.append(f"step {i}: different place in the run (stage/epoch/position/batch "
                            f"{where} vs {tuple(y[k] for k in ('stage', 'epoch', 'position', 'batch'))})")
        diff = abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), abs(y["loss"]), TINY)
        flag = "" if diff <= rtol else "  <-- mismatch"
        if flag:
            problems.append(f"step {i}: loss {x['loss']:.8g} vs {y['loss']:.8g} (rel {diff:.2e} > {rtol:g})")
        print(f"{i:>4} {where[0]:>5} {where[1]:>5} {where[2]:>5} {where[3]:>5} "
              f"{x['loss']:>14.8f} {y['loss']:>14.8f} {diff:>9.2e}{flag}")
    return problems


def compare_epochs(a: list[dict], b: list[dict], rtol: float, names) -> list[str]:
    a = [r for r in a if r.get("type") == "epoch"]
    b = [r for r in b if r.get("type") == "epoch"]
    problems = []
    if len(a) != len(b):
        problems.append(f"{len(a)} epochs in {names[0]}'s metrics.jsonl but {len(b)} in {names[1]}'s")
    print(f"\nper-epoch metrics (metrics.jsonl)")
    print(f"{'epoch':>5} {'stage':>5} {'val_loss ' + names[0]:>20} {'val_loss ' + names[1]:>20} "
          f"{'rel diff':>9} {'val_acc':>15} {'sparsity':>17}")
    for x, y in zip(a, b):
        diff = abs(x["val_loss"] - y["val_loss"]) / max(abs(x["val_loss"]), abs(y["val_loss"]), TINY)
        flag = ""
        if diff > rtol:
            flag = "  <-- mismatch"
            problems.append(f"epoch {x['epoch']}: val_loss {x['val_loss']:.8g} vs {y['val_loss']:.8g}")
        for key in ("stage", "val_acc", "sparsity", "regrown", "sieve_swapped", "masked_nonzero"):
            if x.get(key) != y.get(key):
                flag = "  <-- mismatch"
                problems.append(f"epoch {x['epoch']}: {key} {x.get(key)} vs {y.get(key)}")
        sparsity = f"{x.get('sparsity')}/{y.get('sparsity')}"
        print(f"{x['epoch']:>5} {x['stage']:>5} {x['val_loss']:>20.8f} {y['val_loss']:>20.8f} {diff:>9.2e} "
              f"{x['val_acc']:>7.4f}/{y['val_acc']:<7.4f} {sparsity:>17}{flag}")
    return problems


def compare_checkpoints(run_a: Path, run_b: Path, rtol: float, names) -> list[str]:
    fa, fb = final_checkpoint(run_a), final_checkpoint(run_b)
    a, b = checkpoint_arrays(fa), checkpoint_arrays(fb)
    for run, arrays in ((run_a, a), (run_b, b)):  # the suffix's weights, written by steplog.py
        arrays.update({f"final_params:{k}": v for k, v in checkpoint_arrays_file(run / "final_params.npz").items()})
    problems = []
    for key in sorted(set(a) ^ set(b)):
        problems.append(f"checkpoint array {key} only in {names[0] if key in a else names[1]}")
    print(f"\nfinal weights (final_params.npz) and checkpoint arrays ({fa.name} vs {fb.name}; every .npz in it)")
    print(f"{'array':<60} {'shape':>16} {'dtype':>8} {'rel diff':>9}")
    worst = (0.0, None)
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{key}: shape/dtype {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            continue
        if x.dtype.kind in "biuU":
            diff = 0.0 if np.array_equal(x, y) else float("inf")
            bad = diff != 0.0
        else:
            diff = rel_diff(x, y)
            bad = not diff <= rtol
        if diff > worst[0]:
            worst = (diff, key)
        if bad:
            problems.append(f"{key}: differs ({'not equal' if diff == float('inf') else f'rel {diff:.2e}'})")
        print(f"{key[-60:]:<60} {str(x.shape)[:16]:>16} {str(x.dtype):>8} {diff:>9.2e}{'  <-- mismatch' if bad else ''}")
    others = sorted(str(p.relative_to(fa)) for p in fa.rglob("*") if p.is_file() and p.suffix != ".npz")
    if others:
        print(f"not compared (not .npz): {', '.join(others)}")
    if not any(k.startswith("final_params:") for k in a):
        problems.append(f"no final_params.npz in {run_a}: run it through scripts/arm64/steplog.py")
    print(f"{len(set(a) & set(b))} arrays compared; largest relative difference "
          f"{worst[0]:.2e}{'' if worst[1] is None else ' (' + worst[1] + ')'}")
    return problems


def timing(run: Path, name: str) -> None:
    steps = _jsonl(run / "step_losses.jsonl")
    report_path = run / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    train_ms = np.median([s["train_s"] for s in steps]) * 1e3 if steps else float("nan")
    stages = report.get("stages", [])
    wall = sum(s.get("wall_s", 0.0) for s in stages) if stages else float("nan")
    step_count = sum(s.get("steps", 0) for s in stages) if stages else 0
    per_step = wall / step_count * 1e3 if step_count else float("nan")
    print(f"{name:<34} {len(steps):>6} {train_ms:>15.1f} {per_step:>17.1f} "
          f"{report.get('peak_rss_mb', float('nan')):>13.1f}  {report.get('backends', {}).get('suffix', '?')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--names", nargs=2, default=["run A", "run B"], metavar=("A", "B"))
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    args = p.parse_args(argv)
    names = args.names
    try:
        problems = compare_steps(_jsonl(args.run_a / "step_losses.jsonl"), _jsonl(args.run_b / "step_losses.jsonl"),
                                 args.rtol, names)
        problems += compare_epochs(_jsonl(args.run_a / "metrics.jsonl"), _jsonl(args.run_b / "metrics.jsonl"),
                                   args.rtol, names)
        problems += compare_checkpoints(args.run_a, args.run_b, args.rtol, names)
    except (RunFolderError, OSError, ValueError, KeyError) as exc:
        print(f"error: cannot compare: {exc}", file=sys.stderr)
        return 2
    print(f"\n{'run':<34} {'steps':>6} {'train step p50':>15} {'whole step mean':>17} {'peak RSS MB':>13}  suffix backend")
    timing(args.run_a, names[0])
    timing(args.run_b, names[1])
    if problems:
        print(f"\nMISMATCH ({len(problems)}):", *problems[:20], sep="\n  ")
        return 1
    print(f"\nOK: {names[0]} and {names[1]} agree within rtol {args.rtol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
