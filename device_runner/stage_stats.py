"""Per-stage step statistics: recorded by the loop each step, summarised into report.json.

A ``StageProfile`` is part of the checkpoint (``asdict`` in, ``StageProfile(**d)`` out),
so its field names are checkpoint format.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHASES = ("data", "prefix", "train", "optimizer")


@dataclass
class StageProfile:
    """Per-step timings of one stage; summarised into report.json."""

    k: int
    times: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    batch_sizes: list = field(default_factory=list)
    cache_hits: list = field(default_factory=list)   # samples served by the cache per step
    peak_rss_mb: float = 0.0
    energy_j: float = 0.0
    samples: int = 0
    wall_s: float = 0.0


def _percentile(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _ms(seconds):
    return None if seconds is None else round(1e3 * seconds, 3)


def summarise_stage(stage: StageProfile, measured_energy: bool) -> dict:
    steps = len(stage.batch_sizes)
    total = np.sum([stage.times[p] for p in PHASES], axis=0) if steps else np.zeros(0)
    batch = np.asarray(stage.batch_sizes, dtype=float)
    hits = np.asarray(stage.cache_hits, dtype=float)
    prefix = np.asarray(stage.times["prefix"])
    miss_rows = hits < batch if steps else np.zeros(0, bool)
    hit_rows = hits == batch if steps else np.zeros(0, bool)
    miss_per_sample = float(prefix[miss_rows].sum() / (batch[miss_rows] - hits[miss_rows]).sum()) \
        if miss_rows.any() else None
    hit_per_sample = float(prefix[hit_rows].sum() / batch[hit_rows].sum()) if hit_rows.any() else None
    saved_s = None
    if miss_per_sample is not None and hits.sum():
        served_time = float(prefix[hit_rows].sum())
        saved_s = max(0.0, float(hits.sum()) * miss_per_sample - served_time)
    compute_s = float(total.sum())
    return {
        "stage": stage.k, "steps": steps, "samples": stage.samples,
        "latency_ms": {p: {"p50": _ms(_percentile(stage.times[p], 50)), "p95": _ms(_percentile(stage.times[p], 95))}
                       for p in PHASES} | {"step": {"p50": _ms(_percentile(total, 50)),
                                                    "p95": _ms(_percentile(total, 95))}},
        "samples_per_s": stage.samples / compute_s if compute_s else None,
        "peak_rss_mb": round(stage.peak_rss_mb, 1),
        "energy_j": round(stage.energy_j, 3),
        "energy_per_sample_mj": 1e3 * stage.energy_j / stage.samples if stage.samples else None,
        "energy_measured": measured_energy,
        "cache": {"hit_samples": int(hits.sum()), "prefix_ms_per_sample_miss": _ms(miss_per_sample),
                  "prefix_ms_per_sample_hit": _ms(hit_per_sample), "saved_s": saved_s,
                  "speedup": (compute_s + saved_s) / compute_s if saved_s and compute_s else None},
        "batch_sizes": sorted(set(int(b) for b in stage.batch_sizes)),
        "wall_s": round(stage.wall_s, 3),
    }


def summarise_stages(profiles: dict[int, StageProfile], measured_energy: bool) -> list[dict]:
    """Every stage's summary, in stage order (metrics.jsonl and report.json)."""
    return [summarise_stage(p, measured_energy) for _, p in sorted(profiles.items())]
