"""The SpFDE training loop, readable top to bottom.

Each epoch: (1) at Δτ boundaries freeze the next block, start a prune-and-grow update and
sieve the data, (2) train on the active set, (3) finish the mask update, (4) evaluate,
account FLOPs and memory, checkpoint. The method's pieces live in their own modules; this
file only calls them at the points the paper names.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import cost
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint,
                         write_json, write_jsonl)
from .config import ConfigError, TrainConfig
from .data import DatasetSplit, iterate_batches, load_dataset, stratified_subset
from .freezing import Freezer, block_active_epochs, block_lr, freeze_schedule
from .distributed import (DistContext, all_gather_rows, all_reduce_mean_, all_reduce_sum, barrier,
                          check_launcher, gather_strings, init_from_env, state_hash)
from .models import BlockModel, create_model, slowest_bn_momentum
from .pretrained import load_initial_weights
from .sieve import DataSieve
from .sparsity.dst import UpdateSchedule, dense_gradient, get_algorithm
from device_runner import run_lock
from device_runner.errors import RunError
from device_runner.files import remove_stale_temporaries
from device_runner.method.schedule import is_interval_boundary
from .sparsity.masks import MaskSet

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return device


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class EpochResult:
    loss: float
    train_acc: float
    samples: int
    batches: int


class Trainer:
    """Holds every stateful piece of a run; ``state_dict`` makes resume exact."""

    def __init__(self, config: TrainConfig, out: Path, data: DatasetSplit | None = None,
                 dist_ctx: DistContext | None = None, device: torch.device | None = None,
                 initial_weights: bool = True):
        """``initial_weights=False`` on resume: the checkpoint, not --init-from, has the weights."""
        self.config = config.validate()
        self.out = Path(out)
        self.dist = dist_ctx or DistContext()
        self.device = device or resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.data = data if data is not None else load_dataset(
            config.dataset, data_dir=config.data_dir, download=config.download,
            input_size=config.input_size, val_fraction=config.val_fraction, seed=config.seed,
            synthetic_size=config.synthetic_size, cache_dir=config.cache_dir)
        if config.train_subset is not None:
            self.data.train = stratified_subset(self.data.train, config.train_subset, config.seed)
        # Explicit randomness: model init under a forked global RNG, everything else
        # from generators that are saved in the checkpoint.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model: BlockModel = create_model(config.model, num_classes=self.data.num_classes,
                                                  width=config.width, cifar_stem=config.cifar_stem,
                                                  bn_momentum=config.bn_momentum)
        self.init_report = None
        if config.init_from is not None and initial_weights:
            self.init_report = load_initial_weights(self.model, Path(config.init_from))
        # Every rank draws the same streams: data order, masks and growth stay in lockstep.
        self.data_generator = torch.Generator().manual_seed(config.seed + 1)
        self.mask_generator = torch.Generator().manual_seed(config.seed + 2)   # initial masks
        self.growth_rng = np.random.default_rng(config.seed + 5)              # prune-and-grow

        size = self.data.input_size
        self.profile = cost.profile_model(self.model, (3, size, size))
        if self.init_report is not None:   # trained weights say which connections matter
            self.masks = MaskSet.magnitude(self.model, config.sparsity, config.distribution)
        else:
            self.masks = MaskSet.random(self.model, config.sparsity, config.distribution,
                                        self.mask_generator)
        self.model.to(self.device)
        self.masks.apply(self.model)
        self.masks.attach(self.model)
        self.target_densities = self.masks.layer_density()  # exact per-layer targets
        self.num_blocks = len(self.model.blocks)
        self.dst_schedule = UpdateSchedule(config.delta_tau, config.epochs, config.update_fraction)
        plan = freeze_schedule(epoch_flops_fn=self._expected_train_flops, epochs=config.epochs,
                               delta_tau=config.delta_tau, target_reduction=config.freeze_flops,
                               max_frozen_fraction=config.max_frozen_fraction,
                               num_blocks=self.num_blocks, strict=False)
        if plan.reduction < config.freeze_flops - 0.005 and self.dist.is_main:
            print(f"warning: --freeze-flops {config.freeze_flops:.0%} is out of reach in {config.epochs} "
                  f"epochs with --delta-tau {config.delta_tau}; freezing as much as allowed "
                  f"({plan.reduction:.1%}). Train longer or use a smaller --delta-tau to reach it.",
                  file=sys.stderr)
        self.freezer = Freezer(plan)
        self.active_epochs = block_active_epochs(plan, self.num_blocks, config.epochs)
        self.sieve = DataSieve(len(self.data.train), config.sieve, np.random.default_rng(config.seed + 4),
                               swap_fraction=config.sieve_swap)
        self.dst = get_algorithm(config.dst, lam=config.mest_lambda)
        self.optimizer = torch.optim.SGD(self._param_groups(0), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.ddp_model = self._wrap()
        self.criterion = nn.CrossEntropyLoss()
        self.epoch = 0
        self.history: list[dict] = []
        self.totals = {"train_flops": 0.0, "sparse_reference_flops": 0.0, "dense_reference_flops": 0.0,
                       "no_freeze_flops": 0.0, "wall_s": 0.0}

    # -- pieces the loop calls -------------------------------------------------------------
    def _expected_train_flops(self, num_frozen: int, epoch: int) -> float:
        """Per-sample training FLOPs the run will spend in ``epoch``: MEST's soft memory
        bound grows each trainable layer by the update fraction for its update epochs, so
        the freezing plan is computed on what the run really costs."""
        densities = dict(self.target_densities)
        if self.config.dst == "mest" and self.dst_schedule.is_update_epoch(epoch):
            growth = 1.0 + self.dst_schedule.fraction(epoch)
            for name in densities:
                if self.model.block_of_parameter(name) >= num_frozen:
                    densities[name] = min(1.0, densities[name] * growth)
        return cost.training_flops_per_sample(self.profile, densities, num_frozen).total

    def _param_groups(self, num_frozen: int) -> list[dict]:
        """One SGD group per trainable block, so each block follows its own cosine LR."""
        groups = []
        for index, block in enumerate(self.model.blocks):
            if index < num_frozen:
                continue
            params = [p for p in block.parameters()]
            if params:
                groups.append({"params": params, "block": index})
        return groups

    def _wrap(self) -> nn.Module:
        """DistributedDataParallel over the trainable blocks only. Re-wrapped at every
        freezing step, so frozen parameters leave gradient synchronisation and no rank
        waits for gradients that will never come."""
        if not self.dist.enabled:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _freeze_block(self, block_index: int) -> None:
        """Freeze blocks up to ``block_index``: they leave the optimizer with their state."""
        # Never undoes freezing: a checkpoint brought home from a device may be ahead of the plan.
        num_frozen = max(block_index + 1, self.model.num_frozen)
        self.model.freeze_prefix(num_frozen)
        keep = [g for g in self.optimizer.param_groups if g["block"] >= num_frozen]
        for group in self.optimizer.param_groups:
            if group["block"] < num_frozen:
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
        self.optimizer.param_groups = keep
        self.ddp_model = self._wrap()

    def _set_lrs(self, epoch_float: float) -> dict[int, float]:
        lrs = {}
        for group in self.optimizer.param_groups:
            group["lr"] = block_lr(self.config.lr, epoch_float, self.active_epochs[group["block"]],
                                   self.config.warmup_epochs)
            lrs[group["block"]] = group["lr"]
        return lrs

    def _frozen_names(self) -> set[str]:
        return {name for name in self.masks.masks
                if self.model.block_of_parameter(name) < self.model.num_frozen}

    def _dense_gradients(self) -> dict[str, torch.Tensor]:
        """RigL's growth criterion: the dense gradient on one batch of active samples."""
        x, y, _ = next(iter(iterate_batches(self.data.train, self.sieve.active_indices,
                                            self.config.batch_size, self.data_generator,
                                            self.config.augment, self.data.mean, self.data.std)))
        self.model.train()
        x, y = self._shard(x), self._shard(y)
        grads = dense_gradient(self.model, self.masks, lambda: self.criterion(self.model(x), y))
        all_reduce_mean_(list(grads.values()), self.dist)
        return grads

    def _shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (the whole batch on one process)."""
        if self.dist.enabled:
            tensor = torch.tensor_split(tensor, self.dist.world_size)[self.dist.rank]
        return tensor.to(self.device, non_blocking=True)

    def _dst_args(self, epoch: int, dense_grads) -> dict:
        return dict(maskset=self.masks, model=self.model, fraction=self.dst_schedule.fraction(epoch),
                    rng=self.growth_rng, optimizer=self.optimizer,
                    frozen_names=self._frozen_names(), dense_grads=dense_grads)

    def _train_epoch(self, epoch: int) -> EpochResult:
        config = self.config
        self.model.train()
        indices = self.sieve.active_indices
        batches = iterate_batches(self.data.train, indices, config.batch_size, self.data_generator,
                                  config.augment, self.data.mean, self.data.std)
        steps = math.ceil(len(indices) / config.batch_size)
        loss_sum, correct_sum, seen = 0.0, 0, 0
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=1.0, disable=not self.dist.is_main)
        for step, (x, y, idx) in enumerate(bar):
            check_launcher(self.dist)
            if len(idx) < self.dist.world_size:
                continue  # a last global batch too small to give every rank a sample
            self._set_lrs(epoch + step / steps)
            x, y = self._shard(x), self._shard(y)
            logits = self.ddp_model(x)
            loss = self.criterion(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                         "lower --lr (the last checkpoint is intact)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.masks.apply(self.model)
            correct = (logits.detach().argmax(1) == y)
            # Every rank records the whole global batch, so sieve states stay identical.
            all_correct = all_gather_rows(correct.to(torch.uint8), self.dist).cpu().numpy().astype(bool)
            self.sieve.record(idx.numpy(), all_correct)
            loss_sum += loss.item() * len(y)
            correct_sum += int(correct.sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct_sum / seen:.3f}", refresh=False)
        bar.close()
        loss_sum, correct_sum, seen = all_reduce_sum([loss_sum, correct_sum, seen], self.dist, self.device)
        return EpochResult(loss_sum / max(seen, 1), correct_sum / max(seen, 1), int(seen), steps)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float | None]:
        """Top-1 accuracy and loss on the held-out validation split (None without one)."""
        if len(self.data.val) == 0:
            return None, None
        self.model.eval()
        indices = np.arange(self.dist.rank, len(self.data.val), self.dist.world_size)
        loss_sum, correct = 0.0, 0
        for x, y, _ in iterate_batches(self.data.val, indices, max(self.config.batch_size, 256), None,
                                       False, self.data.mean, self.data.std):
            x, y = x.to(self.device), y.to(self.device)
            logits = self.model(x)
            loss_sum += self.criterion(logits, y).item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        correct, loss_sum = all_reduce_sum([correct, loss_sum], self.dist, self.device)
        return correct / len(self.data.val), loss_sum / len(self.data.val)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train to the configured epochs (or until ``stop_after`` epochs are done)."""
        config = self.config
        last = config.epochs if stop_after is None else min(stop_after, config.epochs)
        while self.epoch < last:
            epoch = self.epoch
            started = time.perf_counter()
            block = self.freezer.due(epoch)
            if block is not None:
                self._freeze_block(block)
            mask_update = config.dst != "static" and self.dst_schedule.is_update_epoch(epoch)
            dense_grad_samples = 0
            if mask_update:
                dense_grads = self._dense_gradients() if config.dst == "rigl" else None
                dense_grad_samples = config.batch_size if dense_grads is not None else 0
                self.dst.begin_update(**self._dst_args(epoch, dense_grads))
            sieve_update = config.sieve > 0 and is_interval_boundary(epoch, config.delta_tau)
            if sieve_update:
                self.sieve.update()

            densities_during = self.masks.layer_density()
            result = self._train_epoch(epoch)
            if mask_update:
                self.dst.end_update(**self._dst_args(epoch, None))
            self.masks.check(self.model)
            val_acc, val_loss = self.evaluate()
            wall_s = time.perf_counter() - started
            self.history.append(self._epoch_record(epoch, result, val_acc, val_loss, wall_s,
                                                   densities_during, dense_grad_samples))
            self.epoch += 1
            self.save()
            record = self.history[-1]
            if self.dist.is_main:
                print(f"epoch {epoch + 1:>4}/{config.epochs}  loss {record['loss']:.4f}  "
                  f"train {record['train_acc']:.3f}  val {'-' if val_acc is None else format(val_acc, '.3f')}"
                  f"  frozen {record['frozen_blocks']}"
                  f"  samples {record['samples']}  sparsity {record['sparsity']:.3f}  "
                  f"GFLOPs {record['train_flops'] / 1e9:.2f}  {wall_s:.1f}s", flush=True)
        summary = self.summary()
        if self.dist.is_main:
            write_json(self.out / SUMMARY_NAME, summary)
        barrier(self.dist)
        return summary

    def _epoch_record(self, epoch, result: EpochResult, val_acc, val_loss, wall_s, densities,
                      dense_grad_samples) -> dict:
        num_frozen = self.model.num_frozen
        per_sample = cost.training_flops_per_sample(self.profile, densities, num_frozen)
        # What the same epoch costs without freezing: had the frozen layers kept training,
        # MEST would have grown them too (the per-sample model equals the measured densities).
        no_freeze = self._expected_train_flops(0, epoch)
        dense_ref = cost.dense_train_flops_per_sample(self.profile).total
        n_train = len(self.data.train)
        epoch_flops = per_sample.total * result.samples + dense_ref * dense_grad_samples
        self.totals["train_flops"] += epoch_flops
        self.totals["no_freeze_flops"] += no_freeze * result.samples + dense_ref * dense_grad_samples
        self.totals["sparse_reference_flops"] += no_freeze * n_train + dense_ref * dense_grad_samples
        self.totals["dense_reference_flops"] += dense_ref * n_train
        self.totals["wall_s"] += wall_s
        memory = cost.training_memory_bytes(self.profile, self.masks.layer_density(), num_frozen,
                                            self.config.batch_size)
        return {
            "epoch": epoch + 1, "loss": result.loss, "train_acc": result.train_acc,
            "val_acc": val_acc, "val_loss": val_loss,
            "lr": {self.model.block_names[b]: lr for b, lr in
                   self._lrs_at(epoch + 1).items()},
            "sparsity": self.masks.sparsity(), "frozen_blocks": num_frozen,
            "samples": result.samples, "active_set": len(self.sieve.active_indices),
            "train_flops": epoch_flops, "train_flops_total": self.totals["train_flops"],
            "forward_flops": per_sample.forward * result.samples,
            "backward_flops": (per_sample.backward_input + per_sample.backward_weight) * result.samples,
            "memory_model_mb": memory.total_mb, "peak_rss_mb": peak_rss_mb(),
            "rss_mb": psutil.Process().memory_info().rss / 2**20, "wall_s": wall_s,
        }

    def _lrs_at(self, epoch_float: float) -> dict[int, float]:
        return {b: block_lr(self.config.lr, epoch_float, self.active_epochs[b], self.config.warmup_epochs)
                for b in range(self.model.num_frozen, self.num_blocks)}

    def summary(self) -> dict:
        t = self.totals
        memories = [r["memory_model_mb"] for r in self.history]
        last = self.history[-1] if self.history else {}
        return {
            "config": self.config.to_dict(), "epochs_done": self.epoch,
            "val_acc": last.get("val_acc"), "best_val_acc": max((r["val_acc"] for r in self.history if r["val_acc"] is not None), default=None),
            "train_flops": t["train_flops"],
            "dense_reference_flops": t["dense_reference_flops"],
            "sparse_reference_flops": t["sparse_reference_flops"],
            "reduction_vs_dense": 1 - t["train_flops"] / t["dense_reference_flops"] if t["dense_reference_flops"] else 0.0,
            "reduction_vs_sparse": 1 - t["train_flops"] / t["sparse_reference_flops"] if t["sparse_reference_flops"] else 0.0,
            "freeze_reduction": 1 - t["train_flops"] / t["no_freeze_flops"] if t["no_freeze_flops"] else 0.0,
            "freeze_target": self.config.freeze_flops,
            "freeze_plan": self.freezer.state_dict(),
            "forward_flops": sum(r["forward_flops"] for r in self.history),
            "backward_flops": sum(r["backward_flops"] for r in self.history),
            "samples_used": int(sum(r["samples"] for r in self.history)),
            "sieve_reduction": 1 - sum(r["samples"] for r in self.history) / (len(self.data.train) * max(self.epoch, 1)),
            "every_sample_used": bool(self.sieve.ever_used.all()),
            "memory_model_mb": {"average": float(np.mean(memories)) if memories else None,
                                "minimum": float(np.min(memories)) if memories else None},
            "peak_rss_mb": peak_rss_mb(), "wall_s": t["wall_s"],
            "final_sparsity": self.masks.sparsity(), "frozen_blocks": self.model.num_frozen,
        }

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
            "masks": self.masks.state_dict(), "num_frozen": self.model.num_frozen,
            "freeze_target": self.config.freeze_flops,
            "freeze_plan": self.freezer.state_dict(), "sieve": self.sieve.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_blocks": [g["block"] for g in self.optimizer.param_groups],
            "data_generator": self.data_generator.get_state(),
            "mask_generator": self.mask_generator.get_state(),
            "growth_rng": self.growth_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "history": self.history, "totals": self.totals,
            "block_names": self.model.block_names, "classes": self.data.classes,
            "mean": list(self.data.mean), "std": list(self.data.std), "input_size": self.data.input_size,
        }

    def load_state_dict(self, state: dict) -> None:
        saved_names = state.get("block_names")
        if saved_names != self.model.block_names:
            raise CheckpointError(f"checkpoint is for a model with blocks {saved_names[:3]}…, not "
                                  f"{self.config.model}; resume with the options it was written with")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit {self.config.model}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        self.masks.load_state_dict(state["masks"])
        self.freezer.load_state_dict(state["freeze_plan"])
        # The saved plan, not the one __init__ derived from the config, sets the LR curves, and the
        # saved normalisation is the model's (a device model keeps its bundle's): docs/device.md.
        self.active_epochs = block_active_epochs(self.freezer.plan, self.num_blocks, self.config.epochs)
        self.data.mean = tuple(state.get("mean", self.data.mean))
        self.data.std = tuple(state.get("std", self.data.std))
        self.model.freeze_prefix(state["num_frozen"])
        self.optimizer = torch.optim.SGD(self._param_groups(state["num_frozen"]), lr=self.config.lr,
                                         momentum=self.config.momentum,
                                         weight_decay=self.config.weight_decay)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ddp_model = self._wrap()
        self.sieve.load_state_dict(state["sieve"])
        self.data_generator.set_state(state["data_generator"])
        self.mask_generator.set_state(state["mask_generator"])
        if "growth_rng" not in state:
            raise CheckpointError("this checkpoint was written before prune-and-grow moved to the shared "
                                  "numpy rules, so its growth stream cannot continue exactly; export it "
                                  "(python -m spfde_edge.export --checkpoint ...) or start a new run")
        self.growth_rng.bit_generator.state = state["growth_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.totals = dict(state["totals"])

    def lockstep_hash(self) -> str:
        """Digest of the state every rank must agree on: masks and the sieve's sets."""
        tensors = [self.masks.masks[name] for name in sorted(self.masks.masks)]
        tensors += [torch.from_numpy(np.ascontiguousarray(self.sieve.active_indices)),
                    torch.from_numpy(np.ascontiguousarray(self.sieve.removed_queue))]
        return state_hash(tensors)

    def save(self) -> None:
        """Checkpoint first (rank 0 only), then metrics rewritten from the checkpoint's own
        history, so a kill at any moment leaves exactly one metrics line per completed epoch
        after resume. Under DDP the ranks first prove they hold the same masks and sieve."""
        hashes = gather_strings(self.lockstep_hash(), self.dist)
        if len(set(hashes)) != 1:
            raise RuntimeError(f"ranks disagree on masks/sieve state after epoch {self.epoch}: {hashes}")
        if self.dist.enabled:
            self.history[-1]["rank_state_hashes"] = hashes
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.out / CHECKPOINT_NAME, self.state_dict())
            write_jsonl(self.out / METRICS_NAME, self.history)
        barrier(self.dist)


SHORT_RUN_BN_MOMENTUM = 0.1   # PyTorch's default; the built-in models use it

RESUME_MAY_CHANGE = {"device", "threads"}  # where a run executes, not what it computes


def _distributed(config: TrainConfig) -> tuple[DistContext, torch.device]:
    return init_from_env(resolve_device(config.device))


def _lock(out: Path) -> run_lock.RunLock:
    """Rank 0's exclusive lock on the run folder (another process using it is refused, naming its
    pid), then the temporaries a killed write left behind are removed."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = run_lock.acquire(out)
    except RunError as exc:
        raise CheckpointError(str(exc)) from None
    remove_stale_temporaries(out)
    return lock


def start(config: TrainConfig, out: Path) -> Trainer:
    """A new run in ``out``; refuses a folder that already holds one or is in use."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a folder for the run")
    lock = _lock(out) if out.is_dir() and any(out.iterdir()) else None  # in use? named before the rest
    try:
        if (out / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{out} already holds a run; continue it with --resume {out} "
                                  "or choose another --out")
        ctx, device = _distributed(config.validate())
        trainer = Trainer(config, out, dist_ctx=ctx, device=device)  # checks data before writing
        if lock is None and ctx.is_main:
            lock = _lock(out)
            if (out / CHECKPOINT_NAME).exists():  # another start won the race for this folder
                raise CheckpointError(f"{out} already holds a run; continue it with --resume {out} "
                                      "or choose another --out")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.run_lock = lock  # held while the trainer lives; released by the kernel at exit
    if trainer.init_report is not None and ctx.is_main:
        print(trainer.init_report.line())
    slowest = slowest_bn_momentum(trainer.model)
    if slowest is not None and slowest < SHORT_RUN_BN_MOMENTUM and config.epochs < 100 and ctx.is_main:
        print(f"warning: {config.model} moves its BatchNorm running statistics with momentum {slowest:g} "
              f"(set for schedules of hundreds of epochs); in {config.epochs} epochs they lag the weights "
              f"and evaluation suffers: pass --bn-momentum {SHORT_RUN_BN_MOMENTUM:g} (docs/models.md)",
              file=sys.stderr)
    torch.manual_seed(config.seed + 3)  # dropout (mobilenet_v2) draws from the global RNG
    return trainer


def resume(out: Path, overrides: dict | None = None) -> Trainer:
    """Continue the run saved in ``out`` exactly where its last checkpoint left it, with any
    number of processes (the saved state does not depend on the world size)."""
    state = load_checkpoint(out)
    config = TrainConfig.from_dict(state["config"])
    for key, value in (overrides or {}).items():
        if key in RESUME_MAY_CHANGE:
            config = config.replace(**{key: value})
        elif getattr(config, key) != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value} differs from the run in {out} "
                              f"({getattr(config, key)}); drop it or start a new run")
    ctx, device = _distributed(config)
    lock = _lock(Path(out)) if ctx.is_main else None
    try:
        trainer = Trainer(config, Path(out), dist_ctx=ctx, device=device, initial_weights=False)
        trainer.load_state_dict(state)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.run_lock = lock
    if trainer.epoch >= config.epochs and ctx.is_main:
        print(f"{out} already finished {trainer.epoch} epochs; nothing to do")
    return trainer
