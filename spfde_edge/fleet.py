"""Merge a fleet: several device runs of one bundle -> one host checkpoint (the next round's bundle).

Each run is read with :func:`spfde_edge.device_import.read_device_run` (its logits checked
against the device's), then, with each run weighted by the samples it trained on
(``alpha_i = samples_i / sum(samples)``, from the runs' epoch records):

* **where the merge stands**: the earliest common frozen point. The merged model freezes the
  blocks every run had frozen (``min k_i``) and continues the bundle's plan from the earliest
  plan epoch any run reached; blocks later runs had frozen train again.
* **masked weights** keep each layer's exact sparsity: the new mask is the layer's target count
  of positions with the largest ``sum_i alpha_i |w_i|`` (inactive weights are exactly 0, so
  this sums the members' masked weights; ties to the lower index). A kept weight is the
  weighted average over the members that had it active, renormalised by their weights
  (where every member had it active: the plain weighted average); the rest are 0.
* **every other parameter and the BatchNorm running statistics** (mean and variance):
  the weighted average. Blocks before the bundle's first stage never trained on a device and
  are the same in every run; they are taken as they are.
* **momentum** is not carried (the members' buffers belong to their own trajectories).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from device_runner.run_state import bundle_hashes

from .device_import import (DeviceImportError, DeviceModel, host_config, keep_largest, read_device_run,
                            write_host_checkpoint)


def merge_layer(weights: list[np.ndarray], masks: list[np.ndarray], alphas: list[float],
                active: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight, mask) of one masked layer merged by the rule in the module docstring."""
    score = sum(a * np.abs(w) for a, w in zip(alphas, weights))
    mask = keep_largest(score, active)
    total = sum(a * w.astype(np.float64) * m for a, w, m in zip(alphas, weights, masks))
    share = sum(a * m.astype(np.float64) for a, m in zip(alphas, masks))
    merged = np.divide(total, share, out=np.zeros_like(total), where=share > 0)
    return np.where(mask, merged, 0.0).astype(np.float32), mask


def merge_models(members: list[DeviceModel]) -> DeviceModel:
    """One DeviceModel from runs of one bundle (checked by the caller)."""
    samples = [m.samples for m in members]
    if sum(samples) <= 0:
        raise DeviceImportError("none of the runs finished an epoch on the device (no samples trained); "
                                "merge runs that trained")
    alphas = [s / sum(samples) for s in samples]
    first = members[0]
    k0 = first.first_stage
    model = copy.deepcopy(first.model)
    states = [m.model.state_dict() for m in members]
    merged_state, masks = {}, {}
    for name, value in states[0].items():
        if not value.is_floating_point() or model.block_of_parameter(name) < k0:
            merged_state[name] = value.clone()   # bundle blocks (identical) and BN batch counters
        elif name in first.masks:
            weight, mask = merge_layer([s[name].numpy() for s in states],
                                       [m.masks[name].numpy() for m in members], alphas,
                                       value.numel() - first.target_zeros[name])
            merged_state[name], masks[name] = torch.from_numpy(weight), torch.from_numpy(mask)
        else:
            merged_state[name] = sum(a * s[name].double() for a, s in zip(alphas, states)).float()
    for name, mask in first.masks.items():
        if model.block_of_parameter(name) < k0:
            masks[name] = mask.clone()
    model.load_state_dict(merged_state)
    return DeviceModel(model=model.eval(), masks=masks, target_zeros=dict(first.target_zeros),
                       num_frozen=min(m.num_frozen for m in members),
                       plan_epoch=min(m.plan_epoch for m in members), samples=sum(samples),
                       bundle=first.bundle, runs=[r for m in members for r in m.runs],
                       notes=[f"merged {len(members)} runs, weights {', '.join(f'{a:.3f}' for a in alphas)} "
                              f"(samples {', '.join(map(str, samples))})"])


def read_fleet(runs: list[str | Path]) -> list[DeviceModel]:
    """Every run, refusing runs of different bundles (their manifests' sha256 tables)."""
    if len(runs) < 2:
        raise DeviceImportError("give at least two runs to merge (one run: python -m spfde_edge.import)")
    members = [read_device_run(run) for run in runs]
    reference = bundle_hashes(members[0].bundle)
    for run, member in zip(runs[1:], members[1:]):
        if bundle_hashes(member.bundle) != reference:
            raise DeviceImportError(f"{run} trained bundle {member.bundle.root}, {runs[0]} bundle "
                                    f"{members[0].bundle.root} (their files differ); merge runs of one bundle")
    return members


def merge_runs(runs: list[str | Path], out: str | Path, epochs: int | None = None, dataset: str | None = None,
               data_dir: str | None = None, log=print) -> Path:
    """``python -m spfde_edge.merge RUN_A RUN_B ... --out OUT``."""
    merged = merge_models(read_fleet(runs))
    config = host_config(merged.bundle, epochs, dataset, data_dir)
    return write_host_checkpoint(merged, out, config, record={"merge": "sample-weighted"}, log=log)
