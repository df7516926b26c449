"""A run's saved state: everything that changes during a run, as checkpoint.py stores it.

One place for the checkpoint's content so that save and restore cannot drift apart: meta
keys (state.json) and array names (state.npz: ``sieve/``, ``momentum/``, ``frozen/``,
``order``) are the checkpoint format of ``checkpoint.STATE_VERSION``. The suffix's own
parameters travel separately (``trainer.save`` → suffix_state.npz).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import checkpoint
from .errors import RunError
from .stage_stats import StageProfile


def bundle_hashes(bundle) -> dict[str, str]:
    """The bundle's sha256 table; a run resumes only on the bundle it started with."""
    return {rel: entry.sha256 for rel, entry in bundle.manifest.files.items()}


def _with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix)}


def snapshot(runner) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of ``runner`` for checkpoint.write."""
    sieve_state = runner.sieve.state_dict()
    arrays = {f"sieve/{k}": v for k, v in sieve_state.items() if isinstance(v, np.ndarray)}
    arrays.update({f"momentum/{n}": b for n, b in runner.trainer.momentum_buffers.items()})
    arrays.update({f"frozen/{n}": v for n, v in runner.pipeline.frozen_params.items()})
    if runner.order is not None:
        arrays["order"] = runner.order
    meta = {
        "version": checkpoint.STATE_VERSION, "config": runner.config.to_dict(), "epoch": runner.epoch,
        "position": runner.position, "stage_pos": runner.pipeline.position, "batch_size": runner.batch_size,
        "lr_scale": runner.lr_scale, "rollbacks": runner.rollbacks, "history": runner.history,
        "events": runner.events, "plan": runner.plan, "initial_eval": runner.initial_eval,
        "prefix_precisions": runner.pipeline.precisions,
        "status": runner.status, "energy_j": runner.meter.joules, "global_peak_mb": runner.global_peak_mb,
        "energy_budget_j": runner.profile.energy_j,
        "rng": runner.rng.bit_generator.state,
        "mask_targets": runner.mask_targets, "pending": runner.pending,
        "sieve": {k: v for k, v in sieve_state.items() if not isinstance(v, np.ndarray)},
        "stage_profiles": {str(k): asdict(p) for k, p in runner.stage_profiles.items()},
        "bundle_sha": bundle_hashes(runner.bundle),
    }
    return meta, arrays


def restore(runner, meta: dict, arrays: dict[str, np.ndarray], suffix_state: Path) -> None:
    """Put ``runner`` back where :func:`snapshot` left it: progress, sieve, RNG, stage and trainer."""
    if meta["bundle_sha"] != bundle_hashes(runner.bundle):
        raise RunError("the bundle changed since this run started (its sha256 table differs); "
                       "resume with the original bundle or start a new run")
    runner.epoch, runner.position = meta["epoch"], meta["position"]
    runner.batch_size = meta["batch_size"]
    runner.lr_scale, runner.rollbacks = meta["lr_scale"], meta["rollbacks"]
    runner.history, runner.events, runner.plan = meta["history"], meta["events"], meta["plan"]
    runner.initial_eval, runner.status = meta["initial_eval"], meta["status"]
    runner.energy_offset_j = meta["energy_j"]
    runner.global_peak_mb = meta["global_peak_mb"]
    runner.rng.bit_generator.state = meta["rng"]
    runner.mask_targets = {n: int(z) for n, z in meta["mask_targets"].items()}
    runner.pending = dict(meta["pending"])
    sieve_state = dict(meta["sieve"])
    sieve_state.update(_with_prefix(arrays, "sieve/"))
    runner.sieve.load_state_dict(sieve_state)
    runner.order = arrays.get("order")
    runner.stage_profiles = {int(k): StageProfile(**v) for k, v in meta["stage_profiles"].items()}
    runner.pipeline = runner.new_pipeline(meta["stage_pos"], _with_prefix(arrays, "frozen/"),
                                          meta.get("prefix_precisions", []))
    runner.trainer = runner.pipeline.new_trainer(suffix_state)
    runner.trainer.momentum_buffers = _with_prefix(arrays, "momentum/")
