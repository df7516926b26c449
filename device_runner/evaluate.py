"""``python -m device_runner evaluate RUN``: how good the device-trained model is, on any labelled images.

Top-1, top-5, mean cross-entropy, per-class accuracy and the confusion matrix (rows: true
class, columns: predicted, both in the bundle's class order), with images/s of the forward
passes and the process's peak RSS. Data: ``--data digits``, ``--data imagefolder:PATH``
(class sub-folders matched to the bundle's class names *by name*), or nothing for the run's
own held-out split. The result goes to ``RUN/evaluate-<name>.json`` (atomic), which
``report --html`` draws.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import budget
from .data import DeviceData, load_digits, load_imagefolder
from .errors import DataError, RunError
from .files import atomic_write_json

if TYPE_CHECKING:  # report --html reads evaluations without loading ONNX Runtime
    from .trained_model import TrainedModel

HELD_OUT = "held-out"
PREFIX = "evaluate-"


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1 (argmax, as the runner scores its held-out split), top-5, mean cross-entropy,
    per-class accuracy of every class present and the full confusion matrix."""
    n, num_classes = logits.shape
    k = min(5, num_classes)
    # A stable sort ranks tied logits by class index, as argmax does, so top-1 is topk[:, 0].
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    predicted = topk[:, 0]
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = []
    for c in np.flatnonzero(confusion.sum(axis=1)):
        images, correct = int(confusion[c].sum()), int(confusion[c, c])
        per_class.append({"class": classes[c], "index": int(c), "images": images, "correct": correct,
                          "accuracy": correct / images})
    return {"images": int(n), "top1": float((predicted == labels).mean()),
            "top5": float((topk == labels[:, None]).any(axis=1).mean()), "top5_k": k,
            "loss": float(-log_prob[np.arange(n), labels].mean()),
            "per_class": per_class, "confusion": {"classes": list(classes), "matrix": confusion.tolist()}}


def load_eval_data(spec: str, model: TrainedModel) -> DeviceData:
    """Labelled images for ``spec``; an image folder's class sub-folders must carry the
    bundle's class names (no guessing by position, unlike training on a fresh bundle)."""
    if spec == "digits":
        return load_digits(model.input_size, model.classes)
    if not spec.startswith("imagefolder:"):
        raise DataError(f"unknown --data '{spec}'; use digits or imagefolder:PATH")
    root = Path(spec.split(":", 1)[1]).expanduser()
    if root.is_dir():
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [f for f in folders if f not in model.classes]
        if unknown:
            shown = ", ".join(model.classes[:10]) + ("…" if len(model.classes) > 10 else "")
            raise DataError(f"class folder(s) {', '.join(unknown[:5])} of {root} are not classes of the "
                            f"model (it knows {shown}); rename or remove them")
    return load_imagefolder(root, model.input_size, model.classes)


def evaluation_name(spec: str | None) -> str:
    """``held-out``, ``digits`` or the image folder's name, safe as part of a file name."""
    if spec is None:
        return HELD_OUT
    if spec.startswith("imagefolder:"):
        spec = Path(spec.split(":", 1)[1].rstrip("/")).expanduser().name or "images"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def evaluate(run: str | Path, data: str | None = None, threads: int | None = None, save: bool = True,
             name: str | None = None, model: TrainedModel | None = None) -> dict:
    """Evaluate RUN's model on ``data`` (default: the run's held-out split); write
    ``RUN/evaluate-<name>.json`` unless ``save`` is False. Returns the result."""
    from .trained_model import TrainedModel

    model = model or TrainedModel(run, threads)
    images = model.held_out() if data is None else load_eval_data(data, model)
    started = time.perf_counter()
    logits = model.logits(images.images)
    forward_s = time.perf_counter() - started
    result = {
        "name": name or evaluation_name(data), "run": str(model.run), "model": model.describe(),
        "checkpoint": {"epoch": model.epoch, "mid_epoch": model.mid_epoch, "status": model.status,
                       "stage": model.stage_k},
        "data": images.source, "skipped_unreadable": len(images.skipped),
        **classification_metrics(logits, images.labels, model.classes),
        "images_per_s": len(images) / forward_s if forward_s > 0 else None,
        "peak_rss_mb": round(budget.peak_rss_mb(), 1), "time": time.time(),
    }
    if save:
        path = Path(run) / f"{PREFIX}{result['name']}.json"
        try:
            atomic_write_json(path, result)
        except OSError as exc:
            raise RunError(f"cannot write {path} ({exc.strerror or exc}); use --no-save to print only") from None
        result["saved"] = str(path)
    return result


def latest_evaluation(run: str | Path) -> dict | None:
    """The newest ``RUN/evaluate-*.json`` (by its recorded time), or None."""
    found = []
    for path in Path(run).glob(f"{PREFIX}*.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a foreign or damaged file is not an evaluation to draw
    found = [f for f in found if isinstance(f, dict) and "confusion" in f and "time" in f]
    return max(found, key=lambda f: f["time"]) if found else None


def table(result: dict) -> str:
    lines = [f"model: {result['model']}",
             f"data: {result['data']}: {result['images']} images ({result['skipped_unreadable']} unreadable skipped)",
             f"top-1 {result['top1']:.4f}  top-{result['top5_k']} {result['top5']:.4f}  loss {result['loss']:.4f}",
             f"{result['images_per_s']:.1f} images/s, peak RSS {result['peak_rss_mb']:.0f} MB",
             "", f"{'class':>12} {'images':>7} {'correct':>8} {'accuracy':>9}"]
    lines += [f"{c['class'][:12]:>12} {c['images']:>7} {c['correct']:>8} {c['accuracy']:>9.4f}"
              for c in result["per_class"]]
    if "saved" in result:
        lines += ["", f"wrote {result['saved']}"]
    return "\n".join(lines)
