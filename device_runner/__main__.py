"""``python -m device_runner``: parse arguments, call loop/report functions, print one error line."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .cli import ArgumentParser, int_list

EXAMPLES = """examples:
  python -m device_runner --bundle export/resnet18 --profile profiles/raspberry-pi-4.yaml --data digits --epochs 3 --out runs/dev
  python -m device_runner --bundle export/r18 --profile jetson-orin-nano --data imagefolder:/data/mycam --epochs 20 --out runs/cam
  python -m device_runner --resume runs/cam
  python -m device_runner --bundle export/r18 --profile raspberry-pi-4 --dry-run
  python -m device_runner report runs/cam [--html]
  python -m device_runner evaluate runs/cam --data imagefolder:/data/cam-test   (or digits; default: held-out split)
  python -m device_runner predict runs/cam photo.jpg --top-k 3
  python -m device_runner export-model runs/cam --out cam.onnx
  python -m device_runner keygen --out keys/ --name release      (then: export --sign-key keys/release.key)
  python -m device_runner --bundle export/r18 --profile raspberry-pi-4 --data digits --trusted-keys keys/

exit codes: 0 finished (or stopped at the energy budget), 1 stopped for another reason,
  2 error (one "error:" line), 3 stopped at the memory budget (checkpointed; --resume RUN
  --memory-budget-mb MB continues), 130 interrupted by SIGINT/SIGTERM (checkpointed; --resume RUN)"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m device_runner", epilog=EXAMPLES,
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
    p.add_argument("--freeze-at", type=int_list,
                   help="comma-separated device epochs at which each later stage starts")
    p.add_argument("--stages", type=int_list,
                   help="comma-separated block boundaries the run trains at, in order (stage k: blocks "
                        "before k frozen); a format-2 bundle offers every boundary from the blocks the "
                        "host froze to the head, format 1 its exported stages (default: the host's "
                        "freezing plan)")
    p.add_argument("--max-per-class", type=int, help="use at most this many images per class")
    p.add_argument("--memory-budget-mb", type=float, help="override budgets.memory_mb")
    p.add_argument("--energy-budget-j", type=float, help="override budgets.energy_j (also on --resume)")
    p.add_argument("--cache", choices=("memory", "disk", "none"), help="override cache.location")
    p.add_argument("--cache-dtype", choices=("float32", "float16", "int8"),
                   help="override cache.dtype: how cached features are stored (docs/device.md)")
    p.add_argument("--prefix-precision", choices=("auto", "float32", "int8"),
                   help="override prefix_precision: frozen blocks in int8 where held-out top-1 stays "
                        "within 0.5 points (auto, the default), always, or never (docs/device.md)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the profile's)")
    p.add_argument("--threads", type=int, help="override budgets.threads")
    p.add_argument("--suffix-backend", choices=("auto", "onnxruntime-training", "onnxruntime"),
                   help="override the profile's suffix_backend: ONNX Runtime training artifacts, or the "
                        "standard-ONNX step graph on plain onnxruntime (the only one on aarch64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the final report (or plan) as JSON")
    p.add_argument("--trusted-keys", metavar="DIR",
                   help="run only bundles signed by a NAME.pub key in DIR (default: the profile's "
                        "trust.keys_dir; without either, unsigned bundles run). See docs/trust.md")
    return p


def report_main(argv: list[str]) -> int:
    from .errors import DeviceRunnerError
    from .report import load_report, table, write_html

    p = ArgumentParser(prog="python -m device_runner report")
    p.add_argument("run", help="run folder")
    p.add_argument("--html", nargs="?", const="", metavar="PATH", help="write an HTML page with plots "
                                                                      "(default RUN/report.html)")
    args = p.parse_args(argv)
    try:
        from .evaluate import latest_evaluation
        report = load_report(Path(args.run))
        evaluation = latest_evaluation(Path(args.run))
        print(table(report, evaluation))
        if args.html is not None:
            path = write_html(report, Path(args.html) if args.html else Path(args.run) / "report.html",
                              evaluation=evaluation)
            print(f"wrote {path}")
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def trust_main(argv: list[str]) -> int:
    """``keygen``: a new Ed25519 key pair; ``sign``: sign a bundle you checked (docs/trust.md)."""
    from .errors import DeviceRunnerError

    command, argv = argv[0], argv[1:]
    p = ArgumentParser(prog=f"python -m device_runner {command}")
    if command == "keygen":
        p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.key (0600) and NAME.pub")
        p.add_argument("--name", default="bundle-signing", help="key name (default bundle-signing)")
    else:
        p.add_argument("bundle", help="bundle folder to sign (its files are checked first)")
        p.add_argument("--key", required=True, metavar="KEY", help="private key NAME.key made by keygen")
    args = p.parse_args(argv)
    from . import signing
    try:
        if command == "keygen":
            private, public = signing.generate_key(Path(args.out), args.name)
            print(f"wrote {private} (private, keep it on the build machine) and {public} "
                  "(copy it into the devices' trusted keys folder)")
        else:
            from .bundle import load_bundle
            load_bundle(Path(args.bundle))
            print(f"signed {Path(args.bundle) / signing.SIGNATURE_NAME} with key "
                  f"{signing.sign_manifest(Path(args.bundle), Path(args.key))}")
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def model_main(argv: list[str]) -> int:
    """``evaluate``, ``predict``, ``export-model``: use the model a run trained (docs/device.md)."""
    from .errors import DeviceRunnerError

    command, argv = argv[0], argv[1:]
    p = ArgumentParser(prog=f"python -m device_runner {command}")
    p.add_argument("run", help="run folder of python -m device_runner (its last checkpoint is the model)")
    if command == "evaluate":
        p.add_argument("--data", help="digits | imagefolder:PATH (class sub-folders named as the bundle's "
                                      "classes); default: the run's own held-out split")
        p.add_argument("--name", help="name of the evaluation (RUN/evaluate-NAME.json; default from --data)")
        p.add_argument("--no-save", action="store_true", help="print only; do not write RUN/evaluate-NAME.json")
    elif command == "predict":
        p.add_argument("images", metavar="IMAGE_OR_FOLDER", help="an image, or a folder searched recursively")
        p.add_argument("--top-k", type=int, default=3, help="labels per image (default 3)")
    else:
        p.add_argument("--out", required=True, metavar="FILE", help="ONNX file to write, e.g. model.onnx")
        p.add_argument("--dense", action="store_true", help="store every weight dense (no sparse_initializer)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: the run's profile)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    try:
        if command == "evaluate":
            from .evaluate import evaluate, table
            result = evaluate(args.run, args.data, args.threads, save=not args.no_save, name=args.name)
        elif command == "predict":
            from .predict import predict, table
            result = predict(args.run, args.images, args.top_k, args.threads)
        else:
            from .export_model import export_model, summary as table
            result = export_model(args.run, args.out, args.threads, sparse=not args.dense)
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    if argv and argv[0] in ("keygen", "sign"):
        return trust_main(argv)
    if argv and argv[0] in ("evaluate", "predict", "export-model"):
        return model_main(argv)
    args = build_parser().parse_args(argv)
    from .errors import DeviceRunnerError
    from .loop import STOPPED_INTERRUPTED, STOPPED_MEMORY, StopRequest, dry_run, resume, start
    from .report import table
    from .run_config import RunConfig

    # With --json, stdout carries only the JSON; progress lines and the table go to stderr.
    out = sys.stderr if args.json else sys.stdout
    log = lambda line: print(line, file=out, flush=True)  # noqa: E731
    # A stop request is honoured between steps: the run checkpoints, prints one line, exits 130.
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.resume and args.trusted_keys:
            print("error: --trusted-keys applies when a run starts; a resumed run checks its bundle "
                  "again with the keys it started with (and its profile's trust.keys_dir)", file=sys.stderr)
            return 2
        if args.resume:
            if args.energy_budget_j is not None or args.memory_budget_mb is not None:  # --resume's options
                RunConfig(bundle="", profile="", energy_budget_j=args.energy_budget_j,
                          memory_budget_mb=args.memory_budget_mb).validate()
            runner = resume(Path(args.resume), log=log, energy_budget_j=args.energy_budget_j,
                            memory_budget_mb=args.memory_budget_mb, stop=stop)
        else:
            if not args.bundle or not args.profile:
                print("error: give --bundle and --profile (and --data, --out), or --resume RUN",
                      file=sys.stderr)
                return 2
            config = RunConfig(bundle=args.bundle, profile=args.profile, data=args.data, out=args.out,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               val_fraction=args.val_fraction, sieve=args.sieve, delta_tau=args.delta_tau,
                               freeze_at=args.freeze_at, stages=args.stages, max_per_class=args.max_per_class,
                               memory_budget_mb=args.memory_budget_mb, energy_budget_j=args.energy_budget_j,
                               cache=args.cache, cache_dtype=args.cache_dtype,
                               prefix_precision=args.prefix_precision,
                               checkpoint_every=args.checkpoint_every,
                               threads=args.threads, seed=args.seed,
                               suffix_backend=args.suffix_backend,
                               trusted_keys=str(Path(args.trusted_keys).resolve()) if args.trusted_keys else None,
                               ).validate()
            if args.dry_run:
                plan = dry_run(config, log=log)
                if args.json:
                    print(json.dumps(plan))
                return 0
            runner = start(config, log=log, stop=stop)
        report = runner.run()
    except DeviceRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # option values numpy/the sieve refuse, e.g. --sieve 1.5
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk while writing the report; checkpoints are atomic
        print(f"error: cannot write {exc.filename or 'a run file'}: {exc.strerror or exc}; the last "
              "complete checkpoint is kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second signal while stopping
        print("interrupted; the last complete checkpoint is kept (--resume RUN continues it)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if report["status"] == STOPPED_INTERRUPTED:
        print(f"interrupted: {report['events'][-1]['message']}", file=sys.stderr)
        return 130
    log(table(report))
    if args.json:
        print(json.dumps(report))
    if report["status"] == STOPPED_MEMORY:
        print(f"stopped: {report['events'][-1]['message']}", file=sys.stderr)
        return 3
    return 0 if report["status"] in ("finished", "stopped: energy budget reached") else 1


if __name__ == "__main__":
    sys.exit(main())
