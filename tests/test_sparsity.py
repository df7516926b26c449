"""Masks keep their invariants; each DST algorithm changes them the way its paper says."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spfde_edge.models import create_model, prunable_layers
from spfde_edge.sparsity import (MaskSet, ScheduleError, SparsityError, UpdateSchedule, available_algorithms,
                                 dense_gradient, erk_densities, frozen_names, get_algorithm)

SPARSITY = 0.8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs run fastest on one thread; more only contend with each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model():
    torch.manual_seed(0)
    return create_model("resnet32", width=0.25)


def make_sparse(distribution="uniform", seed=0, sparsity=SPARSITY):
    model = make_model()
    maskset = MaskSet.random(model, sparsity, distribution, torch.Generator().manual_seed(seed))
    maskset.apply(model)
    maskset.attach(model)
    return model, maskset


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def loss_of(model):
    x, y = batch()
    return F.cross_entropy(model(x), y)


def train(model, optimizer, steps=2):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                           lr=0.1, momentum=0.9, weight_decay=5e-4)


def params(model):
    return dict(model.named_parameters())


def copy_masks(maskset):
    return {n: m.clone() for n, m in maskset.masks.items()}


# -- construction -------------------------------------------------------------------------

def test_uniform_masks_have_exact_zeros_and_first_conv_stays_dense():
    model, maskset = make_sparse("uniform")
    layers = prunable_layers(model)
    first = f"{layers[0][0]}.weight"
    assert maskset.dense_names == [first]
    assert set(maskset.masks) == {f"{n}.weight" for n, _ in layers[1:]}
    assert maskset.density_of(first) == 1.0 and bool((params(model)[first] != 0).all())
    for name, mask in maskset.masks.items():
        assert int((~mask).sum()) == round(SPARSITY * mask.numel()), name
    maskset.check(model)


def test_erk_counts_are_exact_and_total_matches_uniform():
    model, erk = make_sparse("erk")
    _, uniform = make_sparse("uniform")
    for name, mask in erk.masks.items():
        assert int((~mask).sum()) == erk.target_zeros[name]
    assert abs(erk.nonzero_count() - uniform.nonzero_count()) <= len(erk.masks)
    density = erk.layer_density()
    # ERK: density proportional to sum(dims)/prod(dims) among layers that are not capped.
    a, b = "blocks.12.conv1.weight", "blocks.7.conv1.weight"  # (16,16,3,3), (8,8,3,3)
    expected_ratio = (38 / 2304) / (22 / 576)
    assert density[a] / density[b] == pytest.approx(expected_ratio, rel=0.05)
    assert density["blocks.6.downsample.0.weight"] > density["blocks.6.conv2.weight"]
    erk.check(model)


def test_erk_makes_layers_dense_that_would_exceed_density_one():
    densities = erk_densities({"big": (1000, 1000), "tiny": (2, 2)}, 0.5)
    assert densities["tiny"] == 1.0
    # the uniform total (500000 + 2 nonzeros) less the 4 dense weights goes to the big layer
    assert densities["big"] * 1_000_000 == pytest.approx(499_998)


def test_erk_densities_match_hand_computed_rigl_values():
    # RigL's ERK: density ∝ sum(shape)/prod(shape). At 50% the uniform total is 800 of 1600
    # weights; the head's raw density (26/160 · 800/74 ≈ 1.76) exceeds 1, so it is made dense
    # and the scale re-solved over the convs: eps = (800 - 160) / (18 + 30) = 40/3.
    shapes = {"conv1": (8, 4, 3, 3), "conv2": (16, 8, 3, 3), "head": (10, 16)}
    densities = erk_densities(shapes, 0.5)
    assert densities["head"] == 1.0
    assert densities["conv1"] * 288 == pytest.approx(240)  # 18 · 40/3
    assert densities["conv2"] * 1152 == pytest.approx(400)  # 30 · 40/3
    # At 90% (160 nonzeros) no layer is capped: eps = 160/74 everywhere.
    densities = erk_densities(shapes, 0.9)
    for name, shape in shapes.items():
        assert densities[name] * math.prod(shape) == pytest.approx(sum(shape) * 160 / 74), name


def test_erk_handles_depthwise_convs():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", width=0.25)
    maskset = MaskSet.random(model, 0.9, "erk", torch.Generator().manual_seed(0))
    maskset.apply(model)
    depthwise = [f"{n}.weight" for n, m in prunable_layers(model)
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(n in maskset.masks for n in depthwise)
    for name in depthwise:
        assert int((~maskset.masks[name]).sum()) == maskset.target_zeros[name]
    assert 0.0 < maskset.density_of(depthwise[0]) <= 1.0
    maskset.check(model)


def test_masks_come_from_the_generator():
    a = MaskSet.random(make_model(), SPARSITY, "uniform", torch.Generator().manual_seed(3))
    b = MaskSet.random(make_model(), SPARSITY, "uniform", torch.Generator().manual_seed(3))
    c = MaskSet.random(make_model(), SPARSITY, "uniform", torch.Generator().manual_seed(4))
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


# -- training keeps masked weights dead ---------------------------------------------------

def test_momentum_and_weight_decay_never_revive_masked_weights():
    model, maskset = make_sparse()
    before = {n: p.detach().clone() for n, p in params(model).items()}
    train(model, sgd(model), steps=5)
    maskset.check(model)
    p = params(model)
    for name, mask in maskset.masks.items():
        assert bool((p[name].grad[~mask] == 0).all()), name
        assert not torch.equal(p[name][mask], before[name][mask]), f"{name} did not train"


def test_dense_gradients_let_masked_gradients_through_temporarily():
    model, maskset = make_sparse()
    name = "blocks.12.conv1.weight"
    weight, mask = params(model)[name], maskset.masks[name]
    with maskset.dense_gradients():
        loss_of(model).backward()
    assert bool((weight.grad[~mask] != 0).any())
    weight.grad = None
    loss_of(model).backward()
    assert bool((weight.grad[~mask] == 0).all())


def test_dense_gradient_helper_restores_grads_and_batchnorm_statistics():
    model, maskset = make_sparse()
    model.train()
    p = params(model)
    marker = torch.full_like(p["blocks.3.conv1.weight"], 7.0)
    p["blocks.3.conv1.weight"].grad = marker.clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = dense_gradient(model, maskset, lambda: loss_of(model))
    assert set(grads) == set(maskset.masks)
    mask = maskset.masks["blocks.12.conv1.weight"]
    assert bool((grads["blocks.12.conv1.weight"][~mask] != 0).any())
    assert torch.equal(p["blocks.3.conv1.weight"].grad, marker)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


# -- schedule -----------------------------------------------------------------------------

def test_update_schedule_epochs_and_cosine_fraction():
    schedule = UpdateSchedule(delta_tau=5, end_epoch=30, initial_fraction=0.3)
    assert [e for e in range(40) if schedule.is_update_epoch(e)] == [5, 10, 15, 20, 25]
    assert schedule.fraction(0) == pytest.approx(0.3)
    assert schedule.fraction(15) == pytest.approx(0.15)
    assert schedule.fraction(30) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ScheduleError):
        UpdateSchedule(delta_tau=0, end_epoch=30)


# -- algorithms ---------------------------------------------------------------------------

def plant_stale_state(model, maskset, optimizer):
    """Nonzero weights/momentum at inactive positions, so a missing reset is visible."""
    with torch.no_grad():
        for name, p in params(model).items():
            if name in maskset.masks:
                p.masked_fill_(~maskset.masks[name], 3.0)
            for value in optimizer.state[p].values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.fill_(1.0)


def clear_stale_state(model, maskset, optimizer):
    """Undo :func:`plant_stale_state` where weights stayed inactive, so training can go on."""
    maskset.apply(model)
    for name, mask in maskset.masks.items():
        for value in optimizer.state[params(model)[name]].values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                value.masked_fill_(~mask, 0.0)


def assert_changed_positions_start_clean(model, maskset, old_masks, optimizer):
    p = params(model)
    for name, new in maskset.masks.items():
        changed = new ^ old_masks[name]
        assert changed.any(), f"{name}: mask did not change"
        assert bool((p[name][changed] == 0).all()), name
        for value in optimizer.state[p[name]].values():
            if torch.is_tensor(value) and value.shape == new.shape:
                assert bool((value[changed] == 0).all()), name
                assert bool((value[~changed] == 1).all()), f"{name}: untouched state was reset"


def update(name, model, maskset, optimizer, fraction=0.3, frozen=frozenset(), seed=5):
    """One full update epoch as the trainer runs it."""
    algorithm = get_algorithm(name)
    generator = np.random.default_rng(seed)
    grads = dense_gradient(model, maskset, lambda: loss_of(model)) \
        if algorithm.needs_dense_grads else None
    algorithm.begin_update(maskset, model, fraction, generator, optimizer, set(frozen), grads)
    train(model, optimizer)
    algorithm.end_update(maskset, model, fraction, generator, optimizer, set(frozen), grads)


def test_all_algorithms_are_registered():
    assert available_algorithms() == ["mest", "rigl", "set", "static"]


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_prune_then_grow_swaps_smallest_weights_and_grows_clean(name):
    model, maskset = make_sparse()
    optimizer = sgd(model)
    train(model, optimizer)
    old_masks = copy_masks(maskset)
    old_weights = {n: p.detach().abs().clone() for n, p in params(model).items()}
    algorithm = get_algorithm(name)
    grads = dense_gradient(model, maskset, lambda: loss_of(model)) \
        if algorithm.needs_dense_grads else None
    plant_stale_state(model, maskset, optimizer)
    algorithm.begin_update(maskset, model, 0.3, np.random.default_rng(5), optimizer,
                           set(), grads)
    assert_changed_positions_start_clean(model, maskset, old_masks, optimizer)
    for layer, new in maskset.masks.items():
        old = old_masks[layer]
        pruned, kept = old & ~new, old & new
        assert int(pruned.sum()) == round(0.3 * int(old.sum()))
        assert old_weights[layer][pruned].max() <= old_weights[layer][kept].min(), layer
    clear_stale_state(model, maskset, optimizer)
    maskset.check(model)
    train(model, optimizer)
    algorithm.end_update(maskset, model, 0.3, np.random.default_rng(5), optimizer,
                         set(), grads)
    maskset.check(model)


def test_adam_moments_are_reset_at_changed_positions():
    model, maskset = make_sparse()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optimizer)
    old_masks = copy_masks(maskset)
    plant_stale_state(model, maskset, optimizer)
    get_algorithm("set").begin_update(maskset, model, 0.3, np.random.default_rng(5),
                                      optimizer, set())
    assert_changed_positions_start_clean(model, maskset, old_masks, optimizer)


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model, maskset = make_sparse()
    g = torch.Generator().manual_seed(9)
    grads, expected = {}, {}
    for name, mask in maskset.masks.items():
        k = round(0.3 * int(mask.sum()))
        inactive = (~mask).reshape(-1).nonzero().squeeze(1)
        chosen = inactive[torch.randperm(inactive.numel(), generator=g)[:k]]
        grad = torch.rand(mask.numel(), generator=g)  # in [0, 1): below every chosen one
        grad[chosen] = -(10.0 + torch.arange(k, dtype=grad.dtype))  # magnitude counts
        grads[name] = grad.view(mask.shape)
        expected[name] = torch.zeros(mask.numel(), dtype=torch.bool)
        expected[name][chosen] = True
    old_masks = copy_masks(maskset)
    get_algorithm("rigl").begin_update(maskset, model, 0.3, np.random.default_rng(5),
                                       None, set(), grads)
    for name, new in maskset.masks.items():
        grown = new & ~old_masks[name]
        assert torch.equal(grown.reshape(-1), expected[name]), name
    maskset.check(model)


def test_rigl_without_dense_gradient_raises():
    model, maskset = make_sparse()
    with pytest.raises(SparsityError, match="dense_gradient"):
        get_algorithm("rigl").begin_update(maskset, model, 0.3, np.random.default_rng(), None, set())


def test_mest_grows_above_target_for_one_epoch_then_prunes_back():
    model, maskset = make_sparse()
    optimizer = sgd(model)
    train(model, optimizer)
    old_masks = copy_masks(maskset)
    plant_stale_state(model, maskset, optimizer)
    mest = get_algorithm("mest")
    generator = np.random.default_rng(5)
    mest.begin_update(maskset, model, 0.3, generator, optimizer, set())
    for name, mask in maskset.masks.items():
        old = old_masks[name]
        assert bool((mask | ~old).all()), f"{name}: mest pruned at begin_update"
        assert int(mask.sum()) == int(old.sum()) + round(0.3 * int(old.sum())), name
    assert_changed_positions_start_clean(model, maskset, old_masks, optimizer)
    clear_stale_state(model, maskset, optimizer)
    with pytest.raises(SparsityError, match="zeros"):
        maskset.check(model)  # soft memory bound: above the target count mid-update
    train(model, optimizer)
    mest.end_update(maskset, model, 0.3, generator, optimizer, set())
    maskset.check(model)


def grow_with_mest(lam):
    model, maskset = make_sparse()
    old_masks = copy_masks(maskset)
    mest = get_algorithm("mest", lam=lam)
    mest.begin_update(maskset, model, 0.3, np.random.default_rng(5), None, set())
    grown = {n: m & ~old_masks[n] for n, m in maskset.masks.items()}
    return model, maskset, mest, old_masks, grown


def test_mest_prunes_grown_weights_that_stayed_unimportant():
    model, maskset, mest, old_masks, _ = grow_with_mest(lam=1.0)
    mest.end_update(maskset, model, 0.3, np.random.default_rng(), None, set())  # grown w = 0, no grad
    assert all(torch.equal(maskset.masks[n], old_masks[n]) for n in old_masks)


@pytest.mark.parametrize("lam, kept", [(1.0, True), (0.0, False)])
def test_mest_score_counts_gradient_magnitude(lam, kept):
    model, maskset, mest, old_masks, grown = grow_with_mest(lam)
    for name, p in params(model).items():
        if name in grown:  # grown weights are still zero but carry a large gradient
            p.grad = torch.where(grown[name], 100.0, 0.0)
    mest.end_update(maskset, model, 0.3, np.random.default_rng(), None, set())
    for name, mask in maskset.masks.items():
        assert bool(mask[grown[name]].all()) == kept, name
        assert torch.equal(mask, old_masks[name]) != kept, name
    maskset.check(model)


def test_mest_grown_weights_that_became_large_replace_small_ones():
    model, maskset, mest, old_masks, grown = grow_with_mest(lam=1.0)
    with torch.no_grad():
        for name, p in params(model).items():
            if name in grown:
                p[grown[name]] = 10.0
    mest.end_update(maskset, model, 0.3, np.random.default_rng(), None, set())
    for name, mask in maskset.masks.items():
        assert bool(mask[grown[name]].all()) and not torch.equal(mask, old_masks[name]), name
    maskset.check(model)


def test_static_changes_nothing():
    model, maskset = make_sparse()
    optimizer = sgd(model)
    old_masks = copy_masks(maskset)
    update("static", model, maskset, optimizer)
    assert all(torch.equal(maskset.masks[n], old_masks[n]) for n in old_masks)
    maskset.check(model)


@pytest.mark.parametrize("name", ["set", "rigl", "mest"])
def test_frozen_layers_keep_their_masks(name):
    model, maskset = make_sparse()
    model.freeze_prefix(4)
    frozen = frozen_names(model)
    frozen_masked = [n for n in maskset.masks if n in frozen]
    assert frozen_masked
    old_masks = copy_masks(maskset)
    frozen_weights = {n: params(model)[n].detach().clone() for n in frozen_masked}
    update(name, model, maskset, sgd(model), frozen=frozen)
    for n in frozen_masked:
        assert torch.equal(maskset.masks[n], old_masks[n]), n
        assert torch.equal(params(model)[n], frozen_weights[n]), n
    assert any(not torch.equal(maskset.masks[n], old_masks[n])
               for n in maskset.masks if n not in frozen)
    maskset.check(model)


# -- state and errors ---------------------------------------------------------------------

def test_state_dict_round_trip():
    model, maskset = make_sparse("erk")
    get_algorithm("set").begin_update(maskset, model, 0.3, np.random.default_rng(), None, set())
    buffer = io.BytesIO()
    torch.save(maskset.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    other = MaskSet.random(make_model(), 0.5, "uniform", torch.Generator().manual_seed(1))
    other.load_state_dict(state)
    for restored in (other, MaskSet.from_state_dict(state)):
        assert set(restored.masks) == set(maskset.masks)
        assert all(torch.equal(restored.masks[n], maskset.masks[n]) for n in maskset.masks)
        assert restored.target_zeros == maskset.target_zeros
        assert (restored.target_sparsity, restored.distribution, restored.dense_names) == \
            (SPARSITY, "erk", maskset.dense_names)
        restored.check(model)


def test_loading_masks_of_another_model_is_refused():
    torch.manual_seed(0)
    mobilenet = create_model("mobilenet_v2", width=0.25)
    state = MaskSet.random(mobilenet, 0.5, "uniform", torch.Generator()).state_dict()
    _, maskset = make_sparse()
    with pytest.raises(SparsityError, match="different layers"):
        maskset.load_state_dict(state)


def test_check_detects_revived_weights_and_wrong_counts():
    model, maskset = make_sparse()
    name = "blocks.5.conv1.weight"
    weight = params(model)[name]
    position = (~maskset.masks[name]).nonzero()[0].tolist()
    with torch.no_grad():
        weight[tuple(position)] = 0.5
    with pytest.raises(SparsityError, match="nonzero"):
        maskset.check(model)
    maskset.masks[name][tuple(position)] = True  # now one zero short of the target
    with pytest.raises(SparsityError, match="target"):
        maskset.check(model)


@pytest.mark.parametrize("bad", [1.2, 1.0, -0.1, math.nan, "0.5"])
def test_invalid_sparsity_is_refused(bad):
    with pytest.raises(SparsityError, match=r"--sparsity must be in \[0, 1\)"):
        MaskSet.random(make_model(), bad, "uniform", torch.Generator())


def test_invalid_sparsity_message_is_one_line():
    with pytest.raises(ValueError) as info:
        MaskSet.random(make_model(), 1.2, "uniform", torch.Generator())
    assert str(info.value) == "--sparsity must be in [0, 1), got 1.2"


def test_unknown_distribution_and_algorithm_are_refused():
    with pytest.raises(SparsityError, match="uniform, erk"):
        MaskSet.random(make_model(), 0.5, "gaussian", torch.Generator())
    with pytest.raises(SparsityError, match="mest, rigl, set, static"):
        get_algorithm("snip")
