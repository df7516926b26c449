"""Host and device run the same SpFDE rules: the same arrays through each side's caller give
the same result (issue 11). Each row of a table is one case; adding a case is adding a row.

The host callers are the PyTorch trainer's pieces (MaskSet + DST adapter, torch.optim.SGD,
the freezing plan's block LRs, UpdateSchedule); the device callers are the runner's
(device_runner.dst on a suffix trainer's named arrays, the backends' SGD rule, the device
schedule built from the bundle's plan).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from device_runner import dst as device_dst
from device_runner import sieve as device_sieve
from device_runner.method import dst as rules
from device_runner.method.schedule import is_interval_boundary
from device_runner.method.sgd import sgd_step
from device_runner.schedule import device_schedule
from spfde_edge import freezing, sieve as host_sieve
from spfde_edge.sparsity import MaskSet, UpdateSchedule, get_algorithm

SHAPES = {"conv.weight": (6, 4, 3, 3), "fc.weight": (5, 12)}


class TwoLayers(nn.Module):
    """Just the parameters the rules look at: a conv and a linear weight, a bias and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(12, 5)


class ArrayTrainer:
    """The suffix-backend interface device_runner.dst uses, over plain numpy arrays."""

    def __init__(self, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], momentum: dict[str, np.ndarray]):
        self.values = {n: w.copy() for n, w in weights.items()}
        self.values.update({f"{n}_mask": m.astype(np.uint8) for n, m in masks.items()})
        self.grads = {n: g.copy() for n, g in grads.items()}
        self.momentum_buffers = {n: b.copy() for n, b in momentum.items()}
        self.trainable = list(weights)
        self.stage = type("Stage", (), {"masks": tuple((f"{n}_mask", n) for n in weights)})

    def parameter_names(self):
        return list(self.values)

    def get_parameter(self, name):
        return self.values[name].copy()

    def set_parameter(self, name, value):
        self.values[name] = np.asarray(value, dtype=self.values[name].dtype).copy()

    def gradient(self, name):
        return self.grads[name].copy()


def layer_arrays(seed: int, density: float = 0.3):
    rng = np.random.default_rng(seed)
    masks = {n: rng.random(s) < density for n, s in SHAPES.items()}
    weights = {n: (rng.normal(size=s) * masks[n]).astype(np.float32) for n, s in SHAPES.items()}
    grads = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    dense = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    return weights, masks, grads, dense


def host_update(name, lam, fraction, seed, weights, masks, grads, dense):
    """What the trainer does at an update epoch: begin, (train,) end."""
    model = TwoLayers()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(torch.from_numpy(w))
    maskset = MaskSet({n: torch.from_numpy(m) for n, m in masks.items()},
                      {n: int((~m).sum()) for n, m in masks.items()}, 0.7, "uniform", [])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for n in weights:
        optimizer.state[params[n]]["momentum_buffer"] = torch.ones(SHAPES[n])
    algorithm = get_algorithm(name, lam=lam)
    rng = np.random.default_rng(seed)
    dense_t = {n: torch.from_numpy(d) for n, d in dense.items()} if algorithm.needs_dense_grads else None
    algorithm.begin_update(maskset, model, fraction, rng, optimizer, set(), dense_t)
    with torch.no_grad():            # the epoch trains the active weights, grown ones included
        for n, g in grads.items():
            params[n].grad = torch.from_numpy(g) * maskset.masks[n]
            params[n].sub_(0.5 * params[n].grad)
    algorithm.end_update(maskset, model, fraction, rng, optimizer, set())
    return ({n: maskset.masks[n].numpy() for n in weights},
            {n: params[n].detach().numpy() for n in weights},
            {n: optimizer.state[params[n]]["momentum_buffer"].numpy() for n in weights})


def device_update(name, lam, fraction, seed, weights, masks, grads, dense):
    """What the device loop does at an update epoch: begin, (train,) end."""
    trainer = ArrayTrainer(weights, masks, grads, {n: np.ones(s, np.float32) for n, s in SHAPES.items()})
    algorithm = rules.get_algorithm(name, lam)
    rng = np.random.default_rng(seed)
    targets = {n: int((~m).sum()) for n, m in masks.items()}
    device_dst.begin_update(trainer, algorithm, fraction, rng, targets,
                            dense if algorithm.needs_dense_gradient else None)
    for n, g in grads.items():
        trainer.grads[n] = g * (trainer.values[f"{n}_mask"] > 0)
        trainer.values[n] -= 0.5 * trainer.grads[n]
    device_dst.end_update(trainer, algorithm, fraction, rng, targets)
    return ({n: trainer.values[f"{n}_mask"] > 0 for n in weights},
            {n: trainer.values[n] for n in weights}, trainer.momentum_buffers)


DST_CASES = [  # algorithm, MEST λ, fraction, generator seed, data seed
    ("mest", 1.0, 0.3, 0, 1), ("mest", 0.0, 0.5, 3, 2), ("mest", 2.0, 0.05, 7, 3),
    ("set", 1.0, 0.3, 0, 4), ("set", 1.0, 0.9, 1, 5),
    ("rigl", 1.0, 0.3, 0, 6), ("rigl", 1.0, 0.1, 2, 7),
    ("static", 1.0, 0.3, 0, 8),
]


@pytest.mark.parametrize("name,lam,fraction,seed,data_seed", DST_CASES)
def test_prune_and_grow_host_equals_device(name, lam, fraction, seed, data_seed):
    arrays = layer_arrays(data_seed)
    host_masks, host_weights, host_momentum = host_update(name, lam, fraction, seed, *arrays)
    dev_masks, dev_weights, dev_momentum = device_update(name, lam, fraction, seed, *arrays)
    for n in SHAPES:
        np.testing.assert_array_equal(host_masks[n], dev_masks[n], err_msg=n)
        np.testing.assert_array_equal(host_weights[n], dev_weights[n], err_msg=n)
        np.testing.assert_array_equal(host_momentum[n], dev_momentum[n], err_msg=n)
        assert host_masks[n].sum() == arrays[1][n].sum(), f"{n}: sparsity not exact after the update"
    if name != "static":
        assert any(not np.array_equal(host_masks[n], arrays[1][n]) for n in SHAPES), "nothing changed"


def test_mest_grows_for_one_epoch_on_both_sides():
    """Between begin and end the layer is above its target (the soft memory bound) on both."""
    weights, masks, grads, _ = layer_arrays(11)
    trainer = ArrayTrainer(weights, masks, grads, {})
    rng = np.random.default_rng(0)
    targets = {n: int((~m).sum()) for n, m in masks.items()}
    grown = device_dst.begin_update(trainer, rules.get_algorithm("mest"), 0.3, rng, targets)
    for n, m in masks.items():
        assert (trainer.values[f"{n}_mask"] > 0).sum() == m.sum() + grown[n] > m.sum()


SGD_CASES = [  # momentum, weight decay, learning rates of three steps
    (0.9, 5e-4, (0.1, 0.05, 0.01)), (0.0, 5e-4, (0.1, 0.1, 0.1)), (0.9, 0.0, (0.2, 0.0, 0.1)),
    (0.5, 1e-2, (0.03, 0.02, 0.01)),
]


@pytest.mark.parametrize("momentum,weight_decay,lrs", SGD_CASES)
def test_sgd_step_host_equals_device_on_every_parameter_kind(momentum, weight_decay, lrs):
    """Conv and linear weights (masked), a bias and BatchNorm scale and shift."""
    torch.manual_seed(0)
    model = TwoLayers()
    weights, masks, _, _ = layer_arrays(21)
    params = dict(model.named_parameters())
    masksets = MaskSet({n: torch.from_numpy(m) for n, m in masks.items()},
                       {n: int((~m).sum()) for n, m in masks.items()}, 0.7, "uniform", [])
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(torch.from_numpy(w))
        params["bn.weight"].uniform_(0.5, 1.5)
        params["bn.bias"].uniform_(-1, 1)
    masksets.attach(model)
    device = {n: p.detach().numpy().copy() for n, p in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    buffers: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(5)
    for lr in lrs:
        grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in params.items()}
        optimizer.zero_grad()
        loss = sum((p * torch.from_numpy(grads[n])).sum() for n, p in params.items())
        loss.backward()                      # the MaskSet hook masks the weights' gradients
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        masksets.apply(model)
        for n in params:
            mask = masks[n].astype(np.float32) if n in masks else None
            graph_grad = grads[n] * mask if mask is not None else grads[n]  # the graph masks too
            sgd_step(device[n], graph_grad, mask, buffers, n, lr, momentum, weight_decay)
    for n, p in params.items():
        np.testing.assert_allclose(device[n], p.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=n)


SCHEDULE_CASES = [  # plan epochs, epochs done at export, Δτ, freeze epochs of the host plan, LR warmup
    (30, 0, 2, [6, 8, 10], 0.0), (30, 10, 2, [6, 8, 10, 12, 14], 0.0), (40, 0, 5, [], 3.0),
    (40, 20, 5, [25, 30], 0.0), (40, 1, 5, [25, 30], 4.0),
]


@pytest.mark.parametrize("epochs,done,delta_tau,freeze_epochs,warmup", SCHEDULE_CASES)
def test_schedule_host_equals_device_for_every_epoch(epochs, done, delta_tau, freeze_epochs, warmup):
    """A device run of the plan's remaining epochs continues the host's curves epoch by epoch:
    update epochs and fraction, and every trainable block's learning rate."""
    num_blocks, base_lr, fraction = 8, 0.1, 0.3
    plan = freezing.FreezePlan(freeze_epochs, freeze_epochs[0] if freeze_epochs else None)
    host_active = freezing.block_active_epochs(plan, num_blocks, epochs)
    host_updates = UpdateSchedule(delta_tau, epochs, fraction)
    first_stage = sum(1 for e in freeze_epochs if e <= done)
    stage_ks = list(range(first_stage, len(freeze_epochs) + 1))
    device = device_schedule(stage_ks=stage_ks, num_blocks=num_blocks, epochs=epochs - done,
                             epochs_done=done, plan_epochs=epochs, freeze_epochs=freeze_epochs,
                             delta_tau=delta_tau, base_lr=base_lr, update_fraction=fraction,
                             warmup_epochs=warmup)
    assert device.delta_tau == delta_tau
    # stage k starts when the host freezes block k-1
    assert [start for _, start in device.starts[1:]] == [e - done for e in freeze_epochs if e > done]
    for e in range(epochs - done):
        host_e = done + e
        assert device.updates.is_update_epoch(e) == host_updates.is_update_epoch(host_e), e
        assert device.updates.fraction(e) == pytest.approx(host_updates.fraction(host_e), abs=1e-12)
        assert device.is_boundary(e) == is_interval_boundary(host_e, delta_tau), e  # sieve
        for step in (0.0, 0.5):
            device_lrs = device.lrs(e + step)
            for b in range(first_stage, num_blocks):
                host_lr = freezing.block_lr(base_lr, host_e + step, host_active[b], warmup)
                assert device_lrs[b] == pytest.approx(host_lr, abs=1e-12), (e, step, b)


SIEVE_CASES = [(200, 0.2, 0.5, 0), (97, 0.3, 0.25, 4)]  # samples, removed, swap, seed


@pytest.mark.parametrize("samples,removed,swap,seed", SIEVE_CASES)
def test_sieve_exchange_host_equals_device(samples, removed, swap, seed):
    host = host_sieve.DataSieve(samples, removed, np.random.default_rng(seed), swap)
    device = device_sieve.DataSieve(samples, removed, np.random.default_rng(seed), swap)
    rng = np.random.default_rng(seed + 100)
    for _ in range(4):
        for _ in range(3):
            idx = rng.choice(host.active_indices, size=16, replace=False)
            correct = rng.random(16) < 0.6
            host.record(idx, correct)
            device.record(idx, correct)
        np.testing.assert_array_equal(host.update().moved_in, device.update().moved_in)
        np.testing.assert_array_equal(host.active_indices, device.active_indices)
        np.testing.assert_array_equal(host.removed_queue, device.removed_queue)
