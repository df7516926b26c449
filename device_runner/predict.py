"""``python -m device_runner predict RUN IMAGE_OR_FOLDER``: label, probability and latency per image.

Each image is read with Pillow, converted to RGB and resized to the bundle's input size as
the runner's own data is, then run alone (batch 1): the latency is what one image costs,
from normalisation to logits. The first image is run once untimed first (session warm-up).
A folder is searched recursively; unreadable files are skipped and listed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .data import IMAGE_EXTENSIONS, _resize  # the runner's resize, so inputs match training
from .errors import DataError
from .trained_model import TrainedModel


def image_files(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    raise DataError(f"{target} is neither an image nor a folder; give an image file or a folder of images")


def read_image(file: Path, size: int) -> np.ndarray:
    """uint8 ``[3, size, size]``; DataError when Pillow cannot decode it."""
    try:
        with Image.open(file) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{file} is not a readable image ({type(exc).__name__})") from None
    return _resize(np.asarray(rgb), size)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def predict(run: str | Path, target: str | Path, top_k: int = 3, threads: int | None = None,
            model: TrainedModel | None = None) -> dict:
    """One row per readable image under ``target``: its ``top_k`` labels by probability and latency."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    target = Path(target)
    files = image_files(target)
    model = model or TrainedModel(run, threads)
    k = min(top_k, len(model.classes))
    images, names, skipped = [], [], []
    for file in files:
        name = file.name if file == target else str(file.relative_to(target))
        try:
            images.append(read_image(file, model.input_size))
            names.append(name)
        except DataError:
            if file == target:
                raise  # one image asked for: say why it cannot be read
            skipped.append(name)
    if not images:
        raise DataError(f"no readable images in {target} ({len(skipped)} unreadable); "
                        f"supported: {', '.join(IMAGE_EXTENSIONS)}")
    model.logits(images[0][None])  # warm-up: first-run allocations are not an image's latency
    rows = []
    for name, image in zip(names, images):
        started = time.perf_counter()
        logits = model.logits(image[None])[0]
        latency_ms = (time.perf_counter() - started) * 1e3
        prob = softmax(logits)
        order = np.argsort(-prob, kind="stable")[:k]
        top = [{"label": model.classes[c], "index": int(c), "probability": float(prob[c])} for c in order]
        rows.append({"image": name, "label": top[0]["label"], "probability": top[0]["probability"],
                     "top": top, "latency_ms": latency_ms})
    latencies = np.array([r["latency_ms"] for r in rows])
    return {"run": str(model.run), "model": model.describe(), "top_k": k, "predictions": rows,
            "skipped_unreadable": skipped,
            "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))}}


def table(result: dict) -> str:
    lines = [f"model: {result['model']}"]
    width = max(len(r["image"]) for r in result["predictions"])
    for row in result["predictions"]:
        others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top"][1:])
        lines.append(f"{row['image']:<{width}}  {row['label']} {row['probability']:.3f}"
                     f"{'  (' + others + ')' if others else ''}  {row['latency_ms']:.2f} ms")
    lat = result["latency_ms"]
    lines.append(f"{len(result['predictions'])} image(s), latency p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms"
                 + (f"; {len(result['skipped_unreadable'])} unreadable skipped" if result["skipped_unreadable"] else ""))
    return "\n".join(lines)
