"""The on-device SpFDE loop, top to bottom: plan, then epochs of (sieve → prefix/cache → step).

Per epoch: the active set of the data sieve is shuffled and trained on in batches; each
batch's features come from the feature cache or the frozen prefix; the suffix takes a
train step on ONNX Runtime and an SGD step in numpy with its block's cosine LR. At the end
of an epoch the held-out split is evaluated; at Δτ boundaries masks are pruned-and-grown
and the sieve exchanges samples. At a scheduled epoch the run moves to the next stage of
the bundle, carrying weights, masks, BatchNorm statistics and momentum.

Budgets are enforced as the run goes: peak RSS after every step (the cache is dropped,
then the batch halved, before the budget is reached) and energy (checkpoint and stop).
Everything that changes is in :meth:`Runner.state`, written atomically by checkpoint.py.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import budget, checkpoint, dst, schedule
from .backends import executorch_prefix
from .backends.ort_prefix import OrtBridge, OrtPrefix, PrefixChain
from .backends import choose_suffix_backend
from .backends.sgd import block_of
from .bundle import Bundle, load_bundle
from .cache import FeatureCache
from .data import DeviceData, load_data, normalize, stratified_split
from .energy import EnergyMeter
from .errors import BudgetError, BundleError, RunError
from .profile import Profile, load_profile
from .sieve import DataSieve

PHASES = ("data", "prefix", "train", "optimizer")
MAX_ROLLBACKS = 6


@dataclass(frozen=True)
class RunConfig:
    """Everything ``python -m device_runner`` can be told; stored in checkpoints and reports."""

    bundle: str
    profile: str
    data: str | None = None
    out: str | None = None
    epochs: int = 3
    lr: float | None = None              # default: the bundle's base LR (a tenth when fine-tuning)
    batch_size: int | None = None        # default: the largest that fits the memory budget
    val_fraction: float = 0.1
    sieve: float | None = None           # removed fraction; default the bundle's, else 0.2
    delta_tau: int | None = None         # device epochs; default scaled from the bundle's
    freeze_at: tuple[int, ...] | None = None
    max_per_class: int | None = None
    memory_budget_mb: float | None = None
    energy_budget_j: float | None = None
    cache: str | None = None             # memory | disk | none (default: the profile's)
    checkpoint_every: int | None = None  # steps (default: the profile's)
    threads: int | None = None           # default: the profile's
    seed: int = 0
    suffix_backend: str | None = None    # auto | onnxruntime-training | onnxruntime (default: profile's)

    def profile_overrides(self) -> dict:
        overrides = {}
        if self.memory_budget_mb is not None:
            overrides["budgets.memory_mb"] = self.memory_budget_mb
        if self.energy_budget_j is not None:
            overrides["budgets.energy_j"] = self.energy_budget_j
        if self.cache is not None:
            overrides["cache.location"] = self.cache
        if self.threads is not None:
            overrides["budgets.threads"] = self.threads
        if self.suffix_backend is not None:
            overrides["suffix_backend"] = self.suffix_backend
        return overrides

    def to_dict(self) -> dict:
        data = asdict(self)
        data["freeze_at"] = list(self.freeze_at) if self.freeze_at is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        if data.get("freeze_at") is not None:
            data["freeze_at"] = tuple(data["freeze_at"])
        return cls(**data)


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


def _ms(seconds):
    return None if seconds is None else round(1e3 * seconds, 3)


class Runner:
    """One on-device run in ``out``: build with :func:`start` or :func:`resume`."""

    def __init__(self, config: RunConfig, out: Path, log=print, dry_run: bool = False):
        self.config = config
        self.out = Path(out)
        self.log = log
        self.profile: Profile = load_profile(config.profile, config.profile_overrides())
        self.bundle: Bundle = load_bundle(config.bundle)
        if config.epochs < 1:
            raise RunError(f"--epochs must be at least 1, got {config.epochs}")
        if config.data is not None:
            self.data: DeviceData = load_data(config.data, self.bundle.input_size, self.bundle.classes,
                                              config.max_per_class)
        elif dry_run:
            # Planning without data: random images stand in (their memory is not counted).
            size = self.bundle.input_size
            images = np.random.default_rng(0).integers(0, 256, (512, 3, size, size), dtype=np.uint8)
            self.data = DeviceData(images, np.arange(512) % len(self.bundle.classes), "random (dry run, no --data)")
        else:
            raise RunError("training needs --data digits or --data imagefolder:PATH")
        if int(self.data.labels.max()) >= len(self.bundle.classes):
            raise RunError(f"data has label {int(self.data.labels.max())} but the model has "
                           f"{len(self.bundle.classes)} classes")
        self.train_idx, self.val_idx = stratified_split(self.data.labels, config.val_fraction, config.seed)
        spfde = self.bundle.spfde
        self.starts = schedule.stage_starts([s.k for s in self.bundle.stages], spfde, config.epochs,
                                            list(config.freeze_at) if config.freeze_at else None)
        self.active_epochs = schedule.block_active_epochs(self.starts, self.bundle.num_blocks, config.epochs)
        self.base_lr = config.lr if config.lr is not None else schedule.default_lr(spfde)
        self.delta_tau = config.delta_tau or schedule.device_delta_tau(spfde, config.epochs)
        sieve_fraction = config.sieve if config.sieve is not None else (
            float(spfde.get("sieve", {}).get("fraction", 0.0)) or 0.2)
        self.rng = np.random.default_rng(config.seed)
        self.sieve = DataSieve(len(self.train_idx), sieve_fraction, np.random.default_rng(config.seed + 1),
                               float(spfde.get("sieve", {}).get("swap_fraction", 0.5)))
        self.dst_algorithm = spfde.get("dst", {}).get("algorithm", "set")
        self.dst_fraction = float(spfde.get("dst", {}).get("update_fraction", 0.3))
        self.momentum = float(spfde.get("momentum", 0.9))
        self.weight_decay = float(spfde.get("weight_decay", 5e-4))
        self.threads = self.profile.threads
        self.checkpoint_every = config.checkpoint_every or self.profile.checkpoint_every_steps
        # Progress; everything below is in state().
        self.epoch = 0
        self.position = 0             # samples of this epoch's order already trained
        self.order: np.ndarray | None = None
        self.stage_pos = 0
        self.batch_size = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.stage_profiles: dict[int, StageProfile] = {}
        self.frozen_params: dict[str, np.ndarray] = {}
        self.initial_eval: dict | None = None
        self.plan: dict = {}
        self.status = "running"
        self.energy_offset_j = 0.0
        self.global_peak_mb = 0.0
        self.trainer = None                 # a suffix backend (backends/__init__.py)
        self.suffix_class, self.suffix_choice = choose_suffix_backend(
            self.profile.suffix_backend, self.bundle.stages)
        self.prefix: PrefixChain | None = None
        self.cache: FeatureCache | None = None

    # --- backends -------------------------------------------------------------------------
    def _base_prefix(self):
        first = self.bundle.stages[0] if not self.stage_list else self.bundle.stage(self.stage_list[0])
        if first.k == 0 or first.prefix_onnx is None:
            self.prefix_choice = "none (stage 0 trains every block)"
            return None
        wanted = self.profile.prefix_backend
        _, why = executorch_prefix.available()
        if wanted == "executorch":
            if first.prefix_pte is None:
                raise BundleError("the profile asks for ExecuTorch but the bundle has no .pte prefix")
            self.prefix_choice = f"executorch (profile prefix_backend: executorch; {why})"
            return executorch_prefix.ExecuTorchPrefix(first.prefix_pte, first.pte_batch_size or 1)
        # auto: ExecuTorch's Python bindings need torch (see backends/executorch_prefix.py).
        self.prefix_choice = f"onnxruntime (profile prefix_backend: {wanted}; ExecuTorch: {why})"
        return OrtPrefix(first.prefix_onnx, self.threads)

    @property
    def stage_list(self) -> list[int]:
        return [k for k, _ in self.starts]

    @property
    def stage_k(self) -> int:
        return self.starts[self.stage_pos][0]

    def _build_prefix(self) -> None:
        base = self._base_prefix()
        bridges = []
        for j in range(1, self.stage_pos + 1):
            k_from, k_to = self.starts[j - 1][0], self.starts[j][0]
            bridges.append(OrtBridge(self.bundle.stage(k_from).eval_model, k_from, k_to,
                                     self.frozen_params, self.threads))
        self.prefix = PrefixChain(base, bridges)

    def _new_cache(self) -> None:
        shape = self.bundle.stage(self.stage_k).feature_shape
        location = self.profile.cache_location
        if self.prefix is None or self.prefix.empty:
            location = "none"
        directory = Path(self.profile.cache_dir).expanduser() if self.profile.cache_dir else self.out / "cache"
        self.cache = FeatureCache(len(self.data), shape, location, self.profile.cache_max_mb, directory)

    # --- features and steps ---------------------------------------------------------------
    def _features(self, indices: np.ndarray) -> tuple[np.ndarray, int, float, float]:
        """(features, cache hits, data seconds, prefix seconds) for dataset ``indices``."""
        t0 = time.perf_counter()
        hit = self.cache.lookup(indices) if self.cache is not None else np.zeros(len(indices), bool)
        missing = indices[~hit]
        x = normalize(self.data.images[missing], self.bundle.mean, self.bundle.std) if missing.size else None
        t1 = time.perf_counter()
        if self.prefix.empty:
            features = x
        else:
            features = np.empty((len(indices), *self.bundle.stage(self.stage_k).feature_shape), np.float32)
            if hit.any():
                features[hit] = self.cache.get(indices[hit])
            if missing.size:
                computed = self.prefix.forward(x)
                features[~hit] = computed
                self.cache.put(missing, computed)
        t2 = time.perf_counter()
        return features, int(hit.sum()), t1 - t0, t2 - t1

    def lrs(self, epoch_float: float) -> dict[int, float]:
        return {b: self.lr_scale * schedule.block_lr(self.base_lr, epoch_float, self.active_epochs[b])
                for b in range(self.bundle.num_blocks)}

    def evaluate(self) -> dict:
        correct, loss_sum = 0, 0.0
        size = max(1, self.batch_size or 32)
        for start in range(0, self.val_idx.size, size):
            idx = self.val_idx[start:start + size]
            features, *_ = self._features(idx)
            loss, logits = self.trainer.eval_step(features, self.data.labels[idx])
            correct += int((logits.argmax(1) == self.data.labels[idx]).sum())
            loss_sum += loss * idx.size
        return {"val_acc": correct / self.val_idx.size, "val_loss": loss_sum / self.val_idx.size}

    # --- planning -------------------------------------------------------------------------
    def measure_peak(self, batch: int, steps: int = 1) -> float:
        """Peak RSS (MB) of prefix + train step + SGD at ``batch``; weights restored after."""
        saved = {n: self.trainer.get_parameter(n) for n in self.trainer.parameter_names()}
        momentum = copy.deepcopy(self.trainer.momentum_buffers)
        rng = np.random.default_rng(0)
        idx = rng.choice(self.train_idx, size=batch, replace=batch > self.train_idx.size)
        budget.reset_peak()
        for _ in range(steps):
            features = self.prefix.forward(normalize(self.data.images[idx], self.bundle.mean, self.bundle.std)) \
                if not self.prefix.empty else normalize(self.data.images[idx], self.bundle.mean, self.bundle.std)
            self.trainer.train_step(features, self.data.labels[idx])
            self.trainer.sgd_step({}, self.momentum, self.weight_decay)
        peak = budget.peak_rss_mb()
        for name, value in saved.items():
            self.trainer.set_parameter(name, value)
        self.trainer.momentum_buffers = momentum
        return peak

    def plan_batch(self) -> budget.BatchPlan:
        cap = min(self.profile.max_batch_size, max(1, self.sieve.active_indices.size))
        if self.config.batch_size is not None:
            cap = self.config.batch_size
        peaks = {b: self.measure_peak(b) for b in sorted({1 if cap < 4 else 2, min(cap, 8)})}
        cache_mb = 0.0
        if self.cache is not None and self.cache.enabled and self.cache.location == "memory":
            cache_mb = len(self.data) * self.cache.bytes_per_sample / 2**20
        try:
            plan = budget.plan_batch(peaks, self.profile.memory_mb, self.profile.headroom, cap, cache_mb)
        except BudgetError:
            if not cache_mb:
                raise
            plan = budget.plan_batch(peaks, self.profile.memory_mb, self.profile.headroom, cap, 0.0)
            self.cache.drop()
            self._event("cache_disabled", f"the feature cache ({cache_mb:.0f} MB) does not fit the "
                        "memory budget beside training; the prefix runs every step")
        if self.config.batch_size is not None and plan.batch_size < self.config.batch_size:
            raise BudgetError(f"--batch-size {self.config.batch_size} is predicted to need "
                              f"{plan.base_mb + plan.per_sample_mb * self.config.batch_size:.0f} MB; the "
                              f"memory budget allows batch {plan.batch_size}; drop --batch-size or raise "
                              "budgets.memory_mb")
        self.plan = {"batch_size": plan.batch_size, "predicted_peak_mb": round(plan.predicted_peak_mb, 1),
                     "base_mb": round(plan.base_mb, 1), "per_sample_mb": round(plan.per_sample_mb, 3),
                     "measured_peaks_mb": {str(b): round(p, 1) for b, p in peaks.items()},
                     "budget_mb": plan.budget_mb, "reason": plan.reason,
                     "cache_planned_mb": round(cache_mb, 1)}
        return plan

    # --- stage changes --------------------------------------------------------------------
    def _enter_stage(self, position: int) -> None:
        """Move to ``starts[position]``: new suffix artifacts with the trained state carried over."""
        old, old_k = self.trainer, self.stage_k
        self.stage_pos = position
        new_k = self.stage_k
        current = {n: old.get_parameter(n) for n in old.parameter_names()}
        for name, value in current.items():
            if block_of(name) < new_k:
                self.frozen_params[name] = value
        trainer = self.suffix_class(self.bundle.stage(new_k), self.threads)
        for name in trainer.parameter_names():
            if name in current:
                trainer.set_parameter(name, current[name])
        trainer.momentum_buffers = {n: b for n, b in old.momentum_buffers.items() if block_of(n) >= new_k}
        self.trainer = trainer
        bridge = OrtBridge(self.bundle.stage(old_k).eval_model, old_k, new_k, self.frozen_params, self.threads)
        self.prefix = PrefixChain(self.prefix.base, self.prefix.bridges + [bridge])
        if self.cache is not None and self.cache.enabled:
            self.cache.transform(bridge.forward, feature_shape=self.bundle.stage(new_k).feature_shape)
        elif self.cache is None:
            self._new_cache()
        self._event("stage", f"stage {old_k} -> {new_k}: blocks {old_k}..{new_k - 1} frozen with their "
                    "device-trained weights; weights, masks, BN statistics and momentum carried")

    def _event(self, kind: str, message: str) -> None:
        self.events.append({"epoch": self.epoch, "position": self.position, "kind": kind, "message": message,
                            "time": time.time()})
        self.log(f"[{kind}] {message}")

    # --- state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        sieve_state = self.sieve.state_dict()
        arrays = {f"sieve/{k}": v for k, v in sieve_state.items() if isinstance(v, np.ndarray)}
        arrays.update({f"momentum/{n}": b for n, b in self.trainer.momentum_buffers.items()})
        arrays.update({f"frozen/{n}": v for n, v in self.frozen_params.items()})
        if self.order is not None:
            arrays["order"] = self.order
        meta = {
            "version": checkpoint.STATE_VERSION, "config": self.config.to_dict(), "epoch": self.epoch,
            "position": self.position, "stage_pos": self.stage_pos, "batch_size": self.batch_size,
            "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "history": self.history,
            "events": self.events, "plan": self.plan, "initial_eval": self.initial_eval,
            "status": self.status, "energy_j": self.meter.joules, "global_peak_mb": self.global_peak_mb,
            "energy_budget_j": self.profile.energy_j,
            "rng": self.rng.bit_generator.state,
            "sieve": {k: v for k, v in sieve_state.items() if not isinstance(v, np.ndarray)},
            "stage_profiles": {str(k): asdict(p) for k, p in self.stage_profiles.items()},
            "bundle_sha": {rel: e["sha256"] for rel, e in self.bundle.manifest["files"].items()},
        }
        return meta, arrays

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray], suffix_state: Path) -> None:
        if meta["bundle_sha"] != {rel: e["sha256"] for rel, e in self.bundle.manifest["files"].items()}:
            raise RunError("the bundle changed since this run started (its sha256 table differs); "
                           "resume with the original bundle or start a new run")
        self.epoch, self.position = meta["epoch"], meta["position"]
        self.stage_pos, self.batch_size = meta["stage_pos"], meta["batch_size"]
        self.lr_scale, self.rollbacks = meta["lr_scale"], meta["rollbacks"]
        self.history, self.events, self.plan = meta["history"], meta["events"], meta["plan"]
        self.initial_eval, self.status = meta["initial_eval"], meta["status"]
        self.energy_offset_j = meta["energy_j"]
        self.global_peak_mb = meta["global_peak_mb"]
        self.rng.bit_generator.state = meta["rng"]
        sieve_state = dict(meta["sieve"])
        sieve_state.update({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("sieve/")})
        self.sieve.load_state_dict(sieve_state)
        self.order = arrays.get("order")
        self.frozen_params = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("frozen/")}
        self.stage_profiles = {int(k): StageProfile(**v) for k, v in meta["stage_profiles"].items()}
        self.trainer = self.suffix_class(self.bundle.stage(self.stage_k), self.threads, suffix_state)
        self.trainer.momentum_buffers = {k.split("/", 1)[1]: v for k, v in arrays.items()
                                         if k.startswith("momentum/")}
        self._build_prefix()
        self._new_cache()

    def save(self) -> None:
        self.meter.update(force=True)
        meta, arrays = self.state()
        checkpoint.write(self.out, meta, arrays, self.trainer.save)
        checkpoint.write_metrics(self.out, self.history, self._stage_summaries())

    def _stage_summaries(self) -> list[dict]:
        return [summarise_stage(p, self.meter.measured) for _, p in sorted(self.stage_profiles.items())]

    # --- the run --------------------------------------------------------------------------
    def setup(self, state: tuple[dict, dict, Path] | None = None) -> None:
        if state is None:
            self.meter = EnergyMeter(self.profile.sensor, self.profile.idle_w, self.profile.busy_w,
                                     self.profile.cores)
            self.trainer = self.suffix_class(self.bundle.stage(self.stage_k), self.threads)
            self._build_prefix()
            self._new_cache()
            plan = self.plan_batch()
            self.batch_size = plan.batch_size
            self.log(f"plan: batch {plan.batch_size} (predicted peak {plan.predicted_peak_mb:.0f} MB of "
                     f"{self.profile.memory_mb:.0f} MB), stages {self.starts}, Δτ {self.delta_tau}, "
                     f"prefix on {self.prefix.name}, suffix on {self.trainer.name}, cache {self.cache.location}, "
                     f"energy {self.meter.source}")
            self.initial_eval = self.evaluate()
            self.log(f"before on-device training: val acc {self.initial_eval['val_acc']:.4f}")
            self.save()
        else:
            meta, arrays, ort = state
            self.load_state(meta, arrays, ort)
            self.meter = EnergyMeter(self.profile.sensor, self.profile.idle_w, self.profile.busy_w,
                                     self.profile.cores, offset_j=self.energy_offset_j)

    def run(self) -> dict:
        energy_budget = self.profile.energy_j
        while self.epoch < self.config.epochs:
            if self.energy_exhausted(energy_budget):
                return self._stop_for_energy()
            if self.position == 0 and self.order is None:
                due = schedule.stage_at(self.starts, self.epoch)
                while self.stage_pos < due:
                    self._enter_stage(self.stage_pos + 1)
                    budget.reset_peak()
                self.order = self.train_idx[self.rng.permutation(self.sieve.active_indices)]
                self.save()
            outcome = self._train_epoch(energy_budget)
            if outcome == "energy":
                return self._stop_for_energy()
            if outcome == "epoch":
                self._end_epoch()
        self.status = "finished"
        self.save()
        return self.report()

    def energy_exhausted(self, energy_budget) -> bool:
        return energy_budget is not None and self.meter.update(force=True) >= energy_budget

    def _stop_for_energy(self) -> dict:
        self.status = "stopped: energy budget reached"
        self._event("energy", f"energy budget {self.profile.energy_j:g} J reached "
                    f"({self.meter.joules:.1f} J, {self.meter.source}); checkpointed and stopped")
        self.save()
        return self.report()

    def _train_epoch(self, energy_budget) -> str:
        """Train the rest of this epoch: "epoch" when done, "energy" at the budget,
        "rollback" after a non-finite loss restored the last checkpoint."""
        k = self.stage_k
        profile = self.stage_profiles.setdefault(k, StageProfile(k))
        since_checkpoint = 0
        while self.position < self.order.size:
            started = time.perf_counter()
            energy_before = self.meter.joules
            idx = self.order[self.position:self.position + self.batch_size]
            features, hits, t_data, t_prefix = self._features(idx)
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
            self._check_memory(profile)
            self.meter.update(force=energy_budget is not None)  # exact per step under a budget
            profile.energy_j += self.meter.joules - energy_before
            profile.wall_s += time.perf_counter() - started
            since_checkpoint += 1
            if since_checkpoint >= self.checkpoint_every and self.position < self.order.size:
                self.save()
                since_checkpoint = 0
            # Stop before a step that would cross the budget (the next costs about the last).
            step_j = self.meter.joules - energy_before
            if energy_budget is not None and self.meter.joules + step_j >= energy_budget:
                return "energy"
        return "epoch"

    def _check_memory(self, profile: StageProfile) -> None:
        peak = budget.peak_rss_mb()
        profile.peak_rss_mb = max(profile.peak_rss_mb, peak)
        self.global_peak_mb = max(self.global_peak_mb, peak)
        limit = self.profile.memory_mb
        if peak > limit:
            self._event("budget_exceeded", f"peak RSS {peak:.0f} MB exceeded the {limit:.0f} MB budget")
        soft = limit * (1.0 - self.profile.headroom / 2)
        if peak <= soft:
            return
        if self.cache is not None and self.cache.enabled and self.cache.location == "memory":
            self.cache.drop()
            self._event("memory", f"peak RSS {peak:.0f} MB near the {limit:.0f} MB budget: feature cache dropped")
        elif self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self._event("memory", f"peak RSS {peak:.0f} MB near the {limit:.0f} MB budget: batch "
                        f"halved to {self.batch_size}")
        budget.reset_peak()

    def _rollback(self, loss: float) -> None:
        """NaN/inf loss: reload the last checkpoint and halve the learning rate."""
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise RunError(f"loss was {loss} again after {MAX_ROLLBACKS} rollbacks with halved LR; "
                           "lower --lr or check the data; the last good checkpoint is kept")
        scale, rollbacks, events = self.lr_scale * 0.5, self.rollbacks, self.events
        meta, arrays, ort = checkpoint.read(self.out)
        self.load_state(meta, arrays, ort)
        self.lr_scale, self.rollbacks = scale, rollbacks
        self.events = events
        self._event("nan", f"loss {loss} at epoch {self.epoch}: rolled back to the last checkpoint "
                    f"(epoch {self.epoch}, sample {self.position}) and lowered the LR to x{scale:g}")
        self.save()

    def _end_epoch(self) -> None:
        k = self.stage_k
        evaluation = self.evaluate()
        boundary = (self.epoch + 1) % self.delta_tau == 0
        changed, swapped = {}, 0
        if boundary:
            fraction = dst.update_fraction(self.dst_fraction, self.epoch, self.config.epochs)
            changed = dst.apply_update(self.trainer, fraction, self.rng, self.dst_algorithm)
            swapped = int(self.sieve.update().moved_in.size)
        sparsity = dst.sparsity_report(self.trainer)
        record = {
            "epoch": self.epoch + 1, "stage": k, **evaluation,
            "lr": {str(b): lr for b, lr in self.lrs(self.epoch).items() if b >= k},
            "batch_size": self.batch_size, "samples": int(self.order.size),
            "mask_update": boundary, "regrown": int(sum(changed.values())), "sieve_swapped": swapped,
            "sparsity": sparsity["sparsity"], "masked_nonzero": sparsity["masked_nonzero"],
            "peak_rss_mb": round(self.global_peak_mb, 1), "energy_j": round(self.meter.update(force=True), 3),
            "energy_measured": self.meter.measured, "cache_mb": round(self.cache.size_mb, 2) if self.cache else 0.0,
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
        self.save()

    def report(self) -> dict:
        from .report import build_report, write_report
        report = build_report(self)
        write_report(self.out, report)
        return report


def start(config: RunConfig, log=print) -> Runner:
    out = Path(config.out or "runs/device")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"--out {out} already holds files; use --resume {out} to continue it or "
                       "choose a new folder")
    runner = Runner(config, out, log)  # checks bundle, profile and data before writing anything
    out.mkdir(parents=True, exist_ok=True)
    runner.setup()
    return runner


def resume(out: Path, log=print, energy_budget_j: float | None = None) -> Runner:
    out = Path(out)
    meta, arrays, ort = checkpoint.read(out)
    config = RunConfig.from_dict(meta["config"])
    if energy_budget_j is not None:
        config = replace(config, energy_budget_j=energy_budget_j)
        meta["config"] = config.to_dict()
    if meta["status"] == "finished":
        raise RunError(f"run {out} already finished its {config.epochs} epochs; start a new run "
                       "from its report or raise --epochs in a new run")
    runner = Runner(config, out, log)
    runner.setup((meta, arrays, ort))
    stopped_at = meta.get("energy_budget_j")
    if meta["status"].startswith("stopped: energy") and (
            runner.energy_exhausted(runner.profile.energy_j)
            or (stopped_at is not None and runner.profile.energy_j is not None
                and runner.profile.energy_j <= stopped_at)):
        raise BudgetError(f"run {out} stopped at its energy budget ({runner.profile.energy_j:g} J, "
                          f"{meta['energy_j']:.1f} J used); raise budgets.energy_j in the profile to continue")
    runner.status = "running"
    log(f"resumed {out} at epoch {runner.epoch + 1}, sample {runner.position} (stage {runner.stage_k})")
    return runner


def dry_run(config: RunConfig, log=print) -> dict:
    """Plan without training: batch size, stages, predicted memory and energy, or why not."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(config, Path(tmp), log, dry_run=True)
        runner.meter = EnergyMeter(runner.profile.sensor, runner.profile.idle_w, runner.profile.busy_w,
                                   runner.profile.cores)
        runner.trainer = runner.suffix_class(runner.bundle.stage(runner.stage_k), runner.threads)
        runner._build_prefix()
        runner._new_cache()
        plan = runner.plan_batch()
        batch = plan.batch_size
        started = time.perf_counter()
        runner.measure_peak(batch, steps=2)
        step_s = (time.perf_counter() - started) / 2
        samples = runner.sieve.active_indices.size
        seconds_per_epoch = step_s * math.ceil(samples / batch)
        joules = runner.profile.busy_w * seconds_per_epoch * config.epochs
        result = {"batch_size": batch, "predicted_peak_mb": round(plan.predicted_peak_mb, 1),
                  "memory_budget_mb": runner.profile.memory_mb, "per_sample_mb": round(plan.per_sample_mb, 3),
                  "stages": runner.starts, "delta_tau": runner.delta_tau, "prefix": runner.prefix.name,
                  "prefix_choice": runner.prefix_choice, "suffix_choice": runner.suffix_choice,
                  "cache": runner.cache.location,
                  "data": runner.data.source, "train_samples_per_epoch": int(samples),
                  "predicted_epoch_s_first_stage": round(seconds_per_epoch, 2),
                  "predicted_energy_j": round(joules, 1), "energy_budget_j": runner.profile.energy_j,
                  "energy_source": runner.meter.source}
        lines = [f"plan for {runner.bundle.model_name} on {runner.profile.name}:",
                 f"  batch {batch}: predicted peak RSS {plan.predicted_peak_mb:.0f} MB of "
                 f"{runner.profile.memory_mb:.0f} MB ({plan.base_mb:.0f} MB base + "
                 f"{plan.per_sample_mb:.2f} MB/sample; {plan.reason})",
                 f"  stages (k, first epoch): {runner.starts}; Δτ {runner.delta_tau} epoch(s)",
                 f"  prefix: {runner.prefix_choice}; feature cache: {runner.cache.location}",
                 f"  suffix: {runner.suffix_choice}",
                 f"  {samples} samples/epoch from {runner.data.source}: about {seconds_per_epoch:.1f} s/epoch "
                 f"in the first stage; {config.epochs} epoch(s) about {joules:.0f} J at busy power "
                 f"{runner.profile.busy_w:g} W"]
        if runner.profile.energy_j is not None and joules > runner.profile.energy_j:
            lines.append(f"  energy: the budget {runner.profile.energy_j:g} J ends the run early "
                         f"(after about {runner.profile.energy_j / joules * config.epochs:.1f} epochs); "
                         "it checkpoints and stops cleanly")
        log("\n".join(lines))
        return result
