"""Adaptive spare actors: the demand they learn and the target they keep (pure logic)."""

from __future__ import annotations

from sandbox_actors.config import SandboxConfig
from sandbox_actors.spares import (
    RECYCLE_GAP,
    RECYCLE_WINDOW,
    SPARE_BYTES,
    WAITER_SPAWNS,
    Demand,
    spare_target,
    waiter_spawns,
)


def burst(demand: Demand, at: float, size: int, spread: float = 0.5) -> None:
    for i in range(size):
        demand.note(at + spread * i / max(1, size))


def test_a_burst_is_the_starts_within_the_window():
    demand = Demand(window=2.0)
    burst(demand, 100.0, 32)
    assert demand.peak(101.0, decay=600) == 32
    # A trickle of one start every 3 s is never more than one at once.
    trickle = Demand(window=2.0)
    for i in range(20):
        trickle.note(200.0 + 3 * i)
    assert trickle.peak(260.0, decay=600) == 1


def test_the_peak_is_remembered_for_decay_seconds_then_the_next_largest_counts():
    demand = Demand(window=2.0)
    burst(demand, 0.0, 32)
    burst(demand, 100.0, 8)
    assert demand.peak(200.0, decay=600) == 32
    assert demand.peak(650.0, decay=600) == 8  # the 32 are older than decay, the 8 not yet
    assert demand.peak(750.0, decay=600) == 0


def test_a_larger_burst_replaces_a_smaller_older_one():
    demand = Demand(window=2.0)
    burst(demand, 0.0, 4)
    burst(demand, 10.0, 16)
    assert demand.peak(11.0, decay=600) == 16
    assert demand.peak(605.0, decay=600) == 16  # the 4 were dropped for the larger, newer 16


def config(**values) -> SandboxConfig:
    return SandboxConfig(**values)


def test_the_target_is_the_floor_until_a_burst_then_the_burst():
    plenty = 64 * 2**30
    assert spare_target(config(), peak=0, spares=2, free_bytes=plenty) == 2
    assert spare_target(config(), peak=1, spares=2, free_bytes=plenty) == 2
    assert spare_target(config(), peak=32, spares=2, free_bytes=plenty) == 32


def test_the_target_is_bounded_by_the_max_the_hard_cap_and_memory():
    plenty = 64 * 2**30
    assert spare_target(config(spare_actors_max=16), peak=32, spares=0, free_bytes=plenty) == 16
    assert spare_target(config(replicas=3, max_sandboxes=10), peak=32, spares=0, free_bytes=plenty) == 10
    # A quarter of the free memory, counting the spares there now as free.
    assert spare_target(config(), peak=32, spares=0, free_bytes=40 * SPARE_BYTES) == 10
    assert spare_target(config(), peak=32, spares=10, free_bytes=30 * SPARE_BYTES) == 10
    # Never below spare_actors, whatever the bounds; learning off when the max is not above it.
    assert spare_target(config(spare_actors=4), peak=32, spares=0, free_bytes=0) == 4
    assert spare_target(config(spare_actors=4, spare_actors_max=0), peak=32, spares=0, free_bytes=plenty) == 4
    assert spare_target(config(), peak=32, spares=0, free_bytes=None) == 32  # memory unknown: not bounded by it


def test_starts_waiting_for_a_spare_get_one_each_unless_destroyed_sandboxes_feed_them():
    never = float("inf")
    # A burst (no sandbox destroyed lately): a spare for each waiting start, minus those coming.
    assert waiter_spawns(waiting=30, starting=0, since_recycle=never) == 30
    assert waiter_spawns(waiting=30, starting=12, since_recycle=never) == 18
    # Sandboxes destroyed meanwhile hand their actors over: no new worker while they do,
    assert waiter_spawns(waiting=30, starting=0, since_recycle=0.1) == 0
    assert waiter_spawns(waiting=2, starting=0, since_recycle=RECYCLE_GAP - 0.1) == 0
    # a few when they paused only lately,
    assert waiter_spawns(waiting=30, starting=0, since_recycle=RECYCLE_GAP + 0.1) == WAITER_SPAWNS
    assert waiter_spawns(waiting=30, starting=WAITER_SPAWNS, since_recycle=RECYCLE_GAP + 0.1) == 0
    assert waiter_spawns(waiting=1, starting=0, since_recycle=RECYCLE_WINDOW - 0.1) == 1
    # and once they stopped, one for each again.
    assert waiter_spawns(waiting=30, starting=0, since_recycle=RECYCLE_WINDOW + 0.1) == 30
    assert waiter_spawns(waiting=0, starting=3, since_recycle=never) == 0


def test_steady_churn_that_gives_actors_back_learns_no_burst():
    """Starts that each take the actor a destroy just gave back (rollouts: fork, run, destroy)
    are no burst: the spares kept stay at spare_actors. A burst on top of them still counts."""
    demand = Demand(window=2.0)
    for i in range(200):  # 4 starts a second, each after a destroy gave its actor back
        demand.returned(100.0 + i * 0.25 - 0.01)
        demand.note(100.0 + i * 0.25)
    assert demand.peak(150.0, decay=600) <= 1
    for i in range(32):
        demand.note(160.0 + i * 0.01)
    assert demand.peak(161.0, decay=600) == 32
