"""``python -m device_runner``: parse arguments, call loop/report functions, print one error line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  python -m device_runner --bundle export/resnet18 --profile profiles/raspberry-pi-4.yaml --data digits --epochs 3 --out runs/dev
  python -m device_runner --bundle export/r18 --profile jetson-orin-nano --data imagefolder:/data/mycam --epochs 20 --out runs/cam
  python -m device_runner --resume runs/cam
  python -m device_runner --bundle export/r18 --profile raspberry-pi-4 --dry-run
  python -m device_runner report runs/cam [--html]"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_runner", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Keep training an exported SpFDE bundle on this device, "
                                            "within the memory and energy budgets of a board profile. "
                                            "No torch needed. See docs/device.md.")
    p.add_argument("--bundle", help="bundle folder written by python -m spfde_edge.export")
    p.add_argument("--profile", help="board profile YAML, or a name in profiles/ (e.g. raspberry-pi-4)")
    p.add_argument("--data", help="digits | imagefolder:PATH (class sub-folders)")
    p.add_argument("--epochs", type=int, default=3, help="device epochs (default 3)")
    p.add_argument("--out", help="run folder (default runs/device); must be new or empty")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: batch size, stages, predicted memory and energy, or why it cannot fit")
    p.add_argument("--lr", type=float, help="base LR of the per-block cosine (default: the bundle's; "
                                             "a tenth of it when the host schedule is finished)")
    p.add_argument("--batch-size", type=int, help="force a batch size (default: largest that fits)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (default 0.1)")
    p.add_argument("--sieve", type=float, help="fraction of samples in the removed queue (default: the "
                                               "bundle's, 0.2 if it had none)")
    p.add_argument("--delta-tau", type=int, help="Δτ in device epochs (default: the bundle's, scaled)")
    p.add_argument("--freeze-at", help="comma-separated device epochs at which each later stage starts")
    p.add_argument("--max-per-class", type=int, help="use at most this many images per class")
    p.add_argument("--memory-budget-mb", type=float, help="override budgets.memory_mb")
    p.add_argument("--energy-budget-j", type=float, help="override budgets.energy_j (also on --resume)")
    p.add_argument("--cache", choices=("memory", "disk", "none"), help="override cache.location")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the profile's)")
    p.add_argument("--threads", type=int, help="override budgets.threads")
    p.add_argument("--suffix-backend", choices=("auto", "onnxruntime-training", "onnxruntime"),
                   help="override the profile's suffix_backend: ONNX Runtime training artifacts, or the "
                        "standard-ONNX step graph on plain onnxruntime (the only one on aarch64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the final report (or plan) as JSON")
    return p


def report_main(argv: list[str]) -> int:
    from .errors import DeviceRunnerError
    from .report import load_report, table, write_html

    p = argparse.ArgumentParser(prog="python -m device_runner report")
    p.add_argument("run", help="run folder")
    p.add_argument("--html", nargs="?", const="", metavar="PATH", help="write an HTML page with plots "
                                                                      "(default RUN/report.html)")
    args = p.parse_args(argv)
    try:
        report = load_report(Path(args.run))
        print(table(report))
        if args.html is not None:
            path = write_html(report, Path(args.html) if args.html else Path(args.run) / "report.html")
            print(f"wrote {path}")
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .errors import DeviceRunnerError
    from .loop import dry_run, resume, start
    from .report import table
    from .run_config import RunConfig

    try:
        if args.resume:
            runner = resume(Path(args.resume), energy_budget_j=args.energy_budget_j)
        else:
            if not args.bundle or not args.profile:
                print("error: give --bundle and --profile (and --data, --out), or --resume RUN",
                      file=sys.stderr)
                return 2
            freeze_at = tuple(int(v) for v in args.freeze_at.split(",")) if args.freeze_at else None
            config = RunConfig(bundle=args.bundle, profile=args.profile, data=args.data, out=args.out,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               val_fraction=args.val_fraction, sieve=args.sieve, delta_tau=args.delta_tau,
                               freeze_at=freeze_at, max_per_class=args.max_per_class,
                               memory_budget_mb=args.memory_budget_mb, energy_budget_j=args.energy_budget_j,
                               cache=args.cache, checkpoint_every=args.checkpoint_every,
                               threads=args.threads, seed=args.seed, suffix_backend=args.suffix_backend)
            if args.dry_run:
                plan = dry_run(config)
                if args.json:
                    print(json.dumps(plan))
                return 0
            runner = start(config)
        report = runner.run()
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # option values numpy/the sieve refuse, e.g. --sieve 1.5
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        print(json.dumps(report))
    return 0 if report["status"] in ("finished", "stopped: energy budget reached") else 1


if __name__ == "__main__":
    sys.exit(main())
