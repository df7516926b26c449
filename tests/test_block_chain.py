"""Bundle format 2 on plain ONNX Runtime (device_runner/backends/block_chain.py): per-block
programs from ``export_block`` chained on the device give PyTorch's loss, gradients and
BatchNorm updates at every block boundary, freezing at any boundary does not change the
model, masked weights stay exactly zero, and the one model state is the only copy.

The programs come from tests/block_programs_cache.py (exported once per exporter version).
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from block_programs_cache import cache_key, export_model_blocks
from device_runner.backends.block_chain import BlockChainTrainer, BlockSessions, InferChain
from device_runner.bundle import DeviceBlock, block_stage
from device_runner.method.loss import cross_entropy
from device_runner.model_state import ModelState
from device_runner.weight_store import write_weights

torch = pytest.importorskip("torch")
F = torch.nn.functional

MODELS = {"resnet32": 0.25, "resnet18": 0.125}
SIZE, BATCH = 16, 6
GRAD_RTOL = 1e-4


def _device_blocks(meta: list[dict], masked: set[str]) -> tuple[DeviceBlock, ...]:
    blocks = []
    for row in meta:
        folder = Path(row["folder"])
        blocks.append(DeviceBlock(
            index=row["index"], name=f"block{row['index']}", input_shape=tuple(row["input_shape"]),
            output_shape=tuple(row["output_shape"]), parameters=tuple(row["parameters"]),
            running_stats=tuple(row["running_stats"]), masks=tuple(p for p in row["parameters"] if p in masked),
            infer=folder / "infer.onnx", train=folder / "train.onnx", backward=folder / "backward.onnx",
            backward_first=folder / "backward_first.onnx", backward_parameters=tuple(row["backward_parameters"]),
            backward_needs_input=row["backward_needs_input"], saved=tuple(row["saved"])))
    return tuple(blocks)


def _sparse_model(name: str, width: float):
    """The model with BatchNorm moved off its defaults and half of every weight matrix masked out."""
    from spfde_edge.models import create_model

    torch.manual_seed(1)
    model = create_model(name, width=width)
    gen = torch.Generator().manual_seed(2)
    masks = {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                masks[pname] = (torch.rand(p.shape, generator=gen) < 0.5)
                p.mul_(masks[pname])
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(1 + 0.3 * torch.rand(module.running_var.shape, generator=gen))
    return model, {n: m.numpy().astype(np.uint8) for n, m in masks.items()}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    name, width = request.param, MODELS[request.param]
    key = f"block-programs-{name}-{cache_key(name, width, SIZE)}"
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir(key)) if cache is not None else tmp_path_factory.mktemp(key)
    meta = export_model_blocks(name, width, SIZE, root)
    model, masks = _sparse_model(name, width)
    state_names = [r for row in meta for r in row["parameters"] + row["running_stats"]]
    tensors = {n: v.detach().numpy().astype(np.float32) for n, v in model.state_dict().items() if n in state_names}
    store = tmp_path_factory.mktemp(f"store-{name}") / "weights.safetensors"
    write_weights(store, tensors, masks)
    blocks = _device_blocks(meta, set(masks))
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    labels = np.arange(BATCH) % 10
    # Each boundary's input, from the float64 model in eval mode (what a frozen prefix gives).
    features, x = [], images.double()
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for block in model64.blocks:
            features.append(x.float().numpy())
            x = block(x)
    return SimpleNamespace(name=name, model=model, masks=masks, store=store, blocks=blocks, labels=labels,
                           features=features, sessions=BlockSessions(threads=2))


def trainer_at(case, k: int, state: ModelState) -> BlockChainTrainer:
    return BlockChainTrainer(block_stage(case.blocks, k), case.blocks, state, case.sessions)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def torch_step(model, k: int, features: np.ndarray, labels: np.ndarray):
    """Float64 PyTorch reference: blocks [k, n) in train mode on ``features``."""
    model64 = copy.deepcopy(model).double().train()
    x = torch.from_numpy(features).double()
    for block in model64.blocks[k:]:
        x = block(x)
    loss = F.cross_entropy(x, torch.from_numpy(labels))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model64.named_parameters() if int(n.split(".")[1]) >= k}
    running = {n: b.numpy() for n, b in model64.state_dict().items()
               if n.endswith(("running_mean", "running_var")) and int(n.split(".")[1]) >= k}
    return loss.item(), grads, running


def test_train_step_matches_pytorch_at_every_boundary(case):
    for k in range(len(case.blocks)):
        state = ModelState.load(case.store)
        trainer = trainer_at(case, k, state)
        loss, logits = trainer.train_step(case.features[k], case.labels)
        want_loss, want_grads, want_running = torch_step(case.model, k, case.features[k], case.labels)
        assert abs(loss - want_loss) <= GRAD_RTOL * abs(want_loss), (case.name, k)
        assert logits.shape == (BATCH, 10)
        assert sorted(trainer.grads) == sorted(want_grads) == sorted(trainer.trainable), (case.name, k)
        for name, want in want_grads.items():
            # The programs give the dense gradient of the effective weight; gradient() masks it.
            assert rel_error(trainer.grads[name], want) <= GRAD_RTOL, (case.name, k, name)
            mask = case.masks.get(name)
            expected = want if mask is None else want * mask
            assert rel_error(trainer.gradient(name), expected) <= GRAD_RTOL, (case.name, k, name)
        for name, want in want_running.items():
            assert rel_error(state.weights[name], want) <= 1e-5, (case.name, k, name)


def test_freezing_at_every_boundary_keeps_the_logits(case):
    """Train a step at stage k, freeze block k: the model (InferChain prefix + next trainer)
    gives the same logits, and they are PyTorch's for the state's weights."""
    state = ModelState.load(case.store)
    x = case.features[0]
    for k in range(len(case.blocks) - 1):
        trainer = trainer_at(case, k, state)
        features = InferChain(case.blocks[:k], state, case.sessions).forward(x)
        trainer.train_step(features, case.labels)
        trainer.sgd_step({b: 0.05 for b in range(len(case.blocks))}, 0.9, 5e-4)
        _, before = trainer.eval_step(InferChain(case.blocks[:k], state, case.sessions).forward(x), case.labels)
        successor = trainer_at(case, k + 1, state)
        _, after = successor.eval_step(InferChain(case.blocks[:k + 1], state, case.sessions).forward(x),
                                       case.labels)
        assert np.max(np.abs(before - after)) <= 1e-5, (case.name, k)
    reference = copy.deepcopy(case.model).double().eval()
    reference.load_state_dict({n: torch.from_numpy(state.weights[n]).double() if n in state.weights else v
                               for n, v in reference.state_dict().items()})
    with torch.no_grad():
        want = reference(torch.from_numpy(x).double()).numpy()
    assert rel_error(after, want) <= 1e-4, case.name


def test_masked_weights_stay_exactly_zero(case):
    state = ModelState.load(case.store)
    trainer = trainer_at(case, 0, state)
    start = {n: state.weights[n].copy() for n in case.masks}
    for step in range(3):
        trainer.train_step(case.features[0], np.roll(case.labels, step))
        trainer.sgd_step({b: 0.1 for b in range(len(case.blocks))}, 0.9, 5e-4)
    for name, mask in case.masks.items():
        assert not np.any(state.weights[name][mask == 0]), name
        assert not np.array_equal(state.weights[name], start[name]), f"{name} did not train"
        assert not np.any(trainer.momentum_buffers[name][mask == 0]), name


def test_the_model_state_is_the_only_copy(case, monkeypatch):
    state = ModelState.load(case.store)
    k = len(case.blocks) // 2
    trainer = trainer_at(case, k, state)
    block = case.blocks[k]
    arrays = {n: state.weights[n] for n in block.parameters + block.running_stats}
    calls = []
    session = case.sessions.binding(block, "train", state).session
    run = session.run
    monkeypatch.setattr(session, "run", lambda names, feeds: calls.append(feeds) or run(names, feeds))
    trainer.train_step(case.features[k], case.labels)
    trainer.sgd_step({k: 0.1}, 0.9, 0.0)
    fed = calls[0]    # block k's train program runs first (later blocks may share its file)
    local = f"blocks.{k}."
    for name, array in arrays.items():
        assert np.shares_memory(fed[name.removeprefix(local)], array), f"{name} was copied before ONNX Runtime read it"
        assert state.weights[name] is array, f"{name} was replaced instead of updated in place"
    # A change through the trainer is what a prefix over the same blocks runs with next.
    prefix = InferChain(case.blocks[k:k + 1], state, case.sessions)
    before = prefix.forward(case.features[k])
    weight = block.parameters[0]
    trainer.set_parameter(weight, 2 * trainer.get_parameter(weight))
    assert not np.allclose(prefix.forward(case.features[k]), before)
    mask_name = f"{block.masks[0]}_mask"
    trainer.set_parameter(mask_name, np.zeros_like(trainer.get_parameter(mask_name)))
    assert not np.any(state.masks[block.masks[0]])


def test_cross_entropy_matches_pytorch():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 10)) * np.array([[1.0], [5.0], [50.0], [1.0], [200.0], [0.1], [1.0]]))
    logits = logits.astype(np.float32)
    labels = rng.integers(0, 10, 7)
    loss, grad = cross_entropy(logits, labels)
    z = torch.from_numpy(logits).double().requires_grad_(True)
    want = F.cross_entropy(z, torch.from_numpy(labels))
    want.backward()
    assert grad.dtype == np.float32 and grad.shape == logits.shape
    assert loss == pytest.approx(want.item(), rel=1e-7)
    assert rel_error(grad, z.grad.numpy()) <= 1e-6
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits, labels[:3])
