"""Wall time of a training epoch against its training FLOPs, for freezing points and sieving.

The SpFDE paper reports that the wall-time saving of layer freezing and data sieving is almost
linear in their FLOPs saving. This script measures how close this implementation comes.

Every configuration is a real :class:`spfde_edge.trainer.Trainer` (same model registry,
90 % MaskSet, per-block SGD groups) on one shared synthetic dataset of ``--samples`` images:

* freezing point ``k``: the trainer's own freezing step (``Trainer._freeze_block(k - 1)``:
  ``BlockModel.freeze_prefix`` plus the optimizer losing the frozen blocks), so blocks
  ``[0, k)`` run forward under ``no_grad`` with BatchNorm in eval mode;
* sieve fraction ``s``: ``TrainConfig.sieve = s``, so the trainer's ``DataSieve`` keeps
  ``round(s * samples)`` samples in its removed queue and the epoch runs on the rest.

What is timed is ``Trainer._train_epoch``, the trainer's whole epoch: batching and
augmentation, forward, backward, SGD, mask re-application and sieve recording. Mask updates,
evaluation and checkpoints (once per epoch or per delta-tau) are not timed. Each round runs
every configuration once, in one process, round-robin (the order reverses every other
round); the first ``--warmup`` rounds are discarded; the table shows medians over rounds.

FLOPs come from :mod:`spfde_edge.cost`, as the trainer counts them: ``sparse`` counts only
the masks' nonzeros (the trainer's training FLOPs); ``dense`` counts every weight, which is
what PyTorch executes, because masked layers run as dense convolutions of zeroed weights.

    python benchmarks/wall_vs_flops.py --out benchmarks/results/wall_vs_flops
    python benchmarks/wall_vs_flops.py --quick      # tiny smoke run, < 1 minute
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spfde_edge import cost  # noqa: E402
from spfde_edge.config import TrainConfig  # noqa: E402
from spfde_edge.data import load_dataset  # noqa: E402
from spfde_edge.trainer import Trainer  # noqa: E402

PLAN_TARGETS = (0.2, 0.25, 0.3)  # the paper's SpFDE rows: freeze X % and sieve X %
# wall: what a user waits; cpu: this process's CPU seconds, which on a shared machine leave out
# the time the scheduler gives to other jobs (with one thread, the wall time of an idle machine)
CLOCKS = ("cpu", "wall")


class Setting(NamedTuple):  # a NamedTuple: the tests load this file without registering a module
    name: str
    num_frozen: int
    sieve: float
    kind: str  # "freeze" (sieve 0), "sieve" (k = 0) or "spfde" (both)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=640,
                   help="training samples per epoch before sieving (default 640 = 5 batches of 128)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--freeze-points", type=int, nargs="+", default=None,
                   help="k values (frozen blocks); default every second k from 0 to n-1 plus the "
                        "plans' final k")
    p.add_argument("--sieve", type=float, nargs="+", default=[0.2, 0.25, 0.3],
                   help="sieve fractions measured at k = 0")
    p.add_argument("--plan-epochs", type=int, default=12,
                   help="epochs of the run whose freezing plans give the spfde rows' k (default: the "
                        "12-epoch runs of docs/benchmarks.md section 1)")
    p.add_argument("--plan-delta-tau", type=int, default=1)
    p.add_argument("--no-spfde", action="store_true", help="skip the freeze+sieve rows")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/wall_vs_flops")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.input_size, args.batch_size, args.samples = 0.25, 16, 16, 64
        args.rounds, args.warmup, args.sieve = 2, 1, [0.25]
        args.plan_epochs, args.plan_delta_tau = 12, 1
    return args


def train_config(args, sieve: float = 0.0, freeze_flops: float = 0.0, epochs: int = 1,
                 delta_tau: int = 1) -> TrainConfig:
    return TrainConfig(model=args.model, width=args.width, dataset="synthetic", input_size=args.input_size,
                       val_fraction=0.0, synthetic_size=args.samples, augment=True, epochs=epochs,
                       batch_size=args.batch_size, delta_tau=delta_tau, sparsity=args.sparsity, dst="mest",
                       freeze_flops=freeze_flops, sieve=sieve, seed=args.seed, threads=args.threads,
                       device="cpu")


def plan_frozen_blocks(args, data, out: Path) -> dict[str, int]:
    """Blocks each SpFDE target ends up freezing, from the trainer's own freezing plan."""
    plans = {}
    for target in PLAN_TARGETS:
        config = train_config(args, freeze_flops=target, epochs=args.plan_epochs, delta_tau=args.plan_delta_tau)
        with contextlib.redirect_stderr(io.StringIO()):  # "target out of reach" warnings
            trainer = Trainer(config, out, data=data)
        plans[f"{target:g}"] = trainer.freezer.plan.num_frozen
    return plans


def settings(args, num_blocks: int, plans: dict[str, int]) -> list[Setting]:
    points = args.freeze_points
    if points is None and args.quick:
        points = [0, num_blocks // 2, num_blocks - 1]
    elif points is None:
        points = sorted(set(range(0, num_blocks, 2)) | {num_blocks - 1} | set(plans.values()))
    bad = [k for k in points if not 0 <= k < num_blocks]
    if bad:
        raise SystemExit(f"--freeze-points must lie in 0..{num_blocks - 1} (the head trains), got {bad}")
    rows = [Setting(f"k={k}", k, 0.0, "freeze") for k in sorted(set(points) | {0})]
    rows += [Setting(f"sieve {s:g}", 0, s, "sieve") for s in args.sieve]
    if not args.no_spfde:
        rows += [Setting(f"spfde-{float(t) * 100:g}+{float(t) * 100:g} (k={k}, sieve {float(t):g})", k,
                         float(t), "spfde") for t, k in plans.items()]
    return rows


def build(args, setting: Setting, data, out: Path) -> Trainer:
    trainer = Trainer(train_config(args, sieve=setting.sieve), out, data=data)
    if setting.num_frozen:
        trainer._freeze_block(setting.num_frozen - 1)  # the trainer's own freezing step
    return trainer


def time_epoch(trainer: Trainer) -> tuple[dict[str, float], int, int]:
    """One trainer epoch: wall seconds and this process's CPU seconds (all its threads)."""
    with contextlib.redirect_stderr(io.StringIO()):  # the epoch's progress bar
        wall, cpu = time.perf_counter(), time.process_time()
        result = trainer._train_epoch(0)
        seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    return seconds, result.samples, result.batches


def least_squares(xs: list[float], ys: list[float]) -> dict:
    """y = intercept + slope * x, and the fit's largest residual."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return {"slope": None, "intercept": None, "max_abs_residual": None, "points": n}
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    residual = max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "max_abs_residual": residual, "points": n}


def summarise(rows: list[dict]) -> dict:
    """Fits over the freezing rows (sieve 0) and over the sieving rows (k = 0), both with k = 0."""
    groups = {"freeze": [r for r in rows if r["sieve"] == 0],
              "sieve": [r for r in rows if r["num_frozen"] == 0]}
    return {f"{clock}_{group}_vs_{count}_flops": least_squares([r[f"flops_ratio_{count}"] for r in chosen],
                                                               [r[f"{clock}_ratio"] for r in chosen])
            for clock in CLOCKS for group, chosen in groups.items() for count in ("sparse", "dense")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = load_dataset("synthetic", input_size=args.input_size, val_fraction=0.0, seed=args.seed,
                        synthetic_size=args.samples)
    plans = plan_frozen_blocks(args, data, out)
    base = build(args, Setting("k=0", 0, 0.0, "freeze"), data, out)
    num_blocks = len(base.model.blocks)
    chosen = settings(args, num_blocks, plans)
    trainers = {s.name: build(args, s, data, out) for s in chosen}
    densities = base.masks.layer_density()
    profile = base.profile

    times = {clock: {s.name: [] for s in chosen} for clock in CLOCKS}
    counts: dict[str, tuple[int, int]] = {}
    load: list[float] = []
    total_rounds = args.warmup + args.rounds
    started = time.perf_counter()
    for round_index in range(total_rounds):
        order = chosen if round_index % 2 == 0 else chosen[::-1]
        for setting in order:
            seconds, samples, batches = time_epoch(trainers[setting.name])
            counts[setting.name] = (samples, batches)
            if round_index >= args.warmup:
                for clock in CLOCKS:
                    times[clock][setting.name].append(seconds[clock])
        load.append(os.getloadavg()[0])
        print(f"round {round_index + 1}/{total_rounds} done "
              f"({'warm-up' if round_index < args.warmup else 'timed'}, {time.perf_counter() - started:.0f} s, "
              f"load {load[-1]:.1f})", file=sys.stderr, flush=True)

    base_name = chosen[0].name
    samples0 = counts[base_name][0]
    flops0 = {"sparse": cost.training_flops_per_sample(profile, densities, 0).total * samples0,
              "dense": cost.training_flops_per_sample(profile, {}, 0).total * samples0}
    rows = []
    for setting in chosen:
        samples, batches = counts[setting.name]
        sparse = cost.training_flops_per_sample(profile, densities, setting.num_frozen)
        dense = cost.training_flops_per_sample(profile, {}, setting.num_frozen)
        row = {
            "name": setting.name, "kind": setting.kind, "num_frozen": setting.num_frozen,
            "trainable_blocks": num_blocks - setting.num_frozen, "sieve": setting.sieve,
            "samples": samples, "steps": batches,
            "train_flops_per_sample_sparse": sparse.total, "train_flops_per_sample_dense": dense.total,
            "forward_flops_per_sample_dense": dense.forward,
            "epoch_flops_sparse": sparse.total * samples, "epoch_flops_dense": dense.total * samples,
        }
        for count in ("sparse", "dense"):
            row[f"flops_ratio_{count}"] = row[f"epoch_flops_{count}"] / flops0[count]
        for clock in CLOCKS:
            ts, base_ts = times[clock][setting.name], times[clock][base_name]
            median = statistics.median(ts)
            row.update({
                f"{clock}_s_median": median, f"{clock}_s_min": min(ts), f"{clock}_s_max": max(ts),
                f"{clock}_s_all": ts, f"{clock}_step_s": median / batches,
                f"{clock}_ratio": median / statistics.median(base_ts),
                f"{clock}_ratio_paired": statistics.median(t / b for t, b in zip(ts, base_ts)),
            })
            for count in ("sparse", "dense"):  # share of the FLOPs saving that shows up as time
                saved = 1 - row[f"flops_ratio_{count}"]
                row[f"{clock}_saving_efficiency_{count}"] = \
                    (1 - row[f"{clock}_ratio"]) / saved if saved > 1e-9 else None
        rows.append(row)

    result = {
        "config": {k: v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_blocks": num_blocks, "block_names": base.model.block_names,
        "plans_num_frozen": plans, "sparsity": base.masks.sparsity(),
        "load_average_1min_per_round": load, "table": rows, "fits": summarise(rows),
        "total_s": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"\n{cfg['model']} width {cfg['width']:g}, {cfg['input_size']}x{cfg['input_size']}, batch "
          f"{cfg['batch_size']}, {cfg['samples']} samples/epoch before sieving, sparsity "
          f"{result['sparsity']:.2f}, {result['machine']['threads']} thread(s); median of {cfg['rounds']} "
          "interleaved rounds; ratios are against k=0 (paired: median of per-round ratios)")
    print("| row | samples | steps | train GFLOPs/sample sparse / dense | FLOPs ratio sparse / dense "
          "| CPU s/epoch (min-max) | CPU ratio (paired) | wall s/epoch (min-max) | wall ratio (paired) "
          "| CPU saving / FLOPs saving |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["table"]:
        eff = r["cpu_saving_efficiency_sparse"]
        clocks = " | ".join(
            f"{r[f'{c}_s_median']:.2f} ({r[f'{c}_s_min']:.2f}-{r[f'{c}_s_max']:.2f}) "
            f"| {r[f'{c}_ratio']:.3f} ({r[f'{c}_ratio_paired']:.3f})" for c in CLOCKS)
        print(f"| {r['name']} | {r['samples']} | {r['steps']} "
              f"| {r['train_flops_per_sample_sparse'] / 1e9:.4f} / {r['train_flops_per_sample_dense'] / 1e9:.4f} "
              f"| {r['flops_ratio_sparse']:.3f} / {r['flops_ratio_dense']:.3f} | {clocks} "
              f"| {'-' if eff is None else f'{eff:.2f}'} |")
    print("\nleast squares, time ratio = intercept + slope x FLOPs ratio (proportional would be 0 + 1 x):")
    for name, fit in result["fits"].items():
        if fit["slope"] is None:
            print(f"  {name}: too few points")
        else:
            print(f"  {name}: intercept {fit['intercept']:.3f}, slope {fit['slope']:.3f}, "
                  f"largest residual {fit['max_abs_residual']:.3f} ({fit['points']} rows)")


if __name__ == "__main__":
    main()
