"""Bundle format 2 on plain ONNX Runtime: the model as a chain of per-block programs.

Each block has four standard-ONNX programs (spfde_edge/export/block_programs.py): ``infer``
(eval mode), ``train`` (forward in train mode, returning the updated BatchNorm statistics
and the tensors its backward needs), ``backward`` and ``backward_first`` (the same without
``grad_x``). Parameters and running statistics are program inputs fed from the one
:class:`~device_runner.model_state.ModelState`, so

* a frozen prefix is :class:`InferChain` over blocks ``[0, k)``, and the trainer of stage
  ``k`` is :class:`BlockChainTrainer` over blocks ``[k, n)``: freezing at any block
  boundary costs no export and no bridge graph;
* a stage change creates only the sessions it has not used yet (:class:`BlockSessions`),
  usually one (``backward_first`` of the new first trainable block).

The graphs hold no masks: masked weights are exact zeros in the state, the programs
return the dense gradient of the effective weight, and the SGD step multiplies it by the
mask (``method/sgd.py``), so masked weights stay exactly zero. The loss is computed once,
in numpy (``method/loss.py``), on the last block's logits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._ort import inference_options, onnxruntime

from ..bundle import DeviceBlock, Stage
from ..errors import BundleError
from ..method.loss import cross_entropy
from ..model_state import ModelState
from .state_suffix import StateSuffix

X, Y, GRAD_Y, GRAD_X = "x", "y", "grad_y", "grad_x"
NEW_SUFFIX, GRAD_SUFFIX, SAVED_PREFIX = ".new", ".grad", "saved."
TRAINING_PROGRAMS = ("train", "backward", "backward_first")


@dataclass
class _Binding:
    """Block ``index``'s use of one program: the program names tensors as the block does
    (``conv1.weight``, ``bn1.running_mean.new``), so blocks of one structure share its file."""

    session: object
    feeds: list[tuple[str, str, bool]]   # (graph input, where from, from the state?)
    outputs: list[str]                   # model names: blocks.<i>.… for state, else as the graph says


def _is_activation(name: str) -> bool:
    return name in (X, Y, GRAD_Y, GRAD_X) or name.startswith(SAVED_PREFIX)


class BlockSessions:
    """ONNX Runtime sessions of the block programs, one per program file, created on first use
    (blocks of the same structure share one file and so one session)."""

    def __init__(self, threads: int | None, profile_prefix: str | None = None):
        self.threads = threads
        self.profile_prefix = profile_prefix     # ONNX Runtime's profiler on every session (benchmarks)
        self._sessions: dict[Path, object] = {}
        self._bindings: dict[tuple[int, str], _Binding] = {}

    def __len__(self) -> int:
        """Sessions alive."""
        return len(self._sessions)

    def _session(self, block: DeviceBlock, kind: str):
        path = block.program(kind)
        if path not in self._sessions:
            options = inference_options(self.threads)
            # A step runs many sessions one after another, each with its own thread pool. A pool
            # that keeps spinning after its Run (ORT's default) takes a core from the next
            # session: 1.7x slower on two cores (resnet18 x0.5 suffix, batch 32). Spinning only
            # inside Run keeps ORT's fast wake-ups (no spinning at all: 1.5x slower).
            options.add_session_config_entry("session.force_spinning_stop", "1")
            if self.profile_prefix:
                options.enable_profiling = True
                options.profile_file_prefix = f"{self.profile_prefix}-{path.parent.name}-{kind}"
            try:
                self._sessions[path] = onnxruntime.InferenceSession(
                    os.fspath(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types per failure
                raise BundleError(f"ONNX Runtime cannot load block {block.index}'s {kind}.onnx "
                                  f"({path}): {str(exc).splitlines()[0][:300]}; re-export the bundle") from exc
        return self._sessions[path]

    def binding(self, block: DeviceBlock, kind: str, state: ModelState) -> _Binding:
        key = (block.index, kind)
        if key not in self._bindings:
            session = self._session(block, kind)
            local = f"blocks.{block.index}."
            feeds = [(i.name, i.name, False) if _is_activation(i.name) else (i.name, local + i.name, True)
                     for i in session.get_inputs()]
            missing = [name for _, name, stored in feeds if stored and name not in state.weights]
            if missing:
                raise BundleError(f"block {block.index}'s {kind}.onnx reads {missing[:3]}, which the "
                                  "weight store does not hold; re-export the bundle")
            outputs = [o.name if _is_activation(o.name) else local + o.name for o in session.get_outputs()]
            self._bindings[key] = _Binding(session, feeds, outputs)
        return self._bindings[key]

    def run(self, block: DeviceBlock, kind: str, activations: dict[str, np.ndarray],
            state: ModelState) -> dict[str, np.ndarray]:
        """Outputs (by model name) of block ``block``'s ``kind`` program on ``activations`` and
        the state arrays it reads, fed as they are: ONNX Runtime reads contiguous float32 numpy
        inputs without copying them."""
        binding = self.binding(block, kind, state)
        feeds = {graph: state.weights[name] if stored else activations[name]
                 for graph, name, stored in binding.feeds}
        return dict(zip(binding.outputs, binding.session.run(None, feeds)))

    def end_profiling(self) -> list[str]:
        """Write every session's profile (``profile_prefix`` set) and return the JSON files."""
        return [session.end_profiling() for session in self._sessions.values()]

    def release(self, index: int, kinds=TRAINING_PROGRAMS) -> None:
        """Forget block ``index``'s ``kinds`` (a frozen block never trains again); a session
        goes when no block uses its program any more."""
        for kind in kinds:
            self._bindings.pop((index, kind), None)
        used = {binding.session for binding in self._bindings.values()}
        self._sessions = {path: s for path, s in self._sessions.items() if s in used}


def _activation(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class InferChain:
    """Blocks ``blocks`` one after the other in eval mode: ``forward(x) -> y``."""

    def __init__(self, blocks, state: ModelState, sessions: BlockSessions):
        self.blocks = tuple(blocks)
        self.state, self.sessions = state, sessions

    @property
    def name(self) -> str:
        if not self.blocks:
            return "onnxruntime (no blocks)"
        return f"onnxruntime blocks {self.blocks[0].index}..{self.blocks[-1].index}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _activation(x)
        for block in self.blocks:
            x = self.sessions.run(block, "infer", {X: x}, self.state)[Y]
        return x


class BlockChainTrainer(StateSuffix):
    """The suffix of stage ``stage.k`` (blocks ``[k, n)``) trained block by block.

    The trainer interface of backends/__init__.py; parameters, masks and running statistics
    are the state's arrays (state_suffix.py: ``get_parameter`` copies, ``set_parameter``
    writes in place).
    """

    name = "onnxruntime block chain"

    def __init__(self, stage: Stage, blocks, state: ModelState, sessions: BlockSessions, checkpoint=None):
        self.stage = stage
        self.blocks: tuple[DeviceBlock, ...] = tuple(blocks[stage.k:])
        self.state, self.sessions = state, sessions
        self.trainable = list(stage.parameters)
        self.masked = {w for _, w in stage.masks}
        self._names = self.trainable + [m for m, _ in stage.masks] + \
            [r for b in self.blocks for r in b.running_stats]
        self.eval_chain = InferChain(self.blocks, state, sessions)
        self.grads: dict[str, np.ndarray] = {}
        self.momentum_buffers: dict[str, np.ndarray] = {}
        if checkpoint is not None:
            self.load(checkpoint)

    def gradient(self, name: str) -> np.ndarray | None:
        """The last step's gradient of trainable ``name``; for a masked weight zero where the
        mask is 0 (those positions do not train), as the format-1 graphs return it."""
        grad = self.grads.get(name)
        if grad is None:
            return None
        return grad * self.state.masks[name] if name in self.masked else np.array(grad, copy=True)

    # --- steps -----------------------------------------------------------------------------
    def train_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward in train mode (running statistics updated in the state), cross entropy,
        backward block by block; gradients kept for :meth:`sgd_step`."""
        # The last step's gradients go first: kept through this step's forward, they were the
        # largest avoidable share of peak RSS (resnet18 k=5, batch 32: 40 MB of ~390).
        self.grads = {}
        x = _activation(features)
        tapes = []                                   # per block: what its backward reads
        for block in self.blocks:
            out = self.sessions.run(block, "train", {X: x}, self.state)
            for name in block.running_stats:
                np.copyto(self.state.weights[name], out[name + NEW_SUFFIX])
            tape = {n: out[n] for n in block.saved}
            if block.backward_needs_input:
                tape[X] = x
            tapes.append(tape)
            x = out[Y]
        loss, grad = cross_entropy(x, labels)
        grads = {}
        for position in range(len(self.blocks) - 1, -1, -1):
            block = self.blocks[position]
            kind = "backward_first" if position == 0 else "backward"
            out = self.sessions.run(block, kind, {**tapes[position], GRAD_Y: grad}, self.state)
            tapes[position] = None                   # free what this block saved
            for name in block.parameters:
                grads[name] = out[name + GRAD_SUFFIX]
            if position:
                grad = out[GRAD_X]
        self.grads = grads
        return loss, x

    def sgd_step(self, lr_of_block: dict[int, float], momentum: float, weight_decay: float) -> None:
        self._sgd(((name, self.grads[name]) for name in self.trainable if name in self.grads),
                  lr_of_block, momentum, weight_decay)

    def eval_step(self, features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        logits = self.eval_chain.forward(features)
        return cross_entropy(logits, labels)[0], logits

    def release(self) -> None:
        """Before a stage change: nothing to hand back (a format-2 trainer that lends the state
        its own buffers, like ORT training's, copies them back here)."""
