"""What ``python -m spfde_edge.export`` costs: wall time, peak memory, bundle size (issue 12).

Each export runs as the real CLI in its own process; its whole process tree's resident
memory is sampled every 50 ms (the peak is the largest sum seen), and the machine's load
average is recorded before and after, since these machines are shared. Formats are
interleaved when several repeats are asked for.

    python benchmarks/export_cost.py --models resnet18 --formats 2
    python benchmarks/export_cost.py --models resnet32:0.25:16 --formats 1 2 --repeats 2

A model is ``NAME[:WIDTH[:INPUT_SIZE]]``. Format 1 exports the stages of its default freezing
plan; format 2 exports every block boundary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"], help="NAME[:WIDTH[:INPUT_SIZE]]")
    p.add_argument("--formats", nargs="+", type=int, default=[2], choices=(1, 2))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/export_cost"))
    p.add_argument("--keep", action="store_true", help="keep the exported bundles (in --out/bundles)")
    return p.parse_args(argv)


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def export_once(model: str, width: str | None, size: str | None, fmt: int, out: Path) -> dict:
    command = [sys.executable, "-m", "spfde_edge.export", "--model", model, "--out", str(out),
               "--bundle-format", str(fmt), "--force"]
    if width:
        command += ["--width", width]
    if size:
        command += ["--input-size", size]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(0.05)
    wall = time.perf_counter() - started
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    files = [p for p in out.rglob("*") if p.is_file()]
    manifest = json.loads((out / "manifest.json").read_text())
    row = {"model": model, "width": width, "input_size": size, "format": fmt, "wall_s": round(wall, 1),
           "export_s": manifest["export_s"], "peak_rss_mb": round(peak / 2**20), "bundle_mb":
           round(sum(p.stat().st_size for p in files) / 2**20, 2), "files": len(files),
           "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()], "command": " ".join(command[1:])}
    if fmt == 2:
        row["weights_mb"] = round(manifest["weights"]["bytes"] / 2**20, 2)
        row["dense_weights_mb"] = round(manifest["weights"]["dense_bytes"] / 2**20, 2)
        row["boundaries"] = len(manifest["blocks"])
        row["shared_programs"] = len(manifest["blocks"]) - len({b["train"] for b in manifest["blocks"]})
    else:
        row["boundaries"] = len(manifest["stages"])
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "bundles" if args.keep else Path(tempfile.mkdtemp(prefix="export_cost."))
    rows = []
    try:
        for repeat in range(args.repeats):
            for spec in args.models:
                name, width, size = (spec.split(":") + [None, None])[:3]
                for fmt in args.formats:
                    bundle = work / f"{name}-{width or 'default'}-v{fmt}"
                    row = export_once(name, width, size, fmt, bundle)
                    row["repeat"] = repeat
                    rows.append(row)
                    print(f"{spec:<18} v{fmt}  {row['wall_s']:>7.1f} s  {row['peak_rss_mb']:>6} MB RSS  "
                          f"{row['bundle_mb']:>8.2f} MB  {row['files']:>3} files  "
                          f"{row['boundaries']:>2} boundaries  load {row['load_before'][0]}->{row['load_after'][0]}",
                          flush=True)
                    if not args.keep:
                        shutil.rmtree(bundle, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    (out / "export_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'export_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
