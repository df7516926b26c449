"""Device-side training step against PyTorch, on the same CPU threads.

For each model and split point k (stage k: blocks [0, k) frozen) the model is exported once
per bundle format of ``--formats`` with ``spfde_edge.export`` (cached under ``--bundle-dir``):
format 1 with the single stage k, format 2 (one weight store + per-block programs, every
block boundary a stage) once per model and reused for every k. Then:

* **step**: one training step (forward + backward + SGD with momentum and weight decay) of
  the suffix on both of the device runner's suffix backends, against PyTorch eager training
  of the same suffix (same weights, masks applied as ``weight * mask``, the same SGD), in one
  process, ``torch.set_num_threads`` = ORT intra-op threads:

  - ``ort``: ``device_runner.backends.ort_training.SuffixTrainer`` (backend
    "onnxruntime-training": ORT on-device training + the runner's numpy SGD);
  - ``step``: ``device_runner.backends.onnx_step.StepGraphTrainer`` (backend "onnxruntime":
    the bundle's ``step.onnx`` on a plain ``InferenceSession`` + the same numpy SGD);

  and format 2's two (each on its own ``ModelState`` of the bundle's weight store):

  - ``chain``: ``device_runner.backends.block_chain.BlockChainTrainer`` (backend "onnxruntime":
    the blocks' train/backward programs one after the other + the same numpy SGD);
  - ``ort2``: ``device_runner.backends.ort_boundary.OrtBoundaryTrainer`` (backend
    "onnxruntime-training": boundary k's weightless ORT training artifacts + the same SGD).

  Repetitions alternate the order of all of them; the median of each is reported, with the
  ratios ort/torch, step/torch and step/ort (format 2: chain/step and ort2/ort, format 2 vs 1
  on the same runtime, and chain/torch, ort2/torch), and the relative difference of the
  first-step losses on the same batch: same model, weights and masks, so the device backends
  must agree to ~1e-6 (step vs ort, chain vs step, ort2 vs ort). A fresh model's loss is
  ~ln(10) whatever its weights, so the first step's logits are compared too (``*_logits_rel``).
  Every row keeps the load average before and after its timing (the CPU may be shared).
* **rss**: peak RSS (VmHWM) of a process per backend (ORT training, step graph, block chain,
  ORT training format 2, PyTorch), each in its own subprocess, doing the same steps; the
  device backends' processes set glibc's allocator as the runner does (``device_runner/allocator.py``).
* **prefix**: forward latency of the frozen prefix on ExecuTorch (the bundle's XNNPACK
  ``.pte``), ONNX Runtime (``prefix.onnx``) and PyTorch eager, at the ``.pte``'s batch.

    python benchmarks/device_step.py                                     # resnet18 + resnet32 (width 2)
    python benchmarks/device_step.py --models resnet32 --batch-sizes 32 --reps 9
    python benchmarks/device_step.py --quick                             # smoke run, < 1 minute
                                                                         # (+ tiny exports on the first run)
    python benchmarks/device_step.py --formats 1                         # format 1 only (ort, step)

Ratios are device / PyTorch (and step graph / ORT training, format 2 / format 1): below 1 the
first is faster or smaller. The prefix latency needs format 1 (its ``.pte``). Format-1 bundles
cached in ``--bundle-dir`` without ``step.onnx`` (exported before the step graph) are exported
again; the export's time, and the step graph's share of it, are kept next to the bundle
(``<bundle>.export.json``) and copied into the results.
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
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet32"],
                   help="model names as spfde_edge.export --model takes them, e.g. torchvision:mobilenet_v3_small "
                        "(default resnet18 resnet32)")
    p.add_argument("--width", nargs="*", default=[], metavar="MODEL=W",
                   help="channel multiplier per model (default resnet18=1 resnet32=2)")
    p.add_argument("--splits", nargs="+", default=["middle", "last-third"],
                   help="split points: middle (k = n//2), last-third (train the last n/3 blocks) or an integer k")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--formats", nargs="+", type=int, default=[1, 2], choices=[1, 2],
                   help="bundle formats to time: 1 = ort + step, 2 = chain + ort2 (default both)")
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
    widths = {model: DEFAULT_WIDTHS.get(model) for model in args.models}   # None: the model's own
    for item in args.width:
        name, _, value = item.partition("=")
        if name not in args.models or not value:
            p.error(f"--width takes MODEL=W with MODEL one of --models, got '{item}'")
        widths[name] = float(value)
    if args.quick:
        args.models, args.splits, args.batch_sizes = ["resnet32"], ["last-third"], [16, 32]
        widths["resnet32"] = 0.25
        args.reps, args.warmup, args.rss_steps, args.prefix_reps, args.export_batch = 3, 1, 2, 3, 16
    if args.bundle_dir is None:
        args.bundle_dir = str(Path(args.out) / "bundles") if args.quick else "export/bench"
    args.widths = widths
    args.formats = sorted(set(args.formats))
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


def width_text(width: float | None) -> str:
    """``0.25``; ``default`` for a model without a width multiplier (torchvision's efficientnet)."""
    return "default" if width is None else f"{width:g}"


def model_label(row: dict) -> str:
    """``resnet32x2``; the bare name for a model at its own width."""
    return row["model"] if row["width"] is None else f"{row['model']}x{row['width']:g}"


def num_blocks_of(model: str, width: float) -> int:
    from spfde_edge.models import create_model

    return len(create_model(model, num_classes=NUM_CLASSES, width=width).blocks)


def export_options(model: str, width: float, k: int, batch: int, out: Path, fmt: int = 1):
    """The same fresh model (seed, sparsity, masks) in either format; format 2 has every stage."""
    from spfde_edge.export import ExportOptions

    return ExportOptions(model=model, width=width, stages=str(k) if fmt == 1 else None, batch_size=batch,
                         input_size=INPUT_SIZE, num_classes=NUM_CLASSES, out=str(out), force=True,
                         bundle_format=fmt)


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


def ensure_bundle(model: str, width: float, k: int, batch: int, bundle_dir: Path, fmt: int = 1) -> Path:
    """Export a fresh model once (format 1: stage k; format 2: every boundary, shared by all k);
    later runs reuse it when the manifest matches.

    A cached format-1 bundle without ``step.onnx`` (exported before the step graph) is exported again.
    """
    from device_runner.errors import BundleError
    from device_runner.manifest import read_manifest

    from spfde_edge.models import folder_name

    tag = f"{folder_name(model)}-w{width_text(width)}"
    out = bundle_dir / (f"{tag}-k{k}-b{batch}" if fmt == 1 else f"{tag}-v2-b{batch}")
    try:
        m = read_manifest(out)
    except BundleError as exc:  # none yet, or one of an older format: export (again)
        m = None
        if out.exists():
            print(f"  {out}: {exc}: exporting again", flush=True)
    if (m is not None and m.format_version == fmt and m.model.name == model
            and (m.model.width or DEFAULT_WIDTHS.get(model)) == width and m.batch_size == batch):
        if fmt == 2:
            return out
        if [s.stage for s in m.stages] == [k]:
            if has_step_graph(m, out):
                return out
            print(f"  {out} has no step.onnx (exported before the step graph): exporting again", flush=True)
    from spfde_edge.export import export_bundle

    print(f"  exporting {out} (format {fmt})", flush=True)
    started = time.perf_counter()
    marks: list[tuple[float, str]] = []  # (seconds since start, log line)
    export_bundle(export_options(model, width, k, batch, out, fmt),
                  log=lambda line: marks.append((time.perf_counter() - started, line)))
    total = time.perf_counter() - started
    timing = {"bundle": out.name, "format": fmt, "model": model, "width": width, "k": k if fmt == 1 else None,
              "batch_size": batch, "export_s": total, "step_graph_s": step_graph_seconds(marks) if fmt == 1 else None,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": list(os.getloadavg())}
    (bundle_dir / f"{out.name}.export.json").write_text(json.dumps(timing, indent=1))
    detail = ""
    if fmt == 1:
        share = "?" if timing["step_graph_s"] is None else f"{timing['step_graph_s']:.0f}"
        detail = f" (step.onnx export + check: {share} s)"
    print(f"  exported {out} in {total:.0f} s{detail}", flush=True)
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
    format = 1  # the bundle format it trains from

    def __init__(self, bundle, k: int, num_blocks: int, threads: int, lr: float, momentum: float,
                 weight_decay: float):
        self.trainer = self.make_trainer(bundle, k, threads)
        self.lr_of_block = {i: lr for i in range(k, num_blocks)}
        self.momentum, self.weight_decay = momentum, weight_decay
        self.sgd_s: list[float] = []  # seconds of the numpy SGD part of each step
        self.losses: list[float] = []
        self.logits: np.ndarray | None = None  # the last step's

    @staticmethod
    def make_trainer(bundle, k: int, threads: int):
        """The trainer of stage k; ``bundle`` is a loaded ``device_runner.bundle.Bundle``."""
        from device_runner.backends.ort_training import SuffixTrainer

        return SuffixTrainer(bundle.stage(k), threads)

    def step(self, features: np.ndarray, labels: np.ndarray) -> float:
        loss, self.logits = self.trainer.train_step(features, labels)
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
    def make_trainer(bundle, k: int, threads: int):
        from device_runner.backends.onnx_step import StepGraphTrainer

        return StepGraphTrainer(bundle.stage(k), threads)


class BlockChainStep(DeviceStep):
    """Format 2 on plain onnxruntime: blocks [k, n)'s train/backward programs + the same numpy SGD."""

    name = "chain"
    format = 2

    @staticmethod
    def make_trainer(bundle, k: int, threads: int):
        from device_runner.backends.block_chain import BlockChainTrainer, BlockSessions
        from device_runner.model_state import ModelState

        state = ModelState.load(bundle.weights_path)  # its own: the trainer updates it in place
        return BlockChainTrainer(bundle.stage(k), bundle.blocks, state, BlockSessions(threads))


class OrtBoundaryStep(DeviceStep):
    """Format 2 on ORT training: boundary k's weightless artifacts + the same numpy SGD."""

    name = "ort2"
    format = 2

    @staticmethod
    def make_trainer(bundle, k: int, threads: int):
        from device_runner.backends.ort_boundary import OrtBoundaryTrainer
        from device_runner.model_state import ModelState

        boundary = {entry.k: entry for entry in bundle.manifest.ort_training}[k]
        # Its own state: the trainer takes over the suffix's arrays (views of ORT's buffers).
        state = ModelState.load(bundle.weights_path)
        return OrtBoundaryTrainer(bundle.stage(k), boundary, bundle.root, state, threads)


DEVICE_BACKENDS = {b.name: b for b in (DeviceStep, StepGraphStep, BlockChainStep, OrtBoundaryStep)}


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
        logits = self.suffix(x)
        loss = self.F.cross_entropy(logits, y)
        loss.backward()
        self.optimizer.step()
        self.logits = logits.detach().numpy()
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
    """One RSS subprocess: load the backend, take the steps, report RSS. No torch for the device
    backends. ``spec["bundle"]``: the bundle of the backend's format (torch: the one its state came from)."""
    from device_runner.bundle import load_bundle

    bundle = load_bundle(spec["bundle"], verify=False)
    stage = bundle.stage(spec["k"])
    features, labels = batch(stage, spec["batch_size"], seed=1)
    if spec["backend"] in DEVICE_BACKENDS:
        from device_runner.allocator import return_large_frees

        return_large_frees()            # as device_runner's Runner sets it (device_runner/allocator.py)
        backend = DEVICE_BACKENDS[spec["backend"]](bundle, spec["k"], spec["num_blocks"], spec["threads"],
                                                   spec["lr"], spec["momentum"], spec["weight_decay"])
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
            "load_avg": list(os.getloadavg()), "python": platform.python_version()}


# (a, b): a / b in step time and RSS, and |loss a - loss b| / |loss b| at the first and the last step.
# Same weights, batch and numpy SGD: the device backends must give the same loss at every step.
FORMAT_PAIRS = [("chain", "step"), ("ort2", "ort")]   # format 2 / format 1, on the same runtime
DEVICE_PAIRS = [("step", "ort"), ("ort2", "chain"), *FORMAT_PAIRS]  # + the two runtimes, within a format


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def logits_rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: a fresh model's loss is ~ln(10) whatever its weights, its logits are not."""
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def vs_torch_key(name: str) -> str:
    """``ort``'s columns against PyTorch predate the others: ``ratio``, not ``ort_ratio``."""
    return "ratio" if name == "ort" else f"{name}_ratio"


def measure_stage(args, model: str, width: float, k: int, num_blocks: int, bundles: dict[int, Path],
                  state_dir: Path) -> dict:
    """Step times at every batch size, RSS per batch size, and the prefix, for one stage.
    ``bundles``: the bundle of each format in ``args.formats``."""
    import torch

    from device_runner.bundle import load_bundle

    torch.set_num_threads(args.threads)
    loaded = {fmt: load_bundle(path, verify=False) for fmt, path in bundles.items()}
    names = [name for name, backend in DEVICE_BACKENDS.items() if backend.format in loaded]
    reference = min(loaded)  # PyTorch starts from the weights of this format's first backend
    stage = loaded[reference].stage(k)
    shapes = {fmt: b.stage(k).feature_shape for fmt, b in loaded.items()}
    if len(set(shapes.values())) > 1:
        raise SystemExit(f"error: stage {k}'s features differ between the formats: {shapes}")
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    step_rows, rss_rows = [], []
    for batch_size in args.batch_sizes:
        # Fresh backends from the same bundles at every batch size: equal starting weights.
        device = {name: DEVICE_BACKENDS[name](loaded[DEVICE_BACKENDS[name].format], k, num_blocks, args.threads,
                                              **hyper) for name in names}
        state = device[names[0]].state()
        torch_step = TorchStep(model, width, k, state, dict(stage.masks), **hyper)
        features, labels = batch(stage, batch_size, seed=batch_size)
        # Same weights and batch: the first losses must agree, or the comparison is unfair.
        first = {name: backend.step(features, labels) for name, backend in device.items()}
        first["torch"] = torch_step.step(features, labels)
        first_logits = {name: b.logits for name, b in [*device.items(), ("torch", torch_step)]}
        load_before = list(os.getloadavg())
        times = time_interleaved([*device.values(), torch_step], features, labels, args.reps, args.warmup)
        load_after = list(os.getloadavg())
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        row = {"model": model, "width": width, "k": k, "trained_blocks": num_blocks - k, "batch_size": batch_size,
               "formats": sorted(loaded), "torch_ms": ms["torch"],
               "torch_samples_per_s": 1e3 * batch_size / ms["torch"],
               "torch_ms_all": [1e3 * t for t in times["torch"]], "first_step_loss": first,
               "steps_taken": len(device[names[0]].losses),
               "load_avg_before": load_before, "load_avg_after": load_after}
        for name, backend in device.items():
            row[f"{name}_ms"] = ms[name]
            row[vs_torch_key(name)] = ms[name] / ms["torch"]
            # The runner's numpy SGD inside each device step (the rest is the ORT sessions).
            row[f"{name}_sgd_ms"] = 1e3 * statistics.median(backend.sgd_s[-args.reps:])
            row[f"{name}_samples_per_s"] = 1e3 * batch_size / ms[name]
            row[f"{name}_ms_all"] = [1e3 * t for t in times[name]]
            loss_vs_torch = "first_step_loss_rel" if name == "ort" else f"{name}_first_step_loss_rel"
            row[loss_vs_torch] = rel_diff(first[name], first["torch"])
            row[f"{name}_vs_torch_logits_rel"] = logits_rel(first_logits[name], first_logits["torch"])
        for a, b in DEVICE_PAIRS:
            if a in device and b in device:
                row[f"{a}_vs_{b}"] = ms[a] / ms[b]
                row[f"{a}_vs_{b}_loss_rel"] = rel_diff(first[a], first[b])
                row[f"{a}_vs_{b}_logits_rel"] = logits_rel(first_logits[a], first_logits[b])
                row[f"{a}_vs_{b}_last_loss_rel"] = rel_diff(device[a].losses[-1], device[b].losses[-1])
        step_rows.append(row)
        del device, torch_step
        timed = ", ".join(f"{name} {ms[name]:.1f}" for name in [*names, "torch"])
        agree = ", ".join(f"{a}/{b} {row[f'{a}_vs_{b}_loss_rel']:.1e} ({row[f'{a}_vs_{b}_logits_rel']:.1e})"
                          for a, b in DEVICE_PAIRS if f"{a}_vs_{b}_loss_rel" in row)
        print(f"  batch {batch_size}: {timed} ms; first-step loss rel (logits rel) {agree}; "
              f"load {load_before[0]:.2f} -> {load_after[0]:.2f}", flush=True)
        if not args.no_rss:
            state_path = state_dir / f"{bundles[reference].name}-k{k}.npz"  # PyTorch's starting state
            np.savez(state_path, **state)
            spec = {"k": k, "model": model, "width": width, "num_blocks": num_blocks, "batch_size": batch_size,
                    "threads": args.threads, "steps": args.rss_steps, "state": str(state_path), **hyper}
            rss_load_before = list(os.getloadavg())
            rss = {name: measure_rss({**spec, "backend": name, "bundle": str(bundles[DEVICE_BACKENDS[name].format])})
                   for name in names}
            rss["torch"] = measure_rss({**spec, "backend": "torch", "bundle": str(bundles[reference])})
            rss_row = {"model": model, "width": width, "k": k, "batch_size": batch_size, "steps": args.rss_steps,
                       "torch_peak_mb": rss["torch"]["peak_rss_mb"], "torch_loaded_mb": rss["torch"]["loaded_rss_mb"],
                       "load_avg_before": rss_load_before, "load_avg_after": list(os.getloadavg())}
            for name in names:
                rss_row[f"{name}_peak_mb"] = rss[name]["peak_rss_mb"]
                rss_row[vs_torch_key(name)] = rss[name]["peak_rss_mb"] / rss["torch"]["peak_rss_mb"]
                rss_row[f"{name}_loaded_mb"] = rss[name]["loaded_rss_mb"]
                rss_row[f"{name}_process_imported_torch"] = rss[name]["torch_imported"]
            for a, b in DEVICE_PAIRS:
                if a in rss and b in rss:
                    rss_row[f"{a}_vs_{b}"] = rss[a]["peak_rss_mb"] / rss[b]["peak_rss_mb"]
            rss_rows.append(rss_row)
    prefix = None
    if not args.no_prefix and 1 in bundles:  # the prefix's .pte is format 1's
        prefix = prefix_latency(model, width, k, bundles[1], loaded[1].stage(k), args.threads, args.prefix_reps)
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
    steps = [r for r in result["step"] if "ort_ms" in r]      # format 1 timed
    steps2 = [r for r in result["step"] if "chain_ms" in r]   # format 2 timed
    rss = [r for r in result["rss"] if "ort_peak_mb" in r]
    rss2 = [r for r in result["rss"] if "chain_peak_mb" in r]
    parts = []
    if steps:
        parts += ["training step, ms (median); ort = ORT training + numpy SGD, step = step.onnx on plain "
                  "onnxruntime + numpy SGD; loss rel = |first-step loss step - ort| / ort; load = 1-min "
                  "load average before>after the timing",
                  format_table(["model", "k", "trained", "batch", "ort ms", "step ms", "torch ms", "ort/torch",
                                "step/torch", "step/ort", "ort sgd", "step sgd", "loss rel", "load"],
                               [[model_label(r), r["k"], r["trained_blocks"], r["batch_size"],
                                 r["ort_ms"], r.get("step_ms", nan), r["torch_ms"], r["ratio"], r.get("step_ratio", nan),
                                 r.get("step_vs_ort", nan), r.get("ort_sgd_ms", nan), r.get("step_sgd_ms", nan),
                                 f"{r.get('step_vs_ort_loss_rel', nan):.1e}", _load(r)] for r in steps])]
    if steps2:
        parts += [""] * bool(parts) + [
                  "format 2, training step, ms (median), timed interleaved with the above; chain = block "
                  "programs on plain onnxruntime, ort2 = ORT training on boundary k's artifacts (both + numpy "
                  "SGD); chain-step, ort2-ort = |first-step loss, format 2 - format 1| / format 1 on the same runtime; "
                  "logits = the larger of the two first-step logits' ||format 2 - format 1|| / ||format 1||",
                  format_table(["model", "k", "batch", "chain ms", "ort2 ms", "torch ms", "chain/step", "ort2/ort",
                                "chain/torch", "ort2/torch", "chain sgd", "ort2 sgd", "chain-step", "ort2-ort",
                                "logits", "load"],
                               [[model_label(r), r["k"], r["batch_size"], r["chain_ms"],
                                 r.get("ort2_ms", nan), r["torch_ms"], r.get("chain_vs_step", nan),
                                 r.get("ort2_vs_ort", nan), r["chain_ratio"], r.get("ort2_ratio", nan),
                                 r["chain_sgd_ms"], r.get("ort2_sgd_ms", nan),
                                 f"{r.get('chain_vs_step_loss_rel', nan):.1e}",
                                 f"{r.get('ort2_vs_ort_loss_rel', nan):.1e}",
                                 f"{_worst(r, [f'{a}_vs_{b}_logits_rel' for a, b in FORMAT_PAIRS]):.1e}",
                                 _load(r)] for r in steps2])]
    if rss:
        parts += ["", f"peak RSS of a process doing the steps, MB (VmHWM); loaded = RSS before the first step",
                  format_table(["model", "k", "batch", "ort MB", "step MB", "torch MB", "ort/torch", "step/torch",
                                "step/ort", "ort loaded", "step loaded", "torch loaded"],
                               [[model_label(r), r["k"], r["batch_size"], r["ort_peak_mb"],
                                 r.get("step_peak_mb", nan), r["torch_peak_mb"], r["ratio"], r.get("step_ratio", nan),
                                 r.get("step_vs_ort", nan), r["ort_loaded_mb"], r.get("step_loaded_mb", nan),
                                 r["torch_loaded_mb"]] for r in rss])]
    if rss2:
        parts += ["", "format 2, peak RSS, MB (VmHWM); its processes load the whole weight store (prefix too)",
                  format_table(["model", "k", "batch", "chain MB", "ort2 MB", "torch MB", "chain/step", "ort2/ort",
                                "chain/torch", "ort2/torch", "chain loaded", "ort2 loaded", "load"],
                               [[model_label(r), r["k"], r["batch_size"], r["chain_peak_mb"],
                                 r.get("ort2_peak_mb", nan), r["torch_peak_mb"], r.get("chain_vs_step", nan),
                                 r.get("ort2_vs_ort", nan), r["chain_ratio"], r.get("ort2_ratio", nan),
                                 r["chain_loaded_mb"], r.get("ort2_loaded_mb", nan), _load(r)] for r in rss2])]
    if result.get("exports"):
        parts += ["", "bundle export, s (step graph = exporting + checking step.onnx)",
                  format_table(["bundle", "export s", "step graph s", "load avg"],
                               [[r["bundle"], r["export_s"], r["step_graph_s"] if r["step_graph_s"] is not None
                                 else nan, f"{r['load_avg'][0]:.1f}"] for r in result["exports"]])]
    if result["prefix"]:
        parts += ["", "prefix forward, ms (median), at the .pte's batch",
                  format_table(["model", "k", "batch", "executorch", "onnxruntime", "torch", "et/torch",
                                "ort/torch"],
                               [[model_label(r), r["k"], r["batch_size"], r["executorch_ms"],
                                 r["onnxruntime_ms"], r["torch_ms"], r["executorch_vs_torch"],
                                 r["onnxruntime_vs_torch"]] for r in result["prefix"]])]
    return "\n".join(parts)


def _worst(row: dict, keys: list[str]) -> float:
    """The largest of ``row``'s values at ``keys`` (nan when it has none of them)."""
    return max((row[key] for key in keys if key in row), default=float("nan"))


def _load(row: dict) -> str:
    """The 1-minute load average before -> after a row's measurement."""
    if "load_avg_before" not in row:
        return "?"
    return f"{row['load_avg_before'][0]:.2f}>{row['load_avg_after'][0]:.2f}"


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
            print(f"{model} x{width_text(width)}: stage {k} of {num_blocks} blocks", flush=True)
            bundles = {fmt: ensure_bundle(model, width, k, args.export_batch, bundle_dir, fmt)
                       for fmt in args.formats}
            for bundle in bundles.values():
                timing = export_timing(bundle)
                if timing and timing not in result["exports"]:  # format 2's: one for every k
                    result["exports"].append(timing)
            part = measure_stage(args, model, width, k, num_blocks, bundles, bundle_dir)
            result["step"] += part["step"]
            result["rss"] += part["rss"]
            if part["prefix"]:
                result["prefix"].append(part["prefix"])
            (out / "results.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = tables(result)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'} and table.txt ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
