"""Models beyond the built-in ResNets, end to end on CIFAR-10 JPEGs (issue 15): host training,
export, device training on images the host never saw, evaluation on a third disjoint set.

For each ``--models`` entry (any ``--model`` name: ``mobilenet_v2``,
``torchvision:mobilenet_v3_small``, ``timm:...``, ``pkg.mod:factory``), every step is the real
CLI in its own process (``close_the_loop.Steps``: command, wall time, exit code in JSON,
finished steps reused): ``spfde_edge.train`` on HOST, ``spfde_edge.export --checkpoint``,
the host model's top-1 on TEST, ``python -m device_runner`` on DEVICE, ``device_runner
evaluate`` on TEST. The table has accuracy before/after, export time and bundle size, the
device's step time and peak RSS (its report.json). Device step against PyTorch eager on the
same suffix: ``benchmarks/device_step.py --models ... --formats 2`` (docs/benchmarks.md).

    python benchmarks/own_models.py                       # mobilenet_v2, mobilenet_v3_small (about an hour here)
    python benchmarks/own_models.py --quick               # smoke run: few images, 1 epoch each
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.close_the_loop import (  # noqa: E402
    Steps, _machine, add_split_arguments, default_folders, prepared_splits, py)

SPLITS = ("host", "device", "test")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "torchvision:mobilenet_v3_small"])
    add_split_arguments(p, "own_models", host_per_class=500, device_per_class=300, test_per_class=200)
    p.add_argument("--host-epochs", type=int, default=8)
    p.add_argument("--device-epochs", type=int, default=3)
    p.add_argument("--bn-momentum", type=float, default=0.1,
                   help="spfde_edge.train --bn-momentum for every model (default 0.1: torchvision's "
                        "MobileNetV3 keeps 0.01, for 600-epoch schedules; docs/models.md)")
    p.add_argument("--profile", default="raspberry-pi-4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="remove WORK and start over")
    p.add_argument("--quick", action="store_true", help="smoke run: 20/10/10 images per class, 1 epoch each")
    args = p.parse_args(argv)
    if args.quick:
        args.host_per_class, args.device_per_class, args.test_per_class = 20, 10, 10
        args.host_epochs, args.device_epochs = 1, 1
    default_folders(args, "own_models")
    return args


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    from spfde_edge.models import folder_name

    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.work)
    threads = ["--threads", str(args.threads)]
    cache = str(args.work / "cache")
    data = args.work / "data"
    sizes = {"host": args.host_per_class, "device": args.device_per_class, "test": args.test_per_class}
    prepared_splits(Path(args.data_dir), args.work, sizes, args.seed)

    rows = []
    for model in args.models:
        tag = folder_name(model)
        host, bundle, device = (args.work / f"{tag}-{part}" for part in ("host", "bundle", "device"))
        steps.run(f"{tag}_host_train", py("-m", "spfde_edge.train", "--model", model, "--dataset", "imagefolder",
                                          "--data-dir", str(data / "host"), "--epochs", str(args.host_epochs),
                                          "--sparsity", "0.9", "--dst", "mest", "--freeze-flops", "0.2",
                                          "--delta-tau", "2", "--lr", "0.05", "--seed", str(args.seed),
                                          "--bn-momentum", str(args.bn_momentum),
                                          "--device", "cpu", "--cache-dir", cache, *threads, "--out", str(host)))
        export = steps.run(f"{tag}_export", py("-m", "spfde_edge.export", "--checkpoint", str(host),
                                               "--model", model, "--out", str(bundle), "--force"))
        before = steps.run(f"{tag}_host_eval", py(str(ROOT / "benchmarks/close_the_loop.py"), "host-eval",
                                                   str(host), "--data", str(data / "test"), "--cache-dir", cache,
                                                   "--model", model, *threads), json_stdout=True)
        steps.run(f"{tag}_device", py("-m", "device_runner", "--bundle", str(bundle), "--profile", args.profile,
                                      "--data", f"imagefolder:{data / 'device'}", "--epochs", str(args.device_epochs),
                                      "--seed", str(args.seed), "--cache", "memory", *threads, "--out", str(device)))
        after = steps.run(f"{tag}_device_eval", py("-m", "device_runner", "evaluate", str(device), "--data",
                                                    f"imagefolder:{data / 'test'}", *threads, "--json"),
                          json_stdout=True)
        rows.append(_row(model, bundle, device, export, before, after))
    result = {"command": " ".join([sys.executable, *sys.argv]), "options": {k: str(v) for k, v in vars(args).items()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "wall_s": round(time.perf_counter() - started, 1),
              "steps": steps.records, "table": rows}
    _print(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'results.json'} ({result['wall_s']:.0f} s)")
    failed = [name for name, record in steps.records.items() if record["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed steps: {', '.join(failed)} (stderr in {args.out / 'results.json'})")
    return result


def _row(model: str, bundle: Path, device: Path, export: dict, before: dict, after: dict) -> dict:
    report_path = device / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    stages = report.get("stages", [])
    return {"model": model, "export_s": export.get("wall_s"),
            "bundle_mb": round(_bytes(bundle) / 2**20, 2) if bundle.is_dir() else None,
            "host_top1": (before.get("output") or {}).get("top1"),
            "device_top1": (after.get("output") or {}).get("top1"),
            "device_peak_rss_mb": report.get("peak_rss_mb"),
            "device_stages": [{"stage": s["stage"], "batch_sizes": s.get("batch_sizes"),
                               "train_p50_ms": s["latency_ms"]["train"]["p50"],
                               "step_p50_ms": s["latency_ms"]["step"]["p50"],
                               "samples_per_s": s.get("samples_per_s")} for s in stages]}


def _print(rows: list[dict]) -> None:
    print(f"{'model':<32} {'export s':>8} {'MB':>6} {'host top1':>9} {'device top1':>11} {'peak MB':>8}  stages")
    for r in rows:
        top = [f"{v:.4f}" if isinstance(v, float) else "-" for v in (r["host_top1"], r["device_top1"])]
        stages = ", ".join(f"k={s['stage']} step {s['step_p50_ms']} ms" for s in r["device_stages"])
        print(f"{r['model']:<32} {r['export_s'] or '-':>8} {r['bundle_mb'] or '-':>6} {top[0]:>9} {top[1]:>11} "
              f"{r['device_peak_rss_mb'] or '-':>8}  {stages}")


if __name__ == "__main__":
    main()
