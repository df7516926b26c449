"""Close the loop (issue 14): host training → export → device training on images the host never
saw → evaluate on a third disjoint set; three devices merged; and the fresh-bundle first epoch.

Every step is the real CLI in its own process; the command, its wall time and its exit code
go into the JSON. On the CIFAR-10 JPEGs (``--data-dir``, class folders, read only) it:

1. carves disjoint, class-balanced, seeded splits as symlinks into ``WORK/data``: HOST,
   DEVICE_A/B/C (one per simulated board) and TEST;
2. trains a sparse SpFDE model on HOST (``spfde_edge.train``) and exports it
   (``spfde_edge.export --checkpoint``);
3. "before": the host checkpoint's top-1 on TEST, with the host's own evaluation code
   (``Trainer.evaluate``; the exporter checked that the bundle's graphs give the host model's
   logits, so this is the bundle's accuracy too);
4. trains the bundle on each DEVICE_x (``python -m device_runner``) and evaluates each run
   on TEST (``device_runner evaluate --data imagefolder:TEST``): "after";
5. merges the three runs (``spfde_edge.merge``) and evaluates the merged host checkpoint on
   TEST as in 3; as a check that 3 and 4 measure the same thing, device run A is brought
   home (``spfde_edge.import``) and evaluated on the host too: its top-1 must equal the
   device's;
6. the fresh-model demo: a freshly initialised bundle (``spfde_edge.export --model``, the
   exporter's defaults) trained on DEVICE_A, first device epoch's held-out loss, against the
   host trainer's first epoch on the same images with the same sparsity settings.

    python benchmarks/close_the_loop.py                 # the measurement (22 min here, 2 shared cores)
    python benchmarks/close_the_loop.py --quick         # smoke run on a few images (about 2 minutes)

Finished steps are kept in ``WORK/steps/NAME.json`` and reused when the script runs again
with the same options (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("A", "B", "C")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p, "close_the_loop", host_per_class=400, device_per_class=200, test_per_class=200,
                        device_help="per class, for each of A, B, C")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the host run and the device runs")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--host-epochs", type=int, default=16)
    p.add_argument("--device-epochs", type=int, default=6)
    p.add_argument("--bundle-format", type=int, choices=(1, 2), default=2,
                   help="bundle format of both exports (spfde_edge.export --bundle-format; default 2)")
    p.add_argument("--stages", default=None,
                   help="format 1: stages of the host checkpoint's bundle (spfde_edge.export --stages; default: "
                        "the exporter's, from the checkpoint's frozen point to the plan's last)")
    p.add_argument("--fresh-stages", default="0", help="format 1: stages of the fresh bundle (step 6)")
    p.add_argument("--step-graph", action="store_true",
                   help="format 1: also export step.onnx (plain-onnxruntime/aarch64 backend; about a minute "
                        "per stage more); without it the device trains on onnxruntime-training")
    p.add_argument("--profile", default="generic-x86")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="remove WORK and start over")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, tiny model, 1-2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.host_per_class, args.device_per_class, args.test_per_class = 20, 10, 10
        args.width, args.input_size, args.host_epochs, args.device_epochs = 0.25, 16, 2, 2
        args.fresh_stages = "0"
    default_folders(args, "close_the_loop")
    return args


def add_split_arguments(p: argparse.ArgumentParser, name: str, host_per_class: int, device_per_class: int,
                        test_per_class: int, device_help: str | None = None) -> None:
    """The options every benchmark on carved CIFAR-10 splits takes (:func:`prepared_splits`):
    the images, its work and results folders (:func:`default_folders`) and the split sizes."""
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10/train"),
                   help="class folders of images (read only)")
    p.add_argument("--work", type=Path, default=None, help=f"splits, runs and bundles (default runs/{name}[_quick])")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default benchmarks/results/{name}[_quick])")
    p.add_argument("--host-per-class", type=int, default=host_per_class)
    p.add_argument("--device-per-class", type=int, default=device_per_class, help=device_help)
    p.add_argument("--test-per-class", type=int, default=test_per_class)


def default_folders(args: argparse.Namespace, name: str) -> None:
    """``--work`` and ``--out`` when not given: runs/NAME and benchmarks/results/NAME (``_quick`` for --quick)."""
    suffix = "_quick" if args.quick else ""
    args.work = Path(args.work or ROOT / f"runs/{name}{suffix}")
    args.out = Path(args.out or ROOT / f"benchmarks/results/{name}{suffix}")


# -- 1. splits ----------------------------------------------------------------------------------
def carve_splits(data_dir: Path, work: Path, sizes: dict[str, int], seed: int) -> dict:
    """Symlink disjoint, class-balanced samples of every class into ``work/<split>/<class>/``.

    Within each class the files (sorted by name) are permuted by ``default_rng(seed)`` and cut
    into consecutive chunks in the order of ``sizes``, so the splits never share an image and
    the same seed always gives the same splits."""
    rng = np.random.default_rng(seed)
    classes = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    need = sum(sizes.values())
    for name in classes:
        files = sorted(f for f in (data_dir / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) < need:
            raise SystemExit(f"error: class {name} has {len(files)} images, the splits need {need}; "
                             "pass smaller --*-per-class")
        order = rng.permutation(len(files))
        start = 0
        for split, count in sizes.items():
            folder = work / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in order[start:start + count]:
                (folder / files[i].name).symlink_to(files[i].resolve())
            start += count
    return {"classes": classes, "per_class": sizes,
            "images": {split: count * len(classes) for split, count in sizes.items()}}


def prepared_splits(data_dir: Path, work: Path, sizes: dict[str, int], seed: int) -> dict:
    """The splits of ``work`` (``work/splits.json``, ``work/data/<split>``): carved on the first
    run, reused after; SystemExit when ``work`` holds splits of other sizes."""
    data, splits_json = work / "data", work / "splits.json"
    if not splits_json.exists():
        if data.exists():
            shutil.rmtree(data)
        splits_json.write_text(json.dumps(carve_splits(Path(data_dir), data, sizes, seed), indent=2))
    splits = json.loads(splits_json.read_text())
    if splits["per_class"] != sizes:
        raise SystemExit(f"error: {work} holds splits of other sizes {splits['per_class']}; pass --fresh "
                         "or another --work")
    return splits


# -- running the CLIs ---------------------------------------------------------------------------
class Steps:
    """Runs each command once, records command, wall time, exit code and stderr tail in
    ``work/steps/NAME.json``; a recorded step that succeeded is reused."""

    def __init__(self, work: Path):
        self.folder = work / "steps"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], json_stdout: bool = False) -> dict:
        path = self.folder / f"{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
            if record["returncode"] == 0:
                record["reused"] = True
                self.records[name] = record
                return record
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        record = {"command": " ".join(cmd), "wall_s": round(time.perf_counter() - started, 1),
                  "returncode": result.returncode, "stderr_tail": result.stderr[-3000:]}
        if json_stdout and result.returncode == 0:
            record["output"] = json.loads(result.stdout)
        else:
            record["stdout_tail"] = result.stdout[-3000:]
        path.write_text(json.dumps(record, indent=2))
        self.records[name] = record
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"    {status} in {record['wall_s']} s", flush=True)
        if result.returncode != 0:
            print("    " + result.stderr.strip()[-1500:].replace("\n", "\n    "), flush=True)
        return record


def py(*module_args: str) -> list[str]:
    return [sys.executable, *module_args]


# -- host evaluation (its own process: python benchmarks/close_the_loop.py host-eval ...) --------
def host_eval(checkpoint: str, data_dir: str, threads: int, cache_dir: str) -> dict:
    """Top-1 and loss of a host checkpoint on an image folder, through the host trainer's own
    evaluation (``Trainer.evaluate``, the checkpoint's normalisation) with ``data_dir`` as the
    validation split."""
    import torch
    from spfde_edge.checkpoint import load_checkpoint
    from spfde_edge.config import TrainConfig
    from spfde_edge.data import load_dataset
    from spfde_edge.trainer import Trainer

    torch.set_num_threads(threads)
    state = load_checkpoint(Path(checkpoint))
    config = TrainConfig.from_dict(state["config"]).replace(device="cpu", threads=threads, cache_dir=cache_dir)
    data = load_dataset(config.dataset, data_dir=config.data_dir, input_size=config.input_size,
                        val_fraction=config.val_fraction, seed=config.seed,
                        synthetic_size=config.synthetic_size, cache_dir=cache_dir)
    test = load_dataset("imagefolder", data_dir=data_dir, input_size=config.input_size, val_fraction=0.0,
                        cache_dir=cache_dir)
    if test.classes != data.classes:
        raise SystemExit(f"error: {data_dir} classes {test.classes} differ from the model's {data.classes}")
    data.val = test.train
    scratch = Path(cache_dir) / "host-eval-scratch"  # the trainer's out; nothing is saved there
    trainer = Trainer(config, scratch, data=data)
    trainer.load_state_dict(state)
    with torch.no_grad():
        top1, loss = trainer.evaluate()
    return {"top1": top1, "loss": loss, "images": len(test.train), "epoch": state["epoch"],
            "num_frozen": state["num_frozen"]}


# -- the pipeline -------------------------------------------------------------------------------
def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "host-eval":
        sub = argparse.ArgumentParser(prog="close_the_loop.py host-eval")
        sub.add_argument("checkpoint")
        sub.add_argument("--data", required=True)
        sub.add_argument("--threads", type=int, default=2)
        sub.add_argument("--cache-dir", required=True)
        sub.add_argument("--model", help="a run of your own model: name it to let its code be imported")
        a = sub.parse_args(argv[1:])
        from spfde_edge.user_models import allow

        allow(a.model)
        print(json.dumps(host_eval(a.checkpoint, a.data, a.threads, a.cache_dir)))
        return {}

    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work)
    threads = ["--threads", str(args.threads)]
    cache = str(work / "cache")
    data = work / "data"
    split_dirs = {"host": data / "host", **{f"device_{d}": data / f"device_{d}" for d in DEVICES},
                  "test": data / "test"}

    # 1. splits
    sizes = {"host": args.host_per_class, **{f"device_{d}": args.device_per_class for d in DEVICES},
             "test": args.test_per_class}
    splits = prepared_splits(Path(args.data_dir), work, sizes, args.seed)

    # 2. host training and export
    host_run, bundle = work / "host", work / "bundle"
    model = ["--model", args.model, "--width", str(args.width), "--input-size", str(args.input_size)]
    steps.run("host_train", py("-m", "spfde_edge.train", *model, "--dataset", "imagefolder",
                               "--data-dir", str(split_dirs["host"]), "--epochs", str(args.host_epochs),
                               "--sparsity", "0.9", "--dst", "mest", "--freeze-flops", "0.2", "--sieve", "0.2",
                               "--delta-tau", "2", "--seed", str(args.seed), "--device", "cpu",
                               "--cache-dir", cache, *threads, "--out", str(host_run)))
    shape = ["--bundle-format", str(args.bundle_format)]
    if args.bundle_format == 1:
        shape += [] if args.step_graph else ["--no-step-graph"]
    stages = ["--stages", args.stages] if args.stages and args.bundle_format == 1 else []
    steps.run("host_export", py("-m", "spfde_edge.export", "--checkpoint", str(host_run), "--out", str(bundle),
                                *shape, *stages))

    def evaluate_host(name: str, checkpoint: Path) -> None:
        steps.run(name, py(str(Path(__file__).resolve()), "host-eval", str(checkpoint), "--data",
                           str(split_dirs["test"]), "--cache-dir", cache, *threads), json_stdout=True)

    # 3. before: the host model on TEST
    evaluate_host("before_host_eval", host_run)

    # 4. three devices, each evaluated on TEST
    for d in DEVICES:
        run = work / f"device_{d}"
        steps.run(f"device_{d}", py("-m", "device_runner", "--bundle", str(bundle), "--profile", args.profile,
                                    "--data", f"imagefolder:{split_dirs[f'device_{d}']}",
                                    "--epochs", str(args.device_epochs), "--seed", str(args.seed),
                                    "--cache", "memory", *threads, "--out", str(run)))
        steps.run(f"device_{d}_eval", py("-m", "device_runner", "evaluate", str(run), "--data",
                                         f"imagefolder:{split_dirs['test']}", *threads, "--json"),
                  json_stdout=True)

    # 5. merge, evaluate on the host; device A imported home as the cross-check of 3 against 4
    merged = work / "merged"
    steps.run("merge", py("-m", "spfde_edge.merge", *(str(work / f"device_{d}") for d in DEVICES),
                          "--out", str(merged), "--dataset", "imagefolder", "--data-dir", str(split_dirs["host"])))
    evaluate_host("merged_host_eval", merged)
    imported = work / "device_A_home"
    steps.run("import_A", py("-m", "spfde_edge.import", str(work / "device_A"), "--out", str(imported),
                             "--dataset", "imagefolder", "--data-dir", str(split_dirs["host"])))
    evaluate_host("import_A_host_eval", imported)

    # 6. fresh bundle: the device's first epoch against the host trainer's, same images
    fresh_bundle, fresh_run, fresh_host = work / "fresh_bundle", work / "fresh_device_A", work / "fresh_host_A"
    steps.run("fresh_export", py("-m", "spfde_edge.export", "--model", args.model, "--width", str(args.width),
                                 "--input-size", str(args.input_size), *shape,
                                 *(["--stages", args.fresh_stages] if args.bundle_format == 1 else []),
                                 "--out", str(fresh_bundle)))
    steps.run("fresh_device_A", py("-m", "device_runner", "--bundle", str(fresh_bundle), "--profile", args.profile,
                                   "--data", f"imagefolder:{split_dirs['device_A']}",
                                   "--epochs", str(args.device_epochs), "--seed", str(args.seed),
                                   "--cache", "memory", *threads, "--out", str(fresh_run)))
    # the exporter's defaults for a fresh model: sparsity 0.9 uniform (ERK until 2026-12), MEST,
    # freeze-flops 0.3, Δτ 5, a 160-epoch plan; the host trainer runs that plan's settings over
    # the device's epochs
    steps.run("fresh_host_A", py("-m", "spfde_edge.train", *model, "--dataset", "imagefolder",
                                 "--data-dir", str(split_dirs["device_A"]), "--epochs", str(args.device_epochs),
                                 "--sparsity", "0.9", "--distribution", "uniform", "--dst", "mest",
                                 "--freeze-flops", "0.3", "--delta-tau", "1", "--seed", str(args.seed),
                                 "--device", "cpu", "--cache-dir", cache, *threads, "--out", str(fresh_host)))

    result = {"command": " ".join([sys.executable, *sys.argv]), "options": {k: str(v) for k, v in vars(args).items()},
              "splits": splits, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
              "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "wall_s": round(time.perf_counter() - started, 1), "steps": steps.records}
    result["table"] = tabulate(steps.records, work)
    print_table(result["table"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'results.json'} ({result['wall_s']:.0f} s)")
    failed = [name for name, record in steps.records.items() if record["returncode"] != 0]
    if failed:  # later steps ran on whatever the failed ones left; the JSON keeps their stderr
        raise SystemExit(f"failed steps: {', '.join(failed)} (commands and stderr in {args.out / 'results.json'})")
    return result


def _output(records: dict, name: str) -> dict | None:
    record = records.get(name)
    return record.get("output") if record and record["returncode"] == 0 else None


def _report(run: Path) -> dict | None:
    path = run / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _epochs(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if kind == "host" or line.get("type") == "epoch"]


def tabulate(records: dict, work: Path) -> list[dict]:
    """One row per measured model; None where a step failed."""
    rows = []
    host = _output(records, "before_host_eval")
    host_epochs = _epochs(work / "host", "host")
    rows.append({"row": "host model, before device training", "test_top1": host and host["top1"],
                 "test_loss": host and host["loss"], "trained_on": "HOST",
                 "own_val_top1": host_epochs[-1]["val_acc"] if host_epochs else None,
                 "own_val_loss": host_epochs[-1]["val_loss"] if host_epochs else None, "route": "host evaluate"})
    for d in DEVICES:
        ev, rep = _output(records, f"device_{d}_eval"), _report(work / f"device_{d}")
        rows.append({"row": f"device {d}, after", "test_top1": ev and ev.get("top1"),
                     "test_loss": ev and ev.get("loss"), "trained_on": f"HOST + DEVICE_{d}",
                     "own_val_before": rep and rep["accuracy"]["before"],
                     "own_val_top1": rep and rep["accuracy"]["after"],
                     "own_val_loss": rep["history"][-1]["val_loss"] if rep and rep["history"] else None,
                     "batch_size": rep and rep["plan"]["batch_size"], "route": "device_runner evaluate"})
    merged = _output(records, "merged_host_eval")
    rows.append({"row": "merged A+B+C", "test_top1": merged and merged["top1"], "test_loss": merged and merged["loss"],
                 "trained_on": "HOST + DEVICE_A,B,C", "route": "host evaluate of the merged checkpoint"})
    home = _output(records, "import_A_host_eval")
    rows.append({"row": "check: device A imported, host", "test_top1": home and home["top1"],
                 "test_loss": home and home["loss"], "trained_on": "HOST + DEVICE_A",
                 "route": "spfde_edge.import + host evaluate (must equal device A)"})
    fresh_dev = _epochs(work / "fresh_device_A", "device")
    fresh_rep = _report(work / "fresh_device_A")
    fresh_host = _epochs(work / "fresh_host_A", "host")
    rows.append({"row": "fresh bundle, device epoch 1", "own_val_top1": fresh_dev[0]["val_acc"] if fresh_dev else None,
                 "own_val_loss": fresh_dev[0]["val_loss"] if fresh_dev else None,
                 "val_loss_per_epoch": [e["val_loss"] for e in fresh_dev],
                 "val_acc_per_epoch": [e["val_acc"] for e in fresh_dev],
                 "batch_size": fresh_rep and fresh_rep["plan"]["batch_size"],
                 "trained_on": "DEVICE_A", "route": "held-out split of the device run"})
    rows.append({"row": "fresh model, host epoch 1", "own_val_top1": fresh_host[0]["val_acc"] if fresh_host else None,
                 "own_val_loss": fresh_host[0]["val_loss"] if fresh_host else None,
                 "val_loss_per_epoch": [e["val_loss"] for e in fresh_host],
                 "val_acc_per_epoch": [e["val_acc"] for e in fresh_host],
                 "trained_on": "DEVICE_A", "route": "held-out split of the host run"})
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(table: list[dict]) -> None:
    head = f"{'row':<34}{'TEST top-1 %':>13}{'TEST loss':>11}{'own val top-1 %':>17}{'own val loss':>14}"
    print(head)
    print("-" * len(head))
    for r in table:
        top1 = r.get("test_top1")
        own = r.get("own_val_top1")
        print(f"{r['row']:<34}{_fmt(top1 and 100 * top1, '.2f'):>13}{_fmt(r.get('test_loss'), '.3f'):>11}"
              f"{_fmt(own and 100 * own, '.2f'):>17}{_fmt(r.get('own_val_loss'), '.3f'):>14}")


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


if __name__ == "__main__":
    main()
