"""Device-side training step against PyTorch, on the same CPU threads.

For each model and split point k (stage k: blocks [0, k) frozen) the suffix is exported
once with ``spfde_edge.export`` (cached under ``--bundle-dir``), then:

* **step**: one training step (forward + backward + SGD with momentum and weight decay) of
  the suffix on both of the device runner's suffix backends, against PyTorch eager training
  of the same suffix (same weights, masks applied as ``weight * mask``, the same SGD), in one
  process, ``torch.set_num_threads`` = ORT intra-op threads:

  - ``ort``: ``device_runner.backends.ort_training.SuffixTrainer`` (backend
    "onnxruntime-training": ORT on-device training + the runner's numpy SGD);
  - ``step``: ``device_runner.backends.onnx_step.StepGraphTrainer`` (backend "onnxruntime":
    the bundle's ``step.onnx`` on a plain ``InferenceSession`` + the same numpy SGD).

  Repetitions alternate the order of the three; the median of each is reported, with the
  ratios ort/torch, step/torch and step/ort, and the relative difference of the first-step
  losses on the same batch (the two device backends must agree to ~1e-6).
* **rss**: peak RSS (VmHWM) of a process per backend (ORT training, step graph, PyTorch),
  each in its own subprocess, doing the same steps.
* **prefix**: forward latency of the frozen prefix on ExecuTorch (the bundle's XNNPACK
  ``.pte``), ONNX Runtime (``prefix.onnx``) and PyTorch eager, at the ``.pte``'s batch.

    python benchmarks/device_step.py                                     # resnet18 + resnet32 (width 2)
    python benchmarks/device_step.py --models resnet32 --batch-sizes 32 --reps 9
    python benchmarks/device_step.py --quick                             # smoke run, < 1 minute
                                                                         # (+ one tiny export on the first run)

Ratios are device / PyTorch (and step graph / ORT training): below 1 the first is faster or
smaller. Bundles cached in ``--bundle-dir`` without ``step.onnx`` (exported before the step
graph existed) are exported again; the export's time, and the step graph's share of it, are
kept next to the bundle (``<bundle>.export.json``) and copied into the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/device_step.py` from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_WIDTHS = {"resnet18": 1.0, "resnet32": 2.0}  # resnet32 2x wide as in the SpFDE paper
NUM_CLASSES = 10
INPUT_SIZE = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet32"], choices=list(DEFAULT_WIDTHS))
    p.add_argument("--width", nargs="*", default=[], metavar="MODEL=W",
                   help="channel multiplier per model (default resnet18=1 resnet32=2)")
    p.add_argument("--splits", nargs="+", default=["middle", "last-third"],
                   help="split points: middle (k = n//2), last-third (train the last n/3 blocks) or an integer k")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per backend (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    p.add_argument("--rss-steps", type=int, default=5, help="steps each RSS subprocess runs")
    p.add_argument("--prefix-reps", type=int, default=10)
    p.add_argument("--export-batch", type=int, default=32, help="the bundle's batch (the .pte's fixed batch)")
    p.add_argument("--threads", type=int, default=1,
                   help="ORT intra-op threads = torch threads (default 1: on a CPU shared with other "
                        "work, PyTorch's OpenMP barriers wait for descheduled threads; see docs)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--bundle-dir", default=None,
                   help="exported bundles are cached here (default export/bench; --quick: OUT/bundles)")
    p.add_argument("--out", default="benchmarks/results/device_step")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")
    p.add_argument("--no-prefix", action="store_true", help="skip the prefix latency")
    p.add_argument("--quick", action="store_true", help="tiny resnet32 smoke run (< 1 minute)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec: one RSS subprocess
    args = p.parse_args(argv)
    widths = dict(DEFAULT_WIDTHS)
    for item in args.width:
        name, _, value = item.partition("=")
        if name not in DEFAULT_WIDTHS or not value:
            p.error(f"--width takes MODEL=W with MODEL in {list(DEFAULT_WIDTHS)}, got '{item}'")
        widths[name] = float(value)
    if args.quick:
        args.models, args.splits, args.batch_sizes = ["resnet32"], ["last-third"], [16, 32]
        widths["resnet32"] = 0.25
        args.reps, args.warmup, args.rss_steps, args.prefix_reps, args.export_batch = 3, 1, 2, 3, 16
    if args.bundle_dir is None:
        args.bundle_dir = str(Path(args.out) / "bundles") if args.quick else "export/bench"
    args.widths = widths
    return args


# --- splits and bundles -----------------------------------------------------------------------

def split_point(spec: str, num_blocks: int) -> int:
    """Stage k of an n-block model: ``middle`` = n // 2, ``last-third`` trains the last ~n/3."""
    if spec == "middle":
        return num_blocks // 2
    if spec == "last-third":
        return num_blocks - round(num_blocks / 3)
    k = int(spec)
    if not 1 <= k < num_blocks:
        raise SystemExit(f"error: split {k} outside 1..{num_blocks - 1}")
    return k


def num_blocks_of(model: str, width: float) -> int:
    from spfde_edge.models import create_model

    return len(create_model(model, num_classes=NUM_CLASSES, width=width).blocks)


def export_options(model: str, width: float, k: int, batch: int, out: Path):
    from spfde_edge.export import ExportOptions

    return ExportOptions(model=model, width=width, stages=str(k), batch_size=batch, input_size=INPUT_SIZE,
                         num_classes=NUM_CLASSES, out=str(out), force=True)


STEP_GRAPH_BACKEND = "onnxruntime"  # device_runner.backends.STEP_GRAPH: the step.onnx backend


def has_step_graph(manifest, out: Path) -> bool:
    """Every stage of the manifest (a device_runner Manifest) lists the step-graph backend and
    its step.onnx is there."""
    for stage in manifest.stages:
        step = stage.suffix.step_graph
        if STEP_GRAPH_BACKEND not in stage.suffix.backends or step is None or not (out / step.model).is_file():
            return False
    return True


def export_timing(bundle: Path) -> dict | None:
    """The export's timing as ensure_bundle recorded it (``<bundle>.export.json``), if any."""
    path = bundle.parent / f"{bundle.name}.export.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_bundle(model: str, width: float, k: int, batch: int, bundle_dir: Path) -> Path:
    """Export stage k of a fresh model once; later runs reuse it when the manifest matches.

    A cached bundle without ``step.onnx`` (exported before the step graph) is exported again.
    """
    from device_runner.errors import BundleError
    from device_runner.manifest import read_manifest

    out = bundle_dir / f"{model}-w{width:g}-k{k}-b{batch}"
    try:
        m = read_manifest(out)
    except BundleError as exc:  # none yet, or one of an older format: export (again)
        m = None
        if out.exists():
            print(f"  {out}: {exc}: exporting again", flush=True)
    if (m is not None and m.model.name == model and float(m.model.width or DEFAULT_WIDTHS[model]) == width
            and [s.stage for s in m.stages] == [k] and m.batch_size == batch):
        if has_step_graph(m, out):
            return out
        print(f"  {out} has no step.onnx (exported before the step graph): exporting again", flush=True)
    from spfde_edge.export import export_bundle

    started = time.perf_counter()
    marks: list[tuple[float, str]] = []  # (seconds since start, log line)
    export_bundle(export_options(model, width, k, batch, out),
                  log=lambda line: marks.append((time.perf_counter() - started, line)))
    total = time.perf_counter() - started
    (bundle_dir / f"{out.name}.npz").unlink(missing_ok=True)  # measure_stage's state of the old export
    timing = {"bundle": out.name, "model": model, "width": width, "k": k, "batch_size": batch,
              "export_s": total, "step_graph_s": step_graph_seconds(marks),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg()}
    (bundle_dir / f"{out.name}.export.json").write_text(json.dumps(timing, indent=1))
    share = "?" if timing["step_graph_s"] is None else f"{timing['step_graph_s']:.0f}"
    print(f"  exported {out} in {total:.0f} s (step.onnx export + check: {share} s)", flush=True)
    return out


def step_graph_seconds(marks: list[tuple[float, str]]) -> float | None:
    """Seconds from the exporter's "standard-ONNX training step" line to the stage's "parity ok"
    line: exporting step.onnx and checking it (against float64 PyTorch and ORT training)."""
    begun = [t for t, line in marks if "standard-ONNX training step" in line]
    done = [t for t, line in marks if "parity ok" in line]
    if not begun or not done or done[-1] < begun[-1]:
        return None
    return done[-1] - begun[-1]


# --- the training backends: two device, one PyTorch -----------------------------------------

class DeviceStep:
    """The device runner's step: ORT train_step (incl. running statistics) + numpy SGD."""

    name = "ort"

    def __init__(self, stage, num_blocks: int, threads: int, lr: float, momentum: float, weight_decay: float):
        self.trainer = self.make_trainer(stage, threads)
        self.lr_of_block = {i: lr for i in range(stage.k, num_blocks)}
        self.momentum, self.weight_decay = momentum, weight_decay
        self.sgd_s: list[float] = []  # seconds of the numpy SGD part of each step
        self.losses: list[float] = []

    @staticmethod
    def make_trainer(stage, threads: int):
        from device_runner.backends.ort_training import SuffixTrainer

        return SuffixTrainer(stage, threads)

    def step(self, features: np.ndarray, labels: np.ndarray) -> float:
        loss, _ = self.trainer.train_step(features, labels)
        started = time.perf_counter()
        self.trainer.sgd_step(self.lr_of_block, self.momentum, self.weight_decay)
        self.sgd_s.append(time.perf_counter() - started)
        self.losses.append(loss)
        return loss

    def state(self) -> dict[str, np.ndarray]:
        """Every checkpoint tensor (parameters, masks, running statistics) by name."""
        return {n: self.trainer.get_parameter(n) for n in self.trainer.parameter_names()}


class StepGraphStep(DeviceStep):
    """The device runner's other backend: ``step.onnx`` on plain onnxruntime + the same numpy SGD."""

    name = "step"

    @staticmethod
    def make_trainer(stage, threads: int):
        from device_runner.backends.onnx_step import StepGraphTrainer

        return StepGraphTrainer(stage, threads)


DEVICE_BACKENDS = {"ort": DeviceStep, "step": StepGraphStep}


class TorchStep:
    """PyTorch eager training of the same suffix: ``weight * mask`` in forward, same SGD."""

    name = "torch"

    def __init__(self, model: str, width: float, k: int, state: dict[str, np.ndarray], masks: dict[str, str],
                 lr: float, momentum: float, weight_decay: float):
        import copy

        import torch
        import torch.nn.functional as F
        from torch import nn

        from spfde_edge.models import create_model

        self.torch, self.F = torch, F
        full = create_model(model, num_classes=NUM_CLASSES, width=width)
        self.suffix = copy.deepcopy(nn.Sequential(*full.blocks[k:])).train()
        own = self.suffix.state_dict()
        loaded = {}
        for name, value in state.items():
            if name in masks:  # the masks become buffers below
                continue
            index, rest = name.split(".", 2)[1:]
            local = f"{int(index) - k}.{rest}"
            if local not in own:
                raise KeyError(f"{name} (as {local}) is not in the PyTorch suffix")
            loaded[local] = torch.from_numpy(np.array(value))
        missing = [n for n in own if n not in loaded and not n.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"the bundle checkpoint lacks {missing[:3]}")
        self.suffix.load_state_dict(loaded, strict=False)
        modules = dict(self.suffix.named_modules())
        for mask_name, weight_name in masks.items():
            index, rest = weight_name.split(".", 2)[1:]
            module = modules[f"{int(index) - k}.{rest.rsplit('.', 1)[0]}"]
            module.register_buffer("weight_mask", torch.from_numpy(np.array(state[mask_name], dtype=np.float32)))
            if isinstance(module, nn.Conv2d):
                module.forward = lambda x, m=module: m._conv_forward(x, m.weight * m.weight_mask, m.bias)
            else:
                module.forward = lambda x, m=module: F.linear(x, m.weight * m.weight_mask, m.bias)
        # The host trainer's optimizer, whose rule the device's SGD step shares (method/sgd.py).
        self.optimizer = torch.optim.SGD(self.suffix.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def step(self, features: np.ndarray, labels: np.ndarray) -> float:
        x, y = self.torch.from_numpy(features), self.torch.from_numpy(labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.suffix(x), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def batch(stage, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Features after a ReLU are non-negative; any values cost the same dense arithmetic.
    features = np.abs(rng.standard_normal((batch_size, *stage.feature_shape))).astype(np.float32)
    return features, rng.integers(0, NUM_CLASSES, batch_size).astype(np.int64)


def time_interleaved(backends: list, features, labels, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each backend; the order alternates every repetition."""
    for backend in backends:
        for _ in range(warmup):
            backend.step(features, labels)
    times = {b.name: [] for b in backends}
    for rep in range(reps):
        for backend in (backends if rep % 2 == 0 else backends[::-1]):
            started = time.perf_counter()
            backend.step(features, labels)
            times[backend.name].append(time.perf_counter() - started)
    return times


# --- peak RSS in a subprocess -------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024


def run_worker(spec: dict) -> dict:
    """One RSS subprocess: load the backend, take the steps, report RSS. No torch for 'ort'/'step'."""
    from device_runner.bundle import load_bundle

    stage = load_bundle(spec["bundle"], verify=False).stages[0]
    features, labels = batch(stage, spec["batch_size"], seed=1)
    if spec["backend"] in DEVICE_BACKENDS:
        backend = DEVICE_BACKENDS[spec["backend"]](stage, spec["num_blocks"], spec["threads"], spec["lr"],
                                                   spec["momentum"], spec["weight_decay"])
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        with np.load(spec["state"]) as saved:
            state = {name: saved[name] for name in saved.files}
        masks = {m: w for m, w in stage.masks}
        backend = TorchStep(spec["model"], spec["width"], stage.k, state, masks, spec["lr"], spec["momentum"],
                            spec["weight_decay"])
    loaded_mb = (_status_kb("VmRSS") or 0) / 1024
    for _ in range(spec["steps"]):
        backend.step(features, labels)
    return {"backend": spec["backend"], "loaded_rss_mb": loaded_mb, "peak_rss_mb": _peak_rss_mb(),
            "torch_imported": "torch" in sys.modules}


def measure_rss(spec: dict) -> dict:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"RSS worker ({spec['backend']}) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- prefix latency -------------------------------------------------------------------------------

def prefix_latency(model: str, width: float, k: int, bundle: Path, stage, threads: int, reps: int) -> dict:
    import torch

    from device_runner.backends.executorch_prefix import ExecuTorchPrefix
    from device_runner.backends.ort_prefix import OrtPrefix
    from spfde_edge.export import load_source
    from spfde_edge.export.prefix import baked_prefix

    batch_size = stage.pte_batch_size
    x = np.random.default_rng(2).standard_normal((batch_size, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    # The fresh model of the export, rebuilt deterministically from the same options.
    source = load_source(export_options(model, width, k, batch_size, bundle))
    torch_prefix = baked_prefix(source.model, source.masks, k)

    class Torch:
        name = "torch"

        def forward(self, inputs):
            with torch.inference_mode():
                return torch_prefix(torch.from_numpy(inputs)).numpy()

    backends = [ExecuTorchPrefix(stage.prefix_pte, batch_size), OrtPrefix(stage.prefix_onnx, threads), Torch()]
    outputs = {b.name: b.forward(x) for b in backends}  # also the warm-up
    reference = outputs["torch"]
    times = {b.name: [] for b in backends}
    for rep in range(reps):
        for b in (backends if rep % 2 == 0 else backends[::-1]):
            started = time.perf_counter()
            b.forward(x)
            times[b.name].append(time.perf_counter() - started)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"model": model, "width": width, "k": k, "batch_size": batch_size,
            "executorch_ms": ms["executorch"], "onnxruntime_ms": ms["onnxruntime"], "torch_ms": ms["torch"],
            "executorch_vs_torch": ms["executorch"] / ms["torch"],
            "onnxruntime_vs_torch": ms["onnxruntime"] / ms["torch"],
            "max_abs_vs_torch": max(float(np.abs(outputs[n] - reference).max())
                                    for n in ("executorch", "onnxruntime")),
            "reps": reps}


# --- the benchmark ----------------------------------------------------------------------------

def machine() -> dict:
    model_name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model_name, "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "load_avg": os.getloadavg(), "python": platform.python_version()}


def measure_stage(args, model: str, width: float, k: int, num_blocks: int, bundle: Path, state_dir: Path) -> dict:
    """Step times at every batch size, RSS per batch size, and the prefix, for one stage."""
    import torch

    from device_runner.bundle import load_bundle

    torch.set_num_threads(args.threads)
    stage = load_bundle(bundle, verify=False).stages[0]
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    step_rows, rss_rows = [], []
    for batch_size in args.batch_sizes:
        # Fresh backends from the same bundle at every batch size: equal starting weights.
        device = DeviceStep(stage, num_blocks, args.threads, **hyper)
        graph = StepGraphStep(stage, num_blocks, args.threads, **hyper)
        state = device.state()
        torch_step = TorchStep(model, width, k, state, dict(stage.masks), **hyper)
        features, labels = batch(stage, batch_size, seed=batch_size)
        loss_ort, loss_step = device.step(features, labels), graph.step(features, labels)
        loss_torch = torch_step.step(features, labels)
        times = time_interleaved([device, graph, torch_step], features, labels, args.reps, args.warmup)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        step_rows.append({
            "model": model, "width": width, "k": k, "trained_blocks": num_blocks - k, "batch_size": batch_size,
            "ort_ms": ms["ort"], "step_ms": ms["step"], "torch_ms": ms["torch"],
            "ratio": ms["ort"] / ms["torch"],             # ORT training / PyTorch
            "step_ratio": ms["step"] / ms["torch"],       # step graph / PyTorch
            "step_vs_ort": ms["step"] / ms["ort"],        # step graph / ORT training
            # The runner's numpy SGD inside each device step (the rest is the ORT session).
            "ort_sgd_ms": 1e3 * statistics.median(device.sgd_s[-args.reps:]),
            "step_sgd_ms": 1e3 * statistics.median(graph.sgd_s[-args.reps:]),
            "ort_samples_per_s": 1e3 * batch_size / ms["ort"], "step_samples_per_s": 1e3 * batch_size / ms["step"],
            "torch_samples_per_s": 1e3 * batch_size / ms["torch"],
            "ort_ms_all": [1e3 * t for t in times["ort"]], "step_ms_all": [1e3 * t for t in times["step"]],
            "torch_ms_all": [1e3 * t for t in times["torch"]],
            # Same weights and batch: the first losses must agree, or the comparison is unfair.
            "first_step_loss": {"ort": loss_ort, "step": loss_step, "torch": loss_torch},
            "first_step_loss_rel": abs(loss_ort - loss_torch) / max(abs(loss_torch), 1e-12),
            "step_first_step_loss_rel": abs(loss_step - loss_torch) / max(abs(loss_torch), 1e-12),
            # The two device backends: same batch, same numpy SGD, so the same loss at every step.
            "step_vs_ort_loss_rel": abs(loss_step - loss_ort) / max(abs(loss_ort), 1e-12),
            "steps_taken": len(device.losses),
            "step_vs_ort_last_loss_rel": abs(graph.losses[-1] - device.losses[-1]) / max(abs(device.losses[-1]), 1e-12),
        })
        del device, graph, torch_step
        print(f"  batch {batch_size}: ort training {ms['ort']:.1f} ms, step graph {ms['step']:.1f} ms, "
              f"torch {ms['torch']:.1f} ms; step/ort loss rel {step_rows[-1]['step_vs_ort_loss_rel']:.1e}",
              flush=True)
        if not args.no_rss:
            state_path = state_dir / f"{bundle.name}.npz"
            if not state_path.is_file():
                np.savez(state_path, **state)
            spec = {"bundle": str(bundle), "model": model, "width": width, "num_blocks": num_blocks,
                    "batch_size": batch_size, "threads": args.threads, "steps": args.rss_steps,
                    "state": str(state_path), **hyper}
            rss = {name: measure_rss({**spec, "backend": name}) for name in ("ort", "step", "torch")}
            ort, step, pt = rss["ort"], rss["step"], rss["torch"]
            rss_rows.append({"model": model, "width": width, "k": k, "batch_size": batch_size,
                             "steps": args.rss_steps,
                             "ort_peak_mb": ort["peak_rss_mb"], "step_peak_mb": step["peak_rss_mb"],
                             "torch_peak_mb": pt["peak_rss_mb"],
                             "ratio": ort["peak_rss_mb"] / pt["peak_rss_mb"],
                             "step_ratio": step["peak_rss_mb"] / pt["peak_rss_mb"],
                             "step_vs_ort": step["peak_rss_mb"] / ort["peak_rss_mb"],
                             "ort_loaded_mb": ort["loaded_rss_mb"], "step_loaded_mb": step["loaded_rss_mb"],
                             "torch_loaded_mb": pt["loaded_rss_mb"],
                             "ort_process_imported_torch": ort["torch_imported"],
                             "step_process_imported_torch": step["torch_imported"]})
    prefix = None if args.no_prefix else prefix_latency(model, width, k, bundle, stage, args.threads,
                                                        args.prefix_reps)
    return {"step": step_rows, "rss": rss_rows, "prefix": prefix}


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else
              f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def tables(result: dict) -> str:
    nan = float("nan")
    parts = ["training step, ms (median); ort = ORT training + numpy SGD, step = step.onnx on plain "
             "onnxruntime + numpy SGD; loss rel = |first-step loss step - ort| / ort",
             format_table(["model", "k", "trained", "batch", "ort ms", "step ms", "torch ms", "ort/torch",
                           "step/torch", "step/ort", "ort sgd", "step sgd", "loss rel"],
                          [[f"{r['model']}x{r['width']:g}", r["k"], r["trained_blocks"], r["batch_size"],
                            r["ort_ms"], r.get("step_ms", nan), r["torch_ms"], r["ratio"], r.get("step_ratio", nan),
                            r.get("step_vs_ort", nan), r.get("ort_sgd_ms", nan), r.get("step_sgd_ms", nan),
                            f"{r.get('step_vs_ort_loss_rel', nan):.1e}"] for r in result["step"]])]
    if result["rss"]:
        parts += ["", f"peak RSS of a process doing the steps, MB (VmHWM); loaded = RSS before the first step",
                  format_table(["model", "k", "batch", "ort MB", "step MB", "torch MB", "ort/torch", "step/torch",
                                "step/ort", "ort loaded", "step loaded", "torch loaded"],
                               [[f"{r['model']}x{r['width']:g}", r["k"], r["batch_size"], r["ort_peak_mb"],
                                 r.get("step_peak_mb", nan), r["torch_peak_mb"], r["ratio"], r.get("step_ratio", nan),
                                 r.get("step_vs_ort", nan), r["ort_loaded_mb"], r.get("step_loaded_mb", nan),
                                 r["torch_loaded_mb"]] for r in result["rss"]])]
    if result.get("exports"):
        parts += ["", "bundle export, s (step graph = exporting + checking step.onnx)",
                  format_table(["bundle", "export s", "step graph s", "load avg"],
                               [[r["bundle"], r["export_s"], r["step_graph_s"] if r["step_graph_s"] is not None
                                 else nan, f"{r['load_avg'][0]:.1f}"] for r in result["exports"]])]
    if result["prefix"]:
        parts += ["", "prefix forward, ms (median), at the .pte's batch",
                  format_table(["model", "k", "batch", "executorch", "onnxruntime", "torch", "et/torch",
                                "ort/torch"],
                               [[f"{r['model']}x{r['width']:g}", r["k"], r["batch_size"], r["executorch_ms"],
                                 r["onnxruntime_ms"], r["torch_ms"], r["executorch_vs_torch"],
                                 r["onnxruntime_vs_torch"]] for r in result["prefix"]])]
    return "\n".join(parts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(json.dumps(result))
        return result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_dir = Path(args.bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"benchmark": "device_step", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python benchmarks/device_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "config": {k: v for k, v in vars(args).items() if k != "worker"}, "machine": machine(),
              "step": [], "rss": [], "prefix": [], "exports": []}
    for model in args.models:
        width = args.widths[model]
        num_blocks = num_blocks_of(model, width)
        for spec in args.splits:
            k = split_point(spec, num_blocks)
            print(f"{model} x{width:g}: stage {k} of {num_blocks} blocks", flush=True)
            bundle = ensure_bundle(model, width, k, args.export_batch, bundle_dir)
            timing = export_timing(bundle)
            if timing:
                result["exports"].append(timing)
            part = measure_stage(args, model, width, k, num_blocks, bundle, bundle_dir)
            result["step"] += part["step"]
            result["rss"] += part["rss"]
            if part["prefix"]:
                result["prefix"].append(part["prefix"])
            (out / "results.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
