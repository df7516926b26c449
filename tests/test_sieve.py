"""Circular data sieving: one test per invariant of the active set / removed queue."""
import math

import numpy as np
import pytest

from spfde_edge.sieve import DataSieve, SieveError, merge_interval_states


def make_sieve(num_samples=100, removed_fraction=0.4, swap_fraction=0.25, seed=0):
    return DataSieve(num_samples, removed_fraction, np.random.default_rng(seed), swap_fraction)


def observe_active(sieve, correct=True):
    """One 'epoch' over the active set with the same correctness for every sample."""
    active = sieve.active_indices
    sieve.record(active, np.full(active.size, correct))


def test_initial_split_sizes_and_partition():
    sieve = make_sieve(num_samples=100, removed_fraction=0.4)
    assert sieve.removed_queue.size == 40
    assert sieve.active_indices.size == 60
    assert sieve.active_indices.dtype == np.int64
    assert np.all(np.diff(sieve.active_indices) > 0)  # sorted
    assert sieve.ever_used.sum() == 60


def test_active_size_constant_and_partition_over_many_updates():
    sieve = make_sieve(num_samples=50, removed_fraction=0.3, swap_fraction=0.5)
    rng = np.random.default_rng(1)
    for _ in range(30):
        active = sieve.active_indices
        sieve.record(active, rng.random(active.size) < 0.7)
        sieve.record(active, rng.random(active.size) < 0.7)
        sieve.update()
        active, queue = sieve.active_indices, sieve.removed_queue
        assert active.size == 35 and queue.size == 15
        assert np.intersect1d(active, queue).size == 0
        assert np.array_equal(np.union1d(active, queue), np.arange(50))


def test_every_sample_used_after_enough_updates():
    # 40 removed, 10 exchanged per update, FIFO: the initial queue drains in ceil(40/10) updates.
    sieve = make_sieve(num_samples=100, removed_fraction=0.4, swap_fraction=0.25)
    needed = math.ceil(40 / round(0.25 * 40))
    for _ in range(needed - 1):
        observe_active(sieve)
        sieve.update()
    assert not sieve.ever_used.all()
    observe_active(sieve)
    sieve.update()
    assert sieve.ever_used.all()


def test_forgetting_counts_scripted_sequence():
    sieve = make_sieve()
    for value in (True, False, True, False):
        sieve.record(np.array([7]), np.array([value]))
    assert sieve.forgetting[7] == 2
    # A first observation that is wrong is not a forgetting event.
    sieve.record(np.array([8]), np.array([False]))
    assert sieve.forgetting[8] == 0
    assert sieve.forgetting.sum() == 2


def test_forgetting_in_one_batch_with_duplicates_keeps_order():
    sieve = make_sieve()
    sieve.record(np.array([3, 3, 3]), np.array([True, False, True]))
    assert sieve.forgetting[3] == 1


def test_forgetting_reset_after_update():
    sieve = make_sieve()
    sieve.record(np.array([7]), np.array([True]))
    sieve.record(np.array([7]), np.array([False]))
    assert sieve.forgetting[7] == 1
    sieve.update()
    assert sieve.forgetting.sum() == 0


def test_transition_spanning_update_counts_in_new_interval():
    sieve = make_sieve()
    sieve.record(np.array([7]), np.array([True]))
    sieve.update()
    sieve.record(np.array([7]), np.array([False]))
    assert sieve.forgetting[7] == 1


def test_easiest_samples_are_moved_out():
    sieve = make_sieve(num_samples=20, removed_fraction=0.5, swap_fraction=0.3)  # swap 3
    active = sieve.active_indices
    easiest, rest = active[:3], active[3:]
    sieve.record(active, np.ones(active.size, bool))
    sieve.record(rest, np.zeros(rest.size, bool))  # one forgetting event each
    out = sieve.update().moved_out
    assert set(out.tolist()) == set(easiest.tolist())


def test_never_learned_samples_rank_hardest():
    sieve = make_sieve(num_samples=20, removed_fraction=0.5, swap_fraction=0.3)  # swap 3
    active = sieve.active_indices
    never, once, twice = active[:4], active[4:7], active[7:]
    sieve.record(never, np.zeros(never.size, bool))  # 0 forgetting, but never correct
    sieve.record(once, np.ones(once.size, bool))
    sieve.record(once, np.zeros(once.size, bool))
    for _ in range(2):
        sieve.record(twice, np.ones(twice.size, bool))
        sieve.record(twice, np.zeros(twice.size, bool))
    out = sieve.update().moved_out
    assert set(out.tolist()) == set(once.tolist())


def test_unobserved_samples_are_not_moved_out():
    sieve = make_sieve(num_samples=20, removed_fraction=0.5, swap_fraction=0.3)  # swap 3
    observed = sieve.active_indices[:2]
    sieve.record(observed, np.ones(2, bool))
    result = sieve.update()
    assert set(result.moved_out.tolist()) == set(observed.tolist())
    assert result.moved_in.size == 2
    assert sieve.active_indices.size == 10


def test_moved_out_to_tail_moved_in_from_head():
    sieve = make_sieve(num_samples=100, removed_fraction=0.4, swap_fraction=0.25)
    queue = sieve.removed_queue
    observe_active(sieve)
    result = sieve.update()
    assert np.array_equal(result.moved_in, queue[:10])
    assert np.array_equal(sieve.removed_queue, np.concatenate([queue[10:], result.moved_out]))
    assert np.isin(result.moved_in, sieve.active_indices).all()


def test_queue_shuffled_only_after_all_initially_removed_returned():
    sieve = make_sieve(num_samples=100, removed_fraction=0.4, swap_fraction=0.25)
    for update in range(1, 7):
        queue = sieve.removed_queue
        observe_active(sieve)
        result = sieve.update()
        fifo = np.concatenate([queue[result.moved_out.size:], result.moved_out])
        after = sieve.removed_queue
        if update < 4:  # the 40 initially removed return 10 per update
            assert not sieve.ever_used.all()
            assert np.array_equal(after, fifo)
        else:
            assert sieve.ever_used.all()
            assert not np.array_equal(after, fifo)
            assert np.array_equal(np.sort(after), np.sort(fifo))


def test_state_dict_round_trip_is_exact():
    def run(sieve, steps, data_rng):
        trace = []
        for _ in range(steps):
            active = sieve.active_indices
            # Mostly correct: many ties at 0 forgetting, so the RNG tie-break decides.
            sieve.record(active, data_rng.random(active.size) < 0.9)
            result = sieve.update()
            trace.append((result.moved_out.copy(), result.moved_in.copy()))
        return trace

    data_rng = np.random.default_rng(5)
    a = make_sieve(num_samples=60, removed_fraction=0.5, swap_fraction=0.5, seed=3)
    run(a, 3, data_rng)
    a.record(a.active_indices[:5], np.ones(5, bool))  # mid-interval state is saved too
    state = a.state_dict()
    data_state = data_rng.bit_generator.state
    expected = run(a, 6, data_rng)

    b = make_sieve(num_samples=60, removed_fraction=0.2, swap_fraction=0.9, seed=99)
    b.load_state_dict(state)
    data_rng.bit_generator.state = data_state
    got = run(b, 6, data_rng)
    for (out_a, in_a), (out_b, in_b) in zip(expected, got):
        assert np.array_equal(out_a, out_b) and np.array_equal(in_a, in_b)
    assert np.array_equal(a.removed_queue, b.removed_queue)
    assert b.num_updates == a.num_updates == 9


def test_merged_interval_state_matches_single_process():
    def script(sieve, indices):
        for value in (True, False, True, False, True):
            sieve.record(indices, np.full(indices.size, value))

    single = make_sieve(num_samples=40, removed_fraction=0.5, swap_fraction=0.5, seed=4)
    ranks = [make_sieve(num_samples=40, removed_fraction=0.5, swap_fraction=0.5, seed=4)
             for _ in range(2)]
    active = single.active_indices
    halves = (active[:7], active[7:12])  # rank 0 sees 7 samples, rank 1 sees 5
    script(single, halves[0][:3])
    single.record(halves[0][3:], np.ones(4, bool))
    single.record(halves[1], np.ones(5, bool))
    script(ranks[0], halves[0][:3])
    ranks[0].record(halves[0][3:], np.ones(4, bool))
    ranks[1].record(halves[1], np.ones(5, bool))

    merged = merge_interval_states([r.interval_state() for r in ranks])
    for r in ranks:
        r.set_interval_state(merged)
        assert np.array_equal(r.forgetting, single.forgetting)
    expected = single.update()
    for r in ranks:
        got = r.update()
        assert np.array_equal(got.moved_out, expected.moved_out)
        assert np.array_equal(r.removed_queue, single.removed_queue)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"removed_fraction": 1.0}, "removed_fraction"),
    ({"removed_fraction": -0.1}, "removed_fraction"),
    ({"swap_fraction": 0.0}, "swap_fraction"),
    ({"swap_fraction": 1.5}, "swap_fraction"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 3, "removed_fraction": 0.9}, "at least one"),
])
def test_invalid_arguments_raise(kwargs, fragment):
    args = {"num_samples": 10, "removed_fraction": 0.5, "swap_fraction": 0.5} | kwargs
    with pytest.raises(SieveError, match=fragment):
        DataSieve(args["num_samples"], args["removed_fraction"], np.random.default_rng(0),
                  args["swap_fraction"])


def test_invalid_rng_and_records_raise():
    with pytest.raises(SieveError, match="Generator"):
        DataSieve(10, 0.5, rng=0)
    sieve = make_sieve(num_samples=10)
    with pytest.raises(SieveError, match="indices"):
        sieve.record(np.array([10]), np.array([True]))
    with pytest.raises(SieveError, match="one value per sample"):
        sieve.record(np.array([1, 2]), np.array([True]))


def test_removed_fraction_zero_is_noop():
    sieve = make_sieve(num_samples=10, removed_fraction=0.0)
    assert np.array_equal(sieve.active_indices, np.arange(10))
    sieve.record(np.arange(10), np.ones(10, bool))
    result = sieve.update()
    assert result.moved_out.size == result.moved_in.size == 0
    assert np.array_equal(sieve.active_indices, np.arange(10))
    assert sieve.removed_queue.size == 0 and sieve.num_updates == 1
