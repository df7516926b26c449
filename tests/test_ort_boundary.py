"""Bundle format 2 on ONNX Runtime's training build (device_runner/backends/ort_boundary.py):
each boundary's weightless artifacts, the checkpoint written from the one model state, agree
with the block chain and with PyTorch at every block boundary of resnet32 and resnet18;
freezing at any boundary keeps the logits; the weights stay one copy.

Block programs and the sparse model come from test_block_chain.py's ``case`` fixture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training")

from test_block_chain import case, torch_step, trainer_at  # noqa: E402,F401  (case is a fixture)

from device_runner.backends.ort_boundary import OrtBoundaryTrainer  # noqa: E402
from device_runner.bundle import block_stage  # noqa: E402
from device_runner.manifest import BatchNormEntry, OrtBoundary  # noqa: E402
from device_runner.model_state import ModelState  # noqa: E402


@pytest.fixture(scope="module")
def boundaries(case, tmp_path_factory):  # noqa: F811
    """(root, {k: OrtBoundary}) for every boundary of the case's model."""
    import torch

    from spfde_edge.export.ort_artifacts import export_training_artifacts

    root = tmp_path_factory.mktemp(f"ort-{case.name}")
    produced = export_training_artifacts(case.model, list(range(len(case.blocks))),
                                         torch.randn(2, *case.features[0].shape[1:]), root)
    entries = {}
    for k, art in produced.items():
        def rel(path: Path) -> str:
            return str(path.relative_to(root))

        entries[k] = OrtBoundary(
            k=k, training_model=rel(art.training_model), eval_model=rel(art.eval_model),
            optimizer_model=rel(art.optimizer_model), parameters=tuple(art.parameters), frozen=tuple(art.frozen),
            training_outputs=tuple(art.training_outputs), eval_outputs=tuple(art.eval_outputs),
            batchnorms=tuple(BatchNormEntry(**row) for row in art.batchnorms))
    return root, entries


def ort_trainer(case, boundaries, k: int, state: ModelState) -> OrtBoundaryTrainer:  # noqa: F811
    root, entries = boundaries
    return OrtBoundaryTrainer(block_stage(case.blocks, k, entries), entries[k], root, state, threads=2)


def test_one_step_agrees_with_pytorch_and_the_block_chain_at_every_boundary(case, boundaries):  # noqa: F811
    for k in range(len(case.blocks)):
        state = ModelState.load(case.store)
        trainer = ort_trainer(case, boundaries, k, state)
        loss, _ = trainer.train_step(case.features[k], case.labels)
        want_loss, want_grads, want_running = torch_step(case.model, k, case.features[k], case.labels)
        assert abs(loss - want_loss) / want_loss <= 1e-4, k
        got = np.concatenate([trainer.checkpoint_state.get_parameter(n).grad.numpy().ravel()
                              for n in trainer.trainable])
        want = np.concatenate([want_grads[n].ravel() for n in trainer.trainable])
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4, k
        for name, value in want_running.items():
            assert np.allclose(state.weights[name], value, rtol=1e-4, atol=1e-6), (k, name)

        chain_state = ModelState.load(case.store)
        chain_loss, _ = trainer_at(case, k, chain_state).train_step(case.features[k], case.labels)
        assert abs(chain_loss - loss) / loss <= 1e-5, k


def test_freezing_at_any_boundary_keeps_the_logits(case, boundaries):  # noqa: F811
    """Train a step at boundary k, then move to k + 1 as the device does (release, new trainer on
    the same state): the logits just before and just after the move are the same."""
    from device_runner.backends.block_chain import InferChain

    images = case.features[0]
    for k in range(len(case.blocks) - 1):
        state = ModelState.load(case.store)
        trainer = ort_trainer(case, boundaries, k, state)
        features = InferChain(case.blocks[:k], state, case.sessions).forward(images)
        trainer.train_step(features, case.labels)
        trainer.sgd_step({i: 0.05 for i in range(len(case.blocks))}, 0.9, 5e-4)
        _, before = trainer.eval_step(features, case.labels)
        trainer.release()
        successor = ort_trainer(case, boundaries, k + 1, state)
        moved = InferChain(case.blocks[:k + 1], state, case.sessions).forward(images)
        _, after = successor.eval_step(moved, case.labels)
        assert np.abs(after - before).max() <= 1e-5, k
        # Masked weights stay exactly zero through the ORT buffers.
        for name, mask in state.masks.items():
            assert not np.any(state.weights[name][mask == 0]), (k, name)


def test_the_state_holds_the_only_copy(case, boundaries):  # noqa: F811
    """The suffix's arrays in the state are ORT's own buffers while the trainer lives: an SGD
    step is seen through the state, and release() hands back arrays the state owns."""
    state = ModelState.load(case.store)
    k = len(case.blocks) // 2
    trainer = ort_trainer(case, boundaries, k, state)
    name = trainer.trainable[0]
    view = state.weights[name]
    assert not view.flags.owndata
    before = view.copy()
    trainer.train_step(case.features[k], case.labels)
    trainer.sgd_step({i: 0.1 for i in range(len(case.blocks))}, 0.0, 0.0)
    assert not np.array_equal(state.weights[name], before)
    assert np.array_equal(trainer.get_parameter(name), state.weights[name])
    trainer.release()
    assert state.weights[name].flags.owndata
    assert np.array_equal(state.weights[name], view)
