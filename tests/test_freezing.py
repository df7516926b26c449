"""Freezing schedule from a FLOPs target, per-block cosine LR, Freezer state."""
from __future__ import annotations

import json
import math

import pytest

from spfde_edge import cost, freezing
from spfde_edge.freezing import FreezeError, FreezePlan, Freezer
from spfde_edge.models import create_model

UNIFORM_TRAIN = [3.0] * 9      # backward = 2 x forward
UNIFORM_FORWARD = [1.0] * 9


@pytest.fixture(scope="module")
def resnet32_flops_fn():
    profile = cost.profile_model(create_model("resnet32"))   # width 2, as in SpFDE
    assert profile.num_blocks == 17
    return lambda k: cost.training_flops_per_sample(profile, {}, k).total


def schedule(target, **kwargs):
    options = dict(epochs=40, delta_tau=4, target_reduction=target)
    options.update(kwargs)
    return freezing.freeze_schedule(UNIFORM_TRAIN, UNIFORM_FORWARD, **options)


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_resnet32_target_within_one_point(resnet32_flops_fn, target):
    plan = freezing.freeze_schedule(flops_fn=resnet32_flops_fn, num_blocks=17, epochs=160,
                                    delta_tau=5, target_reduction=target)
    achieved = freezing.plan_reduction(resnet32_flops_fn, plan, 160)
    assert achieved == pytest.approx(plan.reduction)
    assert abs(achieved - target) <= 0.01


def test_plan_reduction_by_hand():
    # Blocks 0 and 1 frozen from epochs 4 and 6 of 10 save 2 FLOPs each per epoch:
    # (6 + 4) * 2 = 20 of 10 * 9 = 90.
    flops_fn = freezing.blockwise_flops_fn([3, 3, 3], [1, 1, 1])
    plan = FreezePlan([4, 6], 4)
    assert freezing.plan_reduction(flops_fn, plan, 10) == pytest.approx(20 / 90)


def test_target_zero_gives_empty_plan():
    plan = schedule(0.0)
    assert plan.freeze_epochs == [] and plan.T_frz is None and plan.reduction == 0.0


@pytest.mark.parametrize("target", [0.02, 0.1, 0.2, 0.28])
def test_schedule_shape(target):
    plan = schedule(target)
    epochs = plan.freeze_epochs
    assert epochs, "a positive target must freeze something"
    assert plan.T_frz == epochs[0] and plan.T_frz > 0 and plan.T_frz % 4 == 0
    assert all(b - a == 4 for a, b in zip(epochs, epochs[1:]))   # front to back, delta_tau apart
    assert epochs[-1] < 40
    assert len(epochs) <= math.floor(2 / 3 * 9)


def test_head_never_freezes():
    plan = freezing.freeze_schedule([3.0, 3.0, 3.0], [1.0, 1.0, 1.0], epochs=100, delta_tau=1,
                                    target_reduction=0.4, max_frozen_fraction=1.0)
    assert plan.num_frozen == 2


def test_later_freezing_preferred_among_near_equal():
    # 12 equal blocks, 160 epochs, delta_tau 5: plans starting at epochs 5, 10, 35, 50 and
    # 70 all land within half a point of 20 %; the latest start must win.
    train, forward, target = [3.0] * 12, [1.0] * 12, 0.2
    plan = freezing.freeze_schedule(train, forward, epochs=160, delta_tau=5,
                                    target_reduction=target)
    flops_fn = freezing.blockwise_flops_fn(train, forward)
    errors = {}
    for t_frz in range(5, 160, 5):
        for k in range(1, 9):
            candidate = FreezePlan([t_frz + 5 * i for i in range(k)], t_frz)
            if candidate.freeze_epochs[-1] < 160:
                errors[(t_frz, k)] = abs(freezing.plan_reduction(flops_fn, candidate, 160) - target)
    best = min(errors.values())
    near_starts = {t_frz for (t_frz, _), error in errors.items()
                   if error <= best + freezing.NEAR_EQUAL}
    assert len(near_starts) > 1
    assert plan.T_frz == max(near_starts)
    assert abs(plan.reduction - target) <= best + freezing.NEAR_EQUAL


def test_unreachable_target_names_reachable_reduction():
    flops_fn = freezing.blockwise_flops_fn(UNIFORM_TRAIN, UNIFORM_FORWARD)
    most = FreezePlan([4 + 4 * i for i in range(6)], 4)   # earliest start, 6 of 9 blocks
    reachable = freezing.plan_reduction(flops_fn, most, 40)
    with pytest.raises(FreezeError) as error:
        schedule(0.6)
    message = str(error.value)
    assert f"{reachable:.1%}" in message
    assert "epochs" in message and "delta_tau" in message and "\n" not in message


def test_block_lists_and_flops_fn_agree():
    by_lists = schedule(0.25)
    by_fn = freezing.freeze_schedule(
        flops_fn=freezing.blockwise_flops_fn(UNIFORM_TRAIN, UNIFORM_FORWARD), num_blocks=9,
        epochs=40, delta_tau=4, target_reduction=0.25)
    assert by_lists == by_fn


def test_block_lr_cosine_per_block():
    plan = FreezePlan([20, 25], 20)
    active = freezing.block_active_epochs(plan, num_blocks=4, epochs=60)
    assert active == [20.0, 25.0, 60.0, 60.0]
    for span in active:
        assert freezing.block_lr(0.1, 0.0, span) == 0.1
        assert freezing.block_lr(0.1, span / 2, span) == pytest.approx(0.05)
        assert freezing.block_lr(0.1, span - 1e-9, span) == pytest.approx(0.0, abs=1e-12)
        assert freezing.block_lr(0.1, span, span) == 0.0
    assert freezing.block_lr(0.1, 20.0, active[0]) == 0.0 < freezing.block_lr(0.1, 20.0, active[1])


def test_block_lr_warmup():
    assert freezing.block_lr(0.1, 0.0, 20, warmup_epochs=5) == 0.0
    assert freezing.block_lr(0.1, 2.5, 20, warmup_epochs=5) == pytest.approx(0.05)
    assert freezing.block_lr(0.1, 5.0, 20, warmup_epochs=5) == pytest.approx(0.1)


def test_freezer_due_and_count():
    freezer = Freezer(FreezePlan([10, 15, 20], 10, 0.2))
    assert [freezer.num_frozen_at(e) for e in (0, 9, 10, 14, 15, 20, 99)] == [0, 0, 1, 1, 2, 3, 3]
    assert [freezer.due(e) for e in (9, 10, 15, 20, 21)] == [None, 0, 1, 2, None]


def test_freezer_state_round_trip():
    freezer = Freezer(FreezePlan([10, 15], 10, 0.125))
    restored = Freezer()
    restored.load_state_dict(json.loads(json.dumps(freezer.state_dict())))
    assert restored.plan == freezer.plan
    with pytest.raises(FreezeError, match="version"):
        restored.load_state_dict({**freezer.state_dict(), "version": 0})
