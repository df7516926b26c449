"""report.json, the summary table printed at the end, and ``report --html`` with plots."""
from __future__ import annotations

import html
import json
import platform
from pathlib import Path

from .files import atomic_write_text
from .errors import RunError
from .stage_stats import summarise_stages


def build_report(runner) -> dict:
    from . import __version__
    import onnxruntime

    stages = summarise_stages(runner.stage_profiles, runner.meter.measured)
    pipeline = runner.pipeline
    final = runner.history[-1] if runner.history else None
    saved = sum(s["cache"]["saved_s"] or 0.0 for s in stages)
    compute = sum((s["samples"] / s["samples_per_s"]) for s in stages if s["samples_per_s"])
    return {
        "status": runner.status,
        "config": runner.config.to_dict(),
        "profile": runner.profile.to_dict(),
        "bundle": {"root": str(runner.bundle.root), "model": runner.bundle.model_name,
                   "stages": [s.k for s in runner.bundle.stages], "batch_size": runner.bundle.manifest.batch_size,
                   "signature": runner.bundle.signature},
        "backends": {"prefix": pipeline.prefix.name if pipeline is not None else None,
                     "prefix_choice": pipeline.prefix_choice if pipeline is not None else None,
                     # per frozen segment: float32 or int8, why, held-out top-1 both ways
                     "prefix_precisions": pipeline.precisions if pipeline is not None else [],
                     "suffix": f"{runner.trainer.name if runner.trainer else None}, SGD with momentum in numpy",
                     "suffix_choice": getattr(runner, "suffix_choice", None),
                     "onnxruntime": onnxruntime.__version__},
        "data": {"source": runner.data.source, "samples": len(runner.data), "train": int(runner.train_idx.size),
                 "val": int(runner.val_idx.size), "skipped_unreadable": len(runner.data.skipped),
                 "skipped_examples": runner.data.skipped[:10]},
        "schedule": {"stage_starts": runner.starts, "delta_tau": runner.delta_tau,
                     "base_lr": runner.schedule.base_lr, "lr_scale": runner.lr_scale,
                     "plan_epochs": {"start": runner.schedule.plan.clock.start,
                                     "per_device_epoch": runner.schedule.plan.clock.scale,
                                     "end": runner.schedule.plan.end_epoch,
                                     "fine_tune": runner.schedule.plan.fine_tune},
                     "dst": runner.algorithm.name,
                     "sieve_removed_fraction": runner.sieve.removed_fraction},
        "plan": runner.plan,
        "accuracy": {"before": runner.initial_eval["val_acc"] if runner.initial_eval else None,
                     "after": final["val_acc"] if final else None},
        "epochs_done": runner.epoch,
        "peak_rss_mb": round(runner.global_peak_mb, 1),
        "memory_budget_mb": runner.profile.memory_mb,
        "energy": {"joules": round(runner.meter.joules, 3), "budget_j": runner.profile.energy_j,
                   "source": runner.meter.source, "measured": runner.meter.measured},
        "cache": {"location": pipeline.cache.location if pipeline is not None else None,
                  "dtype": pipeline.cache.dtype if pipeline is not None else None,
                  "samples_cached": pipeline.cache.samples_cached if pipeline is not None else 0,
                  "saved_s": round(saved, 3),
                  "speedup": (compute + saved) / compute if compute and saved else None},
        "stages": stages,
        "history": runner.history,
        "events": runner.events,
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "device_runner": __version__},
    }


def write_report(out: Path, report: dict) -> None:
    atomic_write_text(Path(out) / "report.json", json.dumps(report, indent=2) + "\n")


_REPORT_KEYS = frozenset({"status", "epochs_done", "bundle", "backends", "accuracy", "data", "stages",
                          "energy", "cache", "events", "history", "peak_rss_mb", "memory_budget_mb"})


def load_report(out: Path) -> dict:
    path = Path(out) / "report.json"
    if not path.is_file():
        raise RunError(f"{out} has no report.json; run or resume it first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}); copy it "
                       "again from the device, or resume an unfinished run to write it anew") from None
    missing = sorted(_REPORT_KEYS - report.keys()) if isinstance(report, dict) else ["every field"]
    if missing:
        raise RunError(f"{path} is not a device_runner report (it lacks {', '.join(missing[:4])}); "
                       "give the run folder that python -m device_runner wrote")
    return report


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict, evaluation: dict | None = None) -> str:
    """The terminal summary; ``evaluation`` (the run's latest ``evaluate``) adds what the
    trained model scores on that data."""
    lines = [f"run: {report['status']}, {report['epochs_done']} epoch(s), model {report['bundle']['model']}, "
             f"prefix on {report['backends']['prefix']}, suffix on {report['backends']['suffix']}",
             f"accuracy (held-out {report['data']['val']} samples): before {_fmt(report['accuracy']['before'], '.4f')}"
             f" -> after {_fmt(report['accuracy']['after'], '.4f')}",
             *([f"evaluate {evaluation['name']} ({evaluation['data']}): top-1 {evaluation['top1']:.4f}, "
                f"top-{evaluation['top5_k']} {evaluation['top5']:.4f} on {evaluation['images']} images"]
               if evaluation else []),
             f"peak RSS {report['peak_rss_mb']:.0f} MB of {report['memory_budget_mb']:.0f} MB budget; energy "
             f"{report['energy']['joules']:.1f} J ({'measured: ' if report['energy']['measured'] else ''}"
             f"{report['energy']['source']})",
             f"data: {report['data']['source']}, {report['data']['train']} train / {report['data']['val']} val, "
             f"{report['data']['skipped_unreadable']} unreadable skipped"]
    header = (f"{'stage':>5} {'steps':>6} {'batch':>7} {'data p50/p95':>14} {'prefix p50/p95':>15} "
              f"{'train p50/p95':>15} {'opt p50/p95':>13} {'step p50/p95':>15} {'samp/s':>8} "
              f"{'peak MB':>8} {'mJ/samp':>8} {'cache x':>7}")
    lines += ["", "per-stage latency (ms)", header]
    for s in report["stages"]:
        lat = s["latency_ms"]
        pair = lambda p: f"{_fmt(lat[p]['p50'], '.2f')}/{_fmt(lat[p]['p95'], '.2f')}"
        lines.append(f"{s['stage']:>5} {s['steps']:>6} {','.join(map(str, s['batch_sizes'])):>7} "
                     f"{pair('data'):>14} {pair('prefix'):>15} {pair('train'):>15} {pair('optimizer'):>13} "
                     f"{pair('step'):>15} {_fmt(s['samples_per_s']):>8} {s['peak_rss_mb']:>8.0f} "
                     f"{_fmt(s['energy_per_sample_mj'], '.2f'):>8} {_fmt(s['cache']['speedup'], '.2f'):>7}")
    cache = report["cache"]
    stored = f", {cache['dtype']}, {cache.get('samples_cached', 0)} samples" if cache.get("dtype") else ""
    lines.append(f"feature cache ({cache['location']}{stored}): saved {cache['saved_s']:.2f} s, speed-up "
                 f"{_fmt(cache['speedup'], '.2f')}x")
    if report["events"]:
        lines += ["", "events:"] + [f"  epoch {e['epoch']}: [{e['kind']}] {e['message']}" for e in report["events"][-10:]]
    return "\n".join(lines)


def write_html(report: dict, path: Path, evaluation: dict | None = None) -> Path:
    """A page with the table and four plots (needs matplotlib), and the confusion matrix of
    ``evaluation`` (the run's latest ``evaluate``) when given."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RunError("report --html needs matplotlib (pip install matplotlib); the table above "
                       "needs nothing") from exc
    import base64
    import io

    stages = report["stages"]
    history = report["history"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    names = [str(s["stage"]) for s in stages]
    bottom = [0.0] * len(stages)
    for phase in ("data", "prefix", "train", "optimizer"):
        values = [s["latency_ms"][phase]["p50"] or 0.0 for s in stages]
        axes[0, 0].bar(names, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[0, 0].set(title="step latency p50 by phase", xlabel="stage", ylabel="ms")
    axes[0, 0].legend()
    axes[0, 1].bar(names, [s["peak_rss_mb"] for s in stages])
    axes[0, 1].axhline(report["memory_budget_mb"], color="red", linestyle="--", label="budget")
    axes[0, 1].set(title="peak RSS per stage", xlabel="stage", ylabel="MB")
    axes[0, 1].legend()
    epochs = [h["epoch"] for h in history]
    axes[1, 0].plot([0] + epochs, [report["accuracy"]["before"]] + [h["val_acc"] for h in history], marker="o")
    axes[1, 0].set(title="held-out accuracy", xlabel="epoch", ylabel="accuracy")
    axes[1, 1].plot(epochs, [h["energy_j"] for h in history], marker="o")
    axes[1, 1].set(title="energy" + ("" if report["energy"]["measured"] else " (estimate)"),
                   xlabel="epoch", ylabel="J")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    page = (f"<!doctype html><meta charset='utf-8'><title>device_runner report</title>"
            f"<h1>device_runner: {html.escape(report['bundle']['model'])}</h1>"
            f"<pre>{html.escape(table(report))}</pre><img src='data:image/png;base64,{image}'>")
    if evaluation is not None:
        page += _confusion_html(evaluation, plt)
    path.write_text(page)
    return path


def _confusion_html(evaluation: dict, plt) -> str:
    """The evaluation's confusion matrix (rows: true class, columns: predicted) as a heading and image."""
    import base64
    import io

    import numpy as np

    classes, matrix = evaluation["confusion"]["classes"], np.asarray(evaluation["confusion"]["matrix"])
    size = min(12.0, 3.0 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true class",
           title=f"{evaluation['name']}: top-1 {evaluation['top1']:.4f} on {evaluation['images']} images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    return (f"<h2>evaluate: {html.escape(evaluation['name'])}</h2><p>{html.escape(evaluation['data'])}: "
            f"top-1 {evaluation['top1']:.4f}, top-{evaluation['top5_k']} {evaluation['top5']:.4f}</p>"
            f"<img src='data:image/png;base64,{image}'>")
