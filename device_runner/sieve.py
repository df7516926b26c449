"""Circular data sieving (SpFDE §3.3): train on an *active set*, rest waits in a *removed queue*.

Every ``delta_tau`` epochs the trainer calls :meth:`DataSieve.update`: the active samples
with the fewest forgetting events (correct -> wrong transitions) in the interval are
easiest, so they go to the tail of the removed queue, and as many samples come back from
its head. The active set keeps its size and, because the queue is circular, every sample
is trained on eventually.

All per-sample state lives in dense numpy arrays of length ``num_samples`` so that a
distributed trainer can all-reduce it (see :meth:`DataSieve.interval_state`) and so that
the device side can run the same code without torch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

STATE_VERSION = 1

# How a DDP trainer combines each array of ``interval_state()`` across ranks before update().
REDUCTIONS = {"forgetting": "sum", "seen": "max", "learned": "max", "prev_correct": "max"}


class SieveError(ValueError):
    """Invalid sieve options, observations or state."""


@dataclass(frozen=True)
class SieveUpdate:
    """What one update exchanged: ``moved_out`` went to the queue tail, ``moved_in`` came from its head."""

    moved_out: np.ndarray
    moved_in: np.ndarray


def merge_interval_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Reference (numpy) version of the all-reduce a DDP trainer does with :data:`REDUCTIONS`."""
    ops = {"sum": np.sum, "max": np.max}
    return {key: ops[op](np.stack([s[key] for s in states]), axis=0).astype(states[0][key].dtype)
            for key, op in REDUCTIONS.items()}


class DataSieve:
    """Active set + circular removed queue, driven by per-interval forgetting counts.

    ``removed_fraction`` of the samples start in the queue (random split). Each update
    exchanges ``max(1, round(swap_fraction * len(removed_queue)))`` samples; at least one,
    otherwise a small queue would never move and some samples would never be used.
    """

    def __init__(self, num_samples: int, removed_fraction: float, rng: np.random.Generator,
                 swap_fraction: float = 0.5):
        if not isinstance(rng, np.random.Generator):
            raise SieveError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                             "pass np.random.default_rng(seed)")
        if int(num_samples) != num_samples or num_samples < 1:
            raise SieveError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not 0.0 <= removed_fraction < 1.0:
            raise SieveError(f"removed_fraction must be in [0, 1), got {removed_fraction!r}; "
                             "use 0 to disable sieving")
        if not 0.0 < swap_fraction <= 1.0:
            raise SieveError(f"swap_fraction must be in (0, 1], got {swap_fraction!r}; "
                             "it is the fraction of the removed queue exchanged per update")
        num_samples = int(num_samples)
        num_removed = round(removed_fraction * num_samples)
        if num_removed >= num_samples:
            raise SieveError(f"removed_fraction={removed_fraction} removes all {num_samples} "
                             "samples; lower it so at least one sample stays active")
        self.num_samples = num_samples
        self.removed_fraction = float(removed_fraction)
        self.swap_fraction = float(swap_fraction)
        self._rng = rng
        order = rng.permutation(num_samples).astype(np.int64)
        self._queue = order[:num_removed]  # head first
        self._active = np.ones(num_samples, dtype=bool)
        self._active[self._queue] = False
        self._ever_used = self._active.copy()
        self._forgetting = np.zeros(num_samples, dtype=np.int64)
        self._seen = np.zeros(num_samples, dtype=bool)      # observed in this interval
        self._learned = np.zeros(num_samples, dtype=bool)   # predicted correctly in this interval
        self._prev_correct = np.full(num_samples, -1, dtype=np.int8)  # -1: never observed
        self._num_updates = 0

    # --- read-only views -------------------------------------------------------------
    @property
    def active_indices(self) -> np.ndarray:
        return np.flatnonzero(self._active).astype(np.int64)

    @property
    def removed_queue(self) -> np.ndarray:
        return self._queue.copy()

    @property
    def forgetting(self) -> np.ndarray:
        return self._forgetting.copy()

    @property
    def ever_used(self) -> np.ndarray:
        return self._ever_used.copy()

    @property
    def num_updates(self) -> int:
        return self._num_updates

    # --- observations ----------------------------------------------------------------
    def record(self, indices: np.ndarray, correct: np.ndarray) -> None:
        """Record one batch of per-sample training-prediction correctness, in batch order."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        correct = np.asarray(correct, dtype=bool).ravel()
        if indices.shape != correct.shape:
            raise SieveError(f"record got {indices.size} indices but {correct.size} correctness "
                             "values; pass one value per sample")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise SieveError(f"sample indices must be in [0, {self.num_samples}); "
                             "use the dataset's stable sample indices")
        if np.unique(indices).size != indices.size:
            # A sample twice in one batch (sampling with replacement): keep the order exact.
            for i in range(indices.size):
                self._observe(indices[i:i + 1], correct[i:i + 1])
        else:
            self._observe(indices, correct)

    def _observe(self, indices: np.ndarray, correct: np.ndarray) -> None:
        forgot = (self._prev_correct[indices] == 1) & ~correct
        self._forgetting[indices] += forgot
        self._seen[indices] = True
        self._learned[indices] |= correct
        self._prev_correct[indices] = correct

    # --- the Δτ step -----------------------------------------------------------------
    def update(self) -> SieveUpdate:
        """Swap the easiest observed active samples with the head of the removed queue."""
        empty = np.empty(0, dtype=np.int64)
        moved_out, moved_in = empty, empty
        if self._queue.size:
            swap = max(1, round(self.swap_fraction * self._queue.size))
            # Only samples seen this interval have a meaningful count (just-returned ones don't).
            eligible = np.flatnonzero(self._active & self._seen)
            score = self._forgetting[eligible].astype(np.float64)
            score[~self._learned[eligible]] = np.inf  # never learned = hardest
            tie_break = self._rng.random(eligible.size)
            ranked = eligible[np.lexsort((tie_break, score))]
            moved_out = ranked[:swap].astype(np.int64)
            moved_in = self._queue[:moved_out.size].copy()
            self._queue = np.concatenate([self._queue[moved_out.size:], moved_out])
            self._active[moved_out] = False
            self._active[moved_in] = True
            self._ever_used[moved_in] = True
            if self._ever_used.all():
                # After the first full circle the paper shuffles the queue each update.
                self._queue = self._rng.permutation(self._queue)
        self._forgetting[:] = 0
        self._seen[:] = False
        self._learned[:] = False
        self._num_updates += 1
        return SieveUpdate(moved_out=moved_out, moved_in=moved_in)

    # --- distributed training --------------------------------------------------------
    def interval_state(self) -> dict[str, np.ndarray]:
        """This rank's interval arrays, to all-reduce with :data:`REDUCTIONS` before update().

        ``forgetting`` sum; ``seen``, ``learned`` max (logical or, as int8 so NCCL can reduce
        them); ``prev_correct`` max, exported as -1 where this rank did not see the sample.
        Exact when each sample is observed by at most one rank per interval; otherwise a
        correct->wrong transition split across ranks is missed. For exact counts, all-gather
        (indices, correct) per batch and call record() on every rank instead.
        """
        return {
            "forgetting": self._forgetting.copy(),
            "seen": self._seen.astype(np.int8),
            "learned": self._learned.astype(np.int8),
            "prev_correct": np.where(self._seen, self._prev_correct, -1).astype(np.int8),
        }

    def set_interval_state(self, state: dict[str, np.ndarray]) -> None:
        """Install reduced arrays; samples no rank saw keep their (already shared) previous state."""
        for key in REDUCTIONS:
            if key not in state or np.shape(state[key]) != (self.num_samples,):
                raise SieveError(f"interval state needs '{key}' of shape ({self.num_samples},); "
                                 "pass the reduced output of interval_state()")
        self._forgetting = np.asarray(state["forgetting"], dtype=np.int64).copy()
        self._seen = np.asarray(state["seen"]).astype(bool)
        self._learned = np.asarray(state["learned"]).astype(bool)
        self._prev_correct = np.where(self._seen, state["prev_correct"],
                                      self._prev_correct).astype(np.int8)

    # --- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed for an exact resume, including the generator state."""
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "removed_fraction": self.removed_fraction,
            "swap_fraction": self.swap_fraction,
            "active": self._active.copy(),
            "removed_queue": self._queue.copy(),
            "ever_used": self._ever_used.copy(),
            "forgetting": self._forgetting.copy(),
            "seen": self._seen.copy(),
            "learned": self._learned.copy(),
            "prev_correct": self._prev_correct.copy(),
            "num_updates": self._num_updates,
            "rng_state": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise SieveError(f"sieve state version {state.get('version')!r} is not supported "
                             f"(expected {STATE_VERSION}); re-create the checkpoint")
        if state["num_samples"] != self.num_samples:
            raise SieveError(f"checkpoint sieve has {state['num_samples']} samples, this one "
                             f"{self.num_samples}; build the sieve for the same dataset")
        self.removed_fraction = float(state["removed_fraction"])
        self.swap_fraction = float(state["swap_fraction"])
        self._active = np.array(state["active"], dtype=bool)
        self._queue = np.array(state["removed_queue"], dtype=np.int64)
        self._ever_used = np.array(state["ever_used"], dtype=bool)
        self._forgetting = np.array(state["forgetting"], dtype=np.int64)
        self._seen = np.array(state["seen"], dtype=bool)
        self._learned = np.array(state["learned"], dtype=bool)
        self._prev_correct = np.array(state["prev_correct"], dtype=np.int8)
        self._num_updates = int(state["num_updates"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng_state"])
