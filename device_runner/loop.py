"""The on-device SpFDE loop, top to bottom: plan, then epochs of (sieve → prefix/cache → step).

Per epoch: the active set of the data sieve is shuffled and trained on in batches; each
batch's features come from the feature cache or the frozen prefix; the suffix takes a
train step on ONNX Runtime and an SGD step in numpy with its block's cosine LR. At the end
of an epoch the held-out split is evaluated; at Δτ boundaries masks are pruned-and-grown
and the sieve exchanges samples. At a scheduled epoch the run moves to the next stage of
the bundle, carrying weights, masks, BatchNorm statistics and momentum.

Budgets are enforced as the run goes: the batch and the feature cache are planned for the
first stage and planned again on the real pipeline at every stage change (new sessions and
bridges raise the peak); peak RSS is read after every step (the cache is dropped, then the
batch halved, before the budget is reached; a step over the budget, or a stage where even
batch 1 does not fit, checkpoints and stops with status "stopped: memory budget"); energy
is checked after every step (checkpoint and stop). A stop request (SIGINT/SIGTERM, see
:class:`StopRequest`) is honoured between steps: checkpoint and stop.

A run folder belongs to one process at a time (run_lock.py); starting or resuming removes
temporaries a killed process left behind, and a folder killed before its first checkpoint
can simply be started again.

The pieces this loop calls: stage_pipeline.py (prefix chain, feature cache, stage changes),
budget.py (memory planning), stage_stats.py (per-stage timings), run_state.py (what a
checkpoint holds), run_config.py (the CLI's dataclass).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import allocator, budget, checkpoint, dst, run_lock, run_state, schedule
from .backends import choose_suffix_backend
from .bundle import Bundle, load_bundle
from .data import DeviceData, load_data, stratified_split
from .energy import EnergyMeter
from .errors import BudgetError, BundleError, RunError
from .method import dst as method_dst
from .profile import Profile, load_profile
from .run_config import RunConfig
from .sieve import DataSieve
from .stage_pipeline import StagePipeline
from .stage_stats import PHASES, StageProfile, summarise_stages

MAX_ROLLBACKS = 6
DEFAULT_SIEVE = 0.2   # removed fraction when neither --sieve nor the bundle's plan sets one
DRY_RUN_SAMPLES = 512
STOPPED_MEMORY = "stopped: memory budget"
STOPPED_ENERGY = "stopped: energy budget reached"
STOPPED_INTERRUPTED = "stopped: interrupted"


class StopRequest:
    """A signal handler that asks the loop to stop; the loop looks between steps, so a stop
    never lands inside a step or a checkpoint write. A second signal stops at once
    (KeyboardInterrupt; the last complete checkpoint is still intact)."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __call__(self, signum, frame=None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


def run_data(config: RunConfig, bundle: Bundle, dry_run: bool = False) -> DeviceData:
    """The run's images and labels; a dry run without ``--data`` plans on random images."""
    if config.data is not None:
        data = load_data(config.data, bundle.input_size, bundle.classes, config.max_per_class)
    elif dry_run:
        # Planning without data: random images stand in (their memory is not counted).
        size = bundle.input_size
        images = np.random.default_rng(0).integers(0, 256, (DRY_RUN_SAMPLES, 3, size, size), dtype=np.uint8)
        data = DeviceData(images, np.arange(DRY_RUN_SAMPLES) % len(bundle.classes), "random (dry run, no --data)")
    else:
        raise RunError("training needs --data digits or --data imagefolder:PATH")
    if int(data.labels.max()) >= len(bundle.classes):
        raise RunError(f"data has label {int(data.labels.max())} but the model has "
                       f"{len(bundle.classes)} classes")
    return data


class Runner:
    """One on-device run in ``out``: build with :func:`start` or :func:`resume`."""

    def __init__(self, config: RunConfig, out: Path, log=print, dry_run: bool = False):
        self.config = config
        self.out = Path(out)
        self.log = log
        allocator.return_large_frees()      # before the big arrays: what a step frees is returned
        self.profile: Profile = load_profile(config.profile, config.profile_overrides())
        # Signature (when keys are configured), paths and sha256 checked before anything is loaded;
        # a resumed run checks again, with the keys it started with (docs/trust.md).
        self.bundle: Bundle = load_bundle(config.bundle,
                                          trusted_keys=config.trusted_keys or self.profile.trusted_keys_dir)
        log(f"bundle {self.bundle.root}: {self.bundle.signature}")
        if config.epochs < 1:
            raise RunError(f"--epochs must be at least 1, got {config.epochs}")
        self.data: DeviceData = run_data(config, self.bundle, dry_run)
        self.train_idx, self.val_idx = stratified_split(self.data.labels, config.val_fraction, config.seed)
        plan = self.bundle.manifest.spfde
        self.schedule = schedule.device_schedule(
            stage_ks=schedule.run_stage_ks(self.bundle, config.stages), num_blocks=self.bundle.num_blocks,
            epochs=config.epochs,
            epochs_done=plan.epochs_done, plan_epochs=plan.epochs, freeze_epochs=plan.freezing.freeze_epochs,
            delta_tau=plan.delta_tau, base_lr=plan.lr_schedule.base_lr, update_fraction=plan.dst.update_fraction,
            lr=config.lr, device_delta_tau=config.delta_tau, freeze_at=config.freeze_at,
            warmup_epochs=plan.lr_schedule.warmup_epochs)
        self.starts = self.schedule.starts
        self.delta_tau = self.schedule.delta_tau
        try:
            self.algorithm = method_dst.get_algorithm(plan.dst.algorithm, plan.dst.lam)
        except ValueError as exc:
            raise BundleError(f"{exc}; re-export the bundle with this spfde_edge") from None
        sieve_fraction = config.sieve if config.sieve is not None else (plan.sieve.fraction or DEFAULT_SIEVE)
        self.rng = np.random.default_rng(config.seed)
        self.sieve = DataSieve(len(self.train_idx), sieve_fraction, np.random.default_rng(config.seed + 1),
                               plan.sieve.swap_fraction)
        self.momentum = plan.momentum
        self.weight_decay = plan.weight_decay
        self.checkpoint_every = config.checkpoint_every or self.profile.checkpoint_every_steps
        # Chosen now so that a bundle the backend cannot run is refused before anything is written.
        self.suffix_class, self.suffix_choice = choose_suffix_backend(
            self.profile.suffix_backend, self.bundle, [k for k, _ in self.starts], self.profile.threads)
        # Progress; everything below is in run_state.snapshot().
        self.epoch = 0
        self.position = 0             # samples of this epoch's order already trained
        self.order: np.ndarray | None = None
        self.batch_size = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.stage_profiles: dict[int, StageProfile] = {}
        self.initial_eval: dict | None = None
        self.plan: dict = {}
        self.status = "running"
        self.energy_offset_j = 0.0
        self.global_peak_mb = 0.0
        self.mask_targets: dict[str, int] = {}       # each masked weight's exact zero count
        self.pending: dict = {}                      # what this epoch's start did, for its record
        self.pipeline: StagePipeline | None = None   # built by setup() or restore()
        self.trainer = None                          # a suffix backend (backends/__init__.py)
        self.lock: run_lock.RunLock | None = None    # held by start()/resume() until run() ends
        self.stop = StopRequest()                    # the CLI installs it as the SIGINT handler
        self.memory_stop_reason = ""

    # --- the current stage (owned by self.pipeline) ------------------------------------------
    def new_pipeline(self, position: int = 0, frozen_params: dict | None = None,
                     precisions: list[dict] | None = None) -> StagePipeline:
        """The stage pipeline at ``starts[position]``; its disk cache goes to the profile's
        cache_dir, else into the run folder. ``precisions``: the frozen segments' as chosen
        before (a resumed run)."""
        cache_dir = Path(self.profile.cache_dir).expanduser() if self.profile.cache_dir else self.out / "cache"
        return StagePipeline(self.bundle, self.profile, self.data, self.starts, self.suffix_class, cache_dir,
                             position, frozen_params, train_idx=self.train_idx, heldout_idx=self.val_idx,
                             precisions=precisions)

    @property
    def stage_pos(self) -> int:
        return self.pipeline.position

    @property
    def stage_k(self) -> int:
        return self.pipeline.k

    # Read-only views for tests/test_device_runner.py, which inspects a run from outside.
    @property
    def prefix(self):
        return self.pipeline.prefix

    @property
    def cache(self):
        return self.pipeline.cache

    @property
    def frozen_params(self) -> dict[str, np.ndarray]:
        return self.pipeline.frozen_params

    def _features(self, indices: np.ndarray):
        return self.pipeline.features(indices)

    def evaluate(self) -> dict:
        return self.pipeline.evaluate(self.trainer, self.val_idx, self.batch_size)

    def _enter_stage(self, position: int) -> None:
        """Move to ``starts[position]``: new suffix artifacts with the trained state carried over."""
        old_k = self.stage_k
        chosen = len(self.pipeline.precisions)
        self.trainer = self.pipeline.enter_stage(position, self.trainer)
        new_k = self.stage_k
        self._event("stage", f"stage {old_k} -> {new_k}: blocks {old_k}..{new_k - 1} frozen with their "
                    "device-trained weights; weights, masks, BN statistics and momentum carried")
        self._precision_events(self.pipeline.precisions[chosen:])

    def _precision_events(self, records: list[dict]) -> None:
        for record in records:
            first, last = record["blocks"]
            measured = (f"; held-out top-1 {record['top1_float32']:.2f}% float32, {record['top1_int8']:.2f}% int8"
                        if "top1_int8" in record else "")
            self._event("prefix_precision", f"frozen blocks {first}..{last} run in {record['precision']} "
                        f"({record['why']}{measured})")

    # --- setup: the pieces start, resume and dry_run share -----------------------------------
    def prepare(self) -> budget.BatchPlan:
        """Energy meter, first stage and batch plan of a new run (nothing written yet)."""
        self.meter = EnergyMeter(self.profile.sensor, self.profile.idle_w, self.profile.busy_w,
                                 self.profile.cores)
        self.pipeline = self.new_pipeline()
        self.trainer = self.pipeline.new_trainer()
        self._precision_events(self.pipeline.settle_precisions(self.trainer))
        self.mask_targets = dst.target_zeros(self.trainer)
        plan = self.plan_batch()
        self.batch_size = plan.batch_size
        return plan

    def measure_peak(self, batch: int, steps: int = 1) -> float:
        """Peak RSS (MB) of prefix + train step + SGD at ``batch``; weights restored after."""
        idx = np.random.default_rng(0).choice(self.train_idx, size=batch, replace=batch > self.train_idx.size)
        return budget.measure_step_peak_mb(self.trainer, self.pipeline.uncached_features, self.data.labels,
                                           idx, self.momentum, self.weight_decay, steps)

    def plan_batch(self, strict_forced: bool = True) -> budget.BatchPlan:
        """The largest batch that fits the memory budget at the current stage, measured on its
        real pipeline; the feature cache goes if it does not fit too. BudgetError when even
        batch 1 does not fit, or (``strict_forced``) when ``--batch-size`` does not."""
        cap = min(self.profile.max_batch_size, max(1, self.sieve.active_indices.size))
        if self.config.batch_size is not None:
            cap = self.config.batch_size
        usable_mb = self.profile.memory_mb * (1.0 - self.profile.headroom)
        peaks = {}
        for size in budget.probe_batch_sizes(cap):
            peaks[size] = self.measure_peak(size)
            if peaks[size] > usable_mb:
                break  # a larger probe would only go further over the budget
        self._note_peak(max(peaks.values()))  # the probes are part of the process's peak too
        cache_mb = self.pipeline.planned_cache_mb()
        plan, cache_fits = budget.plan_with_cache(peaks, self.profile.memory_mb, self.profile.headroom, cap,
                                                  cache_mb)
        if not cache_fits:
            self.pipeline.cache.drop()
            self._event("cache_disabled", f"the feature cache ({cache_mb:.0f} MB) does not fit the "
                        f"memory budget beside training at stage {self.stage_k}; the prefix runs every step")
        if strict_forced:
            budget.check_forced_batch(plan, self.config.batch_size)
        record = {**budget.plan_record(plan, peaks, cache_mb), "stage": self.stage_k}
        by_stage = {**self.plan.get("by_stage", {}), str(self.stage_k): record}
        self.plan = {**(self.plan or record), "by_stage": by_stage}
        return plan

    def replan(self, why: str) -> bool:
        """Plan batch and cache again on the current stage (after a stage change, or on resuming
        a run stopped for memory); False, with ``memory_stop_reason`` set, when nothing fits."""
        try:
            plan = self.plan_batch(strict_forced=False)
        except BudgetError as exc:
            self.memory_stop_reason = f"stage {self.stage_k}: {exc}"
            return False
        if plan.batch_size != self.batch_size:
            self._event("memory", f"{why}: batch {self.batch_size} -> {plan.batch_size} (predicted peak "
                        f"{plan.predicted_peak_mb:.0f} MB of {self.profile.memory_mb:.0f} MB at stage {self.stage_k})")
        self.batch_size = plan.batch_size
        budget.reset_peak()  # the probes are recorded; the first step is measured on its own
        return True

    def setup(self) -> None:
        """A new run: plan, evaluate before training, write the first checkpoint."""
        plan = self.prepare()
        self.log(f"plan: batch {plan.batch_size} (predicted peak {plan.predicted_peak_mb:.0f} MB of "
                 f"{self.profile.memory_mb:.0f} MB), stages {self.starts}, Δτ {self.delta_tau}, "
                 f"prefix on {self.pipeline.prefix.name}, suffix on {self.trainer.name}, "
                 f"cache {self.pipeline.cache.location} ({self.pipeline.cache.dtype}), "
                 f"energy {self.meter.source}")
        self.initial_eval = self.evaluate()
        self.log(f"before on-device training: val acc {self.initial_eval['val_acc']:.4f}")
        self.save()

    def restore(self, meta: dict, arrays: dict[str, np.ndarray], suffix_state: Path) -> None:
        """A resumed run: its checkpoint, with the energy meter continuing from the joules spent."""
        run_state.restore(self, meta, arrays, suffix_state)
        self.meter = EnergyMeter(self.profile.sensor, self.profile.idle_w, self.profile.busy_w,
                                 self.profile.cores, offset_j=self.energy_offset_j)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the configured epochs, or stop cleanly at a budget or a stop request; the
        run folder's lock is released when it returns."""
        if self.lock is not None and not self.lock.held:
            self.lock = run_lock.acquire(self.out)
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict:
        energy_budget = self.profile.energy_j
        while self.epoch < self.config.epochs:
            if self.stop.requested:
                return self._stop_interrupted()
            if self.energy_exhausted(energy_budget):
                return self._stop_for_energy()
            if self.position == 0 and self.order is None:
                if not self._start_epoch():
                    return self._stop_for_memory()
            outcome = self._train_epoch(energy_budget)
            if outcome == "energy":
                return self._stop_for_energy()
            if outcome == "memory":
                return self._stop_for_memory()
            if outcome == "interrupted":
                return self._stop_interrupted()
            if outcome == "epoch":
                self._end_epoch()
        self.status = "finished"
        self.save()
        return self.report()

    def lrs(self, epoch_float: float) -> dict[int, float]:
        return self.schedule.lrs(epoch_float, self.lr_scale)

    def _start_epoch(self) -> bool:
        """What the host does at the start of an epoch, in its order: freeze (move to the
        stage that is due), begin the mask update, exchange sieve samples; then shuffle.
        False when the new stage does not fit the memory budget even at batch 1."""
        due = schedule.stage_at(self.starts, self.epoch)
        if self.stage_pos < due:
            budget.reset_peak()
            while self.stage_pos < due:
                self._enter_stage(self.stage_pos + 1)
            # The planner sized the first stage only; this stage's sessions, bridges and cache
            # have their own peak (15-20 MB more on resnet32), so plan again before its first step.
            moved = budget.peak_rss_mb()
            self._note_peak(moved)
            if moved > self.profile.memory_mb:
                self.memory_stop_reason = (f"moving to stage {self.stage_k} took peak RSS {moved:.0f} MB, "
                                           f"over the {self.profile.memory_mb:.0f} MB budget")
                return False
            if not self.replan(f"stage {self.stage_k} planned on its own pipeline"):
                return False
        self.pending = {"mask_update": False, "regrown": 0, "pruned": 0, "sieve_swapped": 0}
        if self.algorithm.name != "static" and self.schedule.updates.is_update_epoch(self.epoch):
            fraction = self.schedule.updates.fraction(self.epoch)
            dense = self._dense_gradients() if self.algorithm.needs_dense_gradient else None
            grown = dst.begin_update(self.trainer, self.algorithm, fraction, self.rng, self.mask_targets, dense)
            self.pending.update(mask_update=True, update_fraction=fraction, regrown=int(sum(grown.values())))
        if self.schedule.is_boundary(self.epoch):
            self.pending["sieve_swapped"] = int(self.sieve.update().moved_in.size)
        self.order = self.train_idx[self.rng.permutation(self.sieve.active_indices)]
        self.save()
        return True

    def _dense_gradients(self) -> dict[str, np.ndarray]:
        """RigL's growth criterion on one batch of active samples, as the host draws it."""
        idx = self.train_idx[self.rng.choice(self.sieve.active_indices,
                                             size=min(max(1, self.batch_size), self.sieve.active_indices.size),
                                             replace=False)]
        features, *_ = self.pipeline.features(idx)
        return dst.dense_gradients(self.trainer, features, self.data.labels[idx])

    def _train_epoch(self, energy_budget) -> str:
        """Train the rest of this epoch: "epoch" when done, "energy"/"memory" at a budget,
        "interrupted" on a stop request, "rollback" after a non-finite loss restored the last
        checkpoint. Every return is between whole steps."""
        k = self.stage_k
        profile = self.stage_profiles.setdefault(k, StageProfile(k))
        # On a terminal: samples done, step time, RSS, joules so far and tqdm's ETA (off in logs).
        bar = tqdm(total=int(self.order.size), initial=self.position, unit="img", leave=False, disable=None,
                   mininterval=1.0, desc=f"epoch {self.epoch + 1}/{self.config.epochs} stage {k}")
        try:
            return self._train_steps(energy_budget, profile, bar)
        finally:
            bar.close()

    def _train_steps(self, energy_budget, profile: StageProfile, bar) -> str:
        since_checkpoint = 0
        while self.position < self.order.size:
            started = time.perf_counter()
            energy_before = self.meter.joules
            idx = self.order[self.position:self.position + self.batch_size]
            features, hits, t_data, t_prefix = self.pipeline.features(idx)
            labels = self.data.labels[idx]
            t0 = time.perf_counter()
            loss, logits = self.trainer.train_step(features, labels)
            t1 = time.perf_counter()
            if not math.isfinite(loss):
                self._rollback(loss)
                return "rollback"
            epoch_float = self.epoch + self.position / self.order.size
            self.trainer.sgd_step(self.lrs(epoch_float), self.momentum, self.weight_decay)
            t2 = time.perf_counter()
            local = np.searchsorted(self.train_idx, idx)
            self.sieve.record(local, logits.argmax(1) == labels)
            self.position += idx.size
            for phase, seconds in zip(PHASES, (t_data, t_prefix, t1 - t0, t2 - t1)):
                profile.times[phase].append(seconds)
            profile.batch_sizes.append(int(idx.size))
            profile.cache_hits.append(hits)
            profile.samples += int(idx.size)
            over_budget = self._check_memory(profile)
            self.meter.update(force=energy_budget is not None)  # exact per step under a budget
            profile.energy_j += self.meter.joules - energy_before
            profile.wall_s += time.perf_counter() - started
            bar.update(int(idx.size))
            bar.set_postfix_str(f"step {1e3 * (time.perf_counter() - started):.0f} ms, RSS "
                                f"{budget.peak_rss_mb():.0f} MB, {self.meter.joules:.0f} J", refresh=False)
            if over_budget:
                return "memory"
            if self.stop.requested:
                return "interrupted"
            since_checkpoint += 1
            if since_checkpoint >= self.checkpoint_every and self.position < self.order.size:
                self.save()
                since_checkpoint = 0
            # Stop before a step that would cross the budget (the next costs about the last).
            step_j = self.meter.joules - energy_before
            if energy_budget is not None and self.meter.joules + step_j >= energy_budget:
                return "energy"
        return "epoch"

    def _end_epoch(self) -> None:
        k = self.stage_k
        if self.pending.get("mask_update"):
            pruned = dst.end_update(self.trainer, self.algorithm, self.pending["update_fraction"], self.rng,
                                    self.mask_targets)
            self.pending["pruned"] = int(sum(pruned.values()))
        evaluation = self.evaluate()
        sparsity = dst.sparsity_report(self.trainer)
        record = {
            "epoch": self.epoch + 1, "stage": k, **evaluation,
            "lr": {str(b): lr for b, lr in self.lrs(self.epoch).items() if b >= k},
            "batch_size": self.batch_size, "samples": int(self.order.size),
            "mask_update": self.pending.get("mask_update", False), "dst": self.algorithm.name,
            "regrown": self.pending.get("regrown", 0), "pruned": self.pending.get("pruned", 0),
            "sieve_swapped": self.pending.get("sieve_swapped", 0),
            "sparsity": sparsity["sparsity"], "masked_nonzero": sparsity["masked_nonzero"],
            "peak_rss_mb": round(self.global_peak_mb, 1), "energy_j": round(self.meter.update(force=True), 3),
            "energy_measured": self.meter.measured, "cache_mb": round(self.pipeline.cache.size_mb, 2),
            "time": time.time(),
        }
        self.history.append(record)
        self.log(f"epoch {record['epoch']}/{self.config.epochs} stage {k}: val acc {record['val_acc']:.4f} "
                 f"loss {record['val_loss']:.4f}, sparsity "
                 f"{'-' if record['sparsity'] is None else format(record['sparsity'], '.4f')}, peak RSS "
                 f"{record['peak_rss_mb']:.0f} MB, energy {record['energy_j']:.1f} J")
        self.epoch += 1
        self.position = 0
        self.order = None
        self.pending = {}
        self.save()

    # --- guards -------------------------------------------------------------------------------
    def energy_exhausted(self, energy_budget) -> bool:
        return energy_budget is not None and self.meter.update(force=True) >= energy_budget

    def _stop(self, status: str, kind: str, message: str) -> dict:
        self.status = status
        self._event(kind, message)
        self.save()
        return self.report()

    def _stop_for_energy(self) -> dict:
        return self._stop(STOPPED_ENERGY, "energy", f"energy budget {self.profile.energy_j:g} J reached "
                          f"({self.meter.joules:.1f} J, {self.meter.source}); checkpointed and stopped")

    def _stop_for_memory(self) -> dict:
        return self._stop(STOPPED_MEMORY, "budget_exceeded",
                          f"{self.memory_stop_reason}; checkpointed and stopped before training over the "
                          f"budget: raise it (--resume {self.out} --memory-budget-mb MB) or use a later stage")

    def _stop_interrupted(self) -> dict:
        return self._stop(STOPPED_INTERRUPTED, "interrupted", f"signal {self.stop.signal}: checkpointed at "
                          f"epoch {self.epoch + 1}, sample {self.position}; continue with --resume {self.out}")

    def _note_peak(self, peak_mb: float) -> None:
        self.global_peak_mb = max(self.global_peak_mb, peak_mb)

    def _check_memory(self, profile: StageProfile) -> bool:
        """Record the step's peak RSS; near the budget drop the in-memory cache, else halve the
        batch. True (stop) when the step went over the budget: training never continues over it."""
        peak = budget.peak_rss_mb()
        profile.peak_rss_mb = max(profile.peak_rss_mb, peak)
        self._note_peak(peak)
        limit = self.profile.memory_mb
        if peak > limit:
            self.memory_stop_reason = (f"stage {self.stage_k}: peak RSS {peak:.0f} MB went over the "
                                       f"{limit:.0f} MB budget at batch {self.batch_size}")
            return True
        soft = limit * (1.0 - self.profile.headroom / 2)
        if peak <= soft:
            return False
        cache = self.pipeline.cache
        if cache.enabled and cache.location == "memory":
            cache.drop()
            self._event("memory", f"peak RSS {peak:.0f} MB near the {limit:.0f} MB budget: feature cache dropped")
        elif self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self._event("memory", f"peak RSS {peak:.0f} MB near the {limit:.0f} MB budget: batch "
                        f"halved to {self.batch_size}")
        budget.reset_peak()
        return False

    def _rollback(self, loss: float) -> None:
        """NaN/inf loss: reload the last checkpoint and halve the learning rate."""
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise RunError(f"loss was {loss} again after {MAX_ROLLBACKS} rollbacks with halved LR; "
                           "lower --lr or check the data; the last good checkpoint is kept")
        scale, rollbacks, events = self.lr_scale * 0.5, self.rollbacks, self.events
        meta, arrays, ort = checkpoint.read(self.out)
        run_state.restore(self, meta, arrays, ort)
        self.lr_scale, self.rollbacks = scale, rollbacks
        self.events = events
        self._event("nan", f"loss {loss} at epoch {self.epoch}: rolled back to the last checkpoint "
                    f"(epoch {self.epoch}, sample {self.position}) and lowered the LR to x{scale:g}")
        self.save()

    # --- records ------------------------------------------------------------------------------
    def save(self) -> None:
        self.meter.update(force=True)
        meta, arrays = run_state.snapshot(self)
        try:
            checkpoint.write(self.out, meta, arrays, self.trainer.save)
            checkpoint.write_metrics(self.out, self.history,
                                     summarise_stages(self.stage_profiles, self.meter.measured))
        except OSError as exc:  # a full disk, a removed card: the last complete checkpoint stays
            then = (f"start it again with --out {self.out}" if checkpoint.is_unfinished_start(self.out)
                    else f"--resume {self.out}")
            raise RunError(f"cannot write the checkpoint in {self.out} ({exc.strerror or exc}); the last "
                           f"complete checkpoint is kept; free space, then {then}") from None

    def _event(self, kind: str, message: str) -> None:
        self.events.append({"epoch": self.epoch, "position": self.position, "kind": kind, "message": message,
                            "time": time.time()})
        self.log(f"[{kind}] {message}")

    def report(self) -> dict:
        from .report import build_report, write_report
        report = build_report(self)
        write_report(self.out, report)
        return report


def _claim(out: Path, log) -> run_lock.RunLock:
    """Lock ``out`` for a new run and make sure it holds nothing else; a run killed before its
    first checkpoint trained nothing, so its leftovers are cleared and it starts over."""
    lock = run_lock.acquire(out)
    try:
        if checkpoint.is_unfinished_start(out):
            log(f"{out} holds a run stopped before its first checkpoint; starting it over")
            for entry in out.iterdir():
                if entry.name == run_lock.LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif any(entry.name != run_lock.LOCK_NAME for entry in out.iterdir()):
            raise RunError(f"--out {out} already holds files; use --resume {out} to continue it or "
                           "choose a new folder")
    except BaseException:
        lock.release()
        raise
    return lock


def _remove_stale(out: Path) -> None:
    """What killed processes left: temporaries, unreferenced checkpoints, disk-cache files (the
    cache is rebuilt after a resume). Only under the run's lock."""
    checkpoint.remove_stale(out)
    for leftover in (out / "cache").glob("features-*"):
        leftover.unlink(missing_ok=True)


def start(config: RunConfig, log=print, stop: StopRequest | None = None) -> Runner:
    out = Path(config.out or "runs/device")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a new or empty folder")
    # A folder that is in use or holds files is refused before the slower checks below.
    lock = _claim(out, log) if out.is_dir() and any(out.iterdir()) else None
    try:
        runner = Runner(config, out, log)  # checks bundle, profile and data before writing anything
        if lock is None:
            out.mkdir(parents=True, exist_ok=True)
            lock = _claim(out, log)
        runner.lock = lock
        runner.stop = stop or runner.stop
        checkpoint.mark_pending(out)  # removed by the first complete checkpoint
        runner.setup()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return runner


def resume(out: Path, log=print, energy_budget_j: float | None = None, memory_budget_mb: float | None = None,
           stop: StopRequest | None = None) -> Runner:
    out = Path(out)
    lock = run_lock.acquire(out) if out.is_dir() else None  # else read() says what is missing
    try:
        runner = _resume_locked(out, log, energy_budget_j, memory_budget_mb)
        runner.lock = lock
        runner.stop = stop or runner.stop
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return runner


def _resume_locked(out: Path, log, energy_budget_j: float | None, memory_budget_mb: float | None) -> Runner:
    if out.is_dir():
        _remove_stale(out)
    meta, arrays, ort = checkpoint.read(out)
    config = RunConfig.from_dict(meta["config"])
    if energy_budget_j is not None:
        config = replace(config, energy_budget_j=energy_budget_j)
    if memory_budget_mb is not None:
        config = replace(config, memory_budget_mb=memory_budget_mb)
    meta["config"] = config.to_dict()
    # A run killed after its last checkpoint but before report.json resumes to write the report.
    if meta["status"] == "finished" and (out / "report.json").is_file():
        raise RunError(f"run {out} already finished its {config.epochs} epochs; start a new run "
                       "from its report or raise --epochs in a new run")
    runner = Runner(config, out, log)
    runner.restore(meta, arrays, ort)
    stopped_at = meta.get("energy_budget_j")
    if meta["status"].startswith("stopped: energy") and (
            runner.energy_exhausted(runner.profile.energy_j)
            or (stopped_at is not None and runner.profile.energy_j is not None
                and runner.profile.energy_j <= stopped_at)):
        raise BudgetError(f"run {out} stopped at its energy budget ({runner.profile.energy_j:g} J, "
                          f"{meta['energy_j']:.1f} J used); raise budgets.energy_j in the profile to continue")
    if meta["status"] == STOPPED_MEMORY and not runner.replan("resumed after a memory stop"):
        raise BudgetError(f"run {out} stopped at its memory budget and still does not fit "
                          f"({runner.memory_stop_reason}); resume with a larger --memory-budget-mb")
    runner.status = "running"
    log(f"resumed {out} at epoch {runner.epoch + 1}, sample {runner.position} (stage {runner.stage_k})")
    return runner


def dry_run(config: RunConfig, log=print) -> dict:
    """Plan without training: batch size, stages, predicted memory and energy, or why not."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(config, Path(tmp), log, dry_run=True)
        plan = runner.prepare()
        batch = plan.batch_size
        started = time.perf_counter()
        runner.measure_peak(batch, steps=2)
        step_s = (time.perf_counter() - started) / 2
        samples = runner.sieve.active_indices.size
        seconds_per_epoch = step_s * math.ceil(samples / batch)
        profile, pipeline = runner.profile, runner.pipeline
        joules = profile.busy_w * seconds_per_epoch * config.epochs
        result = {"batch_size": batch, "predicted_peak_mb": round(plan.predicted_peak_mb, 1),
                  "memory_budget_mb": profile.memory_mb, "per_sample_mb": round(plan.per_sample_mb, 3),
                  "stages": runner.starts, "delta_tau": runner.delta_tau, "prefix": pipeline.prefix.name,
                  "prefix_choice": pipeline.prefix_choice, "suffix_choice": runner.suffix_choice,
                  "cache": pipeline.cache.location, "cache_dtype": pipeline.cache.dtype,
                  "data": runner.data.source, "train_samples_per_epoch": int(samples),
                  "predicted_epoch_s_first_stage": round(seconds_per_epoch, 2),
                  "predicted_energy_j": round(joules, 1), "energy_budget_j": profile.energy_j,
                  "energy_source": runner.meter.source}
        lines = [f"plan for {runner.bundle.model_name} on {profile.name}:",
                 f"  batch {batch}: predicted peak RSS {plan.predicted_peak_mb:.0f} MB of "
                 f"{profile.memory_mb:.0f} MB ({plan.base_mb:.0f} MB base + "
                 f"{plan.per_sample_mb:.2f} MB/sample; {plan.reason})",
                 f"  stages (k, first epoch): {runner.starts}; Δτ {runner.delta_tau} epoch(s)",
                 f"  prefix: {pipeline.prefix_choice}; feature cache: {pipeline.cache.location} "
                 f"({pipeline.cache.dtype})",
                 f"  suffix: {runner.suffix_choice}",
                 f"  {samples} samples/epoch from {runner.data.source}: about {seconds_per_epoch:.1f} s/epoch "
                 f"in the first stage; {config.epochs} epoch(s) about {joules:.0f} J at busy power "
                 f"{profile.busy_w:g} W"]
        if profile.energy_j is not None and joules > profile.energy_j:
            lines.append(f"  energy: the budget {profile.energy_j:g} J ends the run early "
                         f"(after about {profile.energy_j / joules * config.epochs:.1f} epochs); "
                         "it checkpoints and stops cleanly")
        log("\n".join(lines))
        return result
