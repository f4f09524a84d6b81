"""The pool's decision logic with a fake clock: no Ray, no Docker."""

from __future__ import annotations

import pytest

from sandbox_actors.reconcile import ActorView, ContainerView, plan_reconcile
from sandbox_actors.state import (
    Acquired,
    IllegalTransition,
    MustCreate,
    MustWait,
    PoolState,
    SandboxState,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(replicas=3, max_sandboxes=None, idle_timeout=10.0):
    clock = Clock()
    return PoolState(replicas, max_sandboxes, idle_timeout, clock=clock), clock


def create(state: PoolState, sandbox_id: str) -> None:
    decision = state.acquire(sandbox_id, f"thread-{sandbox_id}")
    assert isinstance(decision, MustCreate), decision
    state.started(sandbox_id, actor=f"actor-{sandbox_id}", info={})


def test_acquire_order_cold_hot_warm():
    state, _ = make()
    first = state.acquire("a", "t")
    assert isinstance(first, MustCreate) and first.entry.state is SandboxState.STARTING
    state.started("a", "actor", {"url": "u"})
    hot = state.acquire("a", "t")
    assert isinstance(hot, Acquired) and hot.path == "hot"
    assert state.release("a") is True
    assert state.entries["a"].state is SandboxState.WARM
    warm = state.acquire("a", "t")
    assert isinstance(warm, Acquired) and warm.path == "warm"
    assert state.entries["a"].state is SandboxState.ACTIVE and state.entries["a"].released_at is None


def test_concurrent_acquire_of_a_starting_sandbox_waits():
    state, _ = make()
    assert isinstance(state.acquire("a", "t"), MustCreate)
    second = state.acquire("a", "t")
    assert isinstance(second, MustWait) and second.reason == "starting"
    state.start_failed("a")
    assert "a" not in state.entries
    assert isinstance(state.acquire("a", "t"), MustCreate)  # a failed start leaves nothing behind


def test_lru_evicts_least_recently_released_warm_only():
    state, clock = make(replicas=3)
    for sid in "abc":
        create(state, sid)
    state.release("b")
    clock.advance(1)
    state.release("a")  # b was released first: b is the LRU one
    decision = state.acquire("d", "td")
    assert isinstance(decision, MustCreate)
    assert [e.sandbox_id for e in decision.evict] == ["b"]
    assert state.entries["b"].state is SandboxState.STOPPING
    assert state.entries["a"].state is SandboxState.WARM
    assert state.entries["c"].state is SandboxState.ACTIVE
    assert not decision.over_soft_cap


def test_soft_cap_never_evicts_active_and_flags_overflow():
    state, _ = make(replicas=2)
    create(state, "a")
    create(state, "b")
    decision = state.acquire("c", "tc")
    assert isinstance(decision, MustCreate)
    assert decision.evict == () and decision.over_soft_cap is True
    assert {e.state for e in state.entries.values()} == {SandboxState.ACTIVE, SandboxState.STARTING}


def test_hard_cap_waits_then_frees_after_stop():
    state, _ = make(replicas=2, max_sandboxes=2)
    create(state, "a")
    create(state, "b")
    blocked = state.acquire("c", "tc")
    assert isinstance(blocked, MustWait) and blocked.reason == "capacity" and blocked.evict == ()
    state.release("a")
    evicting = state.acquire("c", "tc")
    # The warm one is evicted, but its container still exists until stopped: still wait.
    assert isinstance(evicting, MustWait) and [e.sandbox_id for e in evicting.evict] == ["a"]
    state.removed("a")
    assert isinstance(state.acquire("c", "tc"), MustCreate)


def test_idle_active_and_warm_are_candidates_after_timeout():
    state, clock = make(idle_timeout=10)
    create(state, "a")
    create(state, "w")
    state.release("w")
    clock.advance(5)
    assert state.idle_candidates() == []
    clock.advance(6)
    assert sorted(e.sandbox_id for e, _ in state.idle_candidates()) == ["a", "w"]


def test_idle_never_reaps_inflight_and_rechecks_after_use():
    state, clock = make(idle_timeout=10)
    create(state, "a")
    clock.advance(11)
    [(entry, version)] = state.idle_candidates()
    # The sandbox reports a command in flight: not idle, however long it runs.
    state.note_activity("a", idle_for=0.0, inflight=1)
    assert state.begin_idle_stop("a", version) is None
    clock.advance(100)
    [(entry, version)] = state.idle_candidates()
    state.note_activity("a", idle_for=100.0, inflight=0)
    state.acquire("a", "t")  # re-acquired between the check and the act
    assert state.begin_idle_stop("a", version) is None
    assert state.entries["a"].state is SandboxState.ACTIVE


def test_idle_stop_uses_the_sandbox_own_activity():
    state, clock = make(idle_timeout=10)
    create(state, "a")
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    state.note_activity("a", idle_for=3.0, inflight=0)  # an exec 3 s ago, straight to the actor
    assert state.begin_idle_stop("a", version) is None
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    state.note_activity("a", idle_for=14.0, inflight=0)
    stopping = state.begin_idle_stop("a", version)
    assert stopping is not None and stopping.state is SandboxState.STOPPING


def test_refused_stop_restores_previous_state():
    state, clock = make(idle_timeout=10)
    create(state, "w")
    state.release("w")
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    state.begin_idle_stop("w", version)
    state.stop_refused("w")
    assert state.entries["w"].state is SandboxState.WARM


def test_idle_timeout_zero_disables():
    state, clock = make(idle_timeout=0)
    create(state, "a")
    clock.advance(10**6)
    assert state.idle_candidates() == []


def test_destroy_get_and_illegal_transitions():
    state, _ = make()
    assert state.begin_destroy("nope") is None
    state.acquire("a", "t")
    assert isinstance(state.begin_destroy("a"), MustWait)  # starting: wait for it first
    state.started("a", "actor", {})
    assert state.get("a") is not None
    entry = state.begin_destroy("a")
    assert entry.state is SandboxState.STOPPING
    assert state.get("a") is None
    with pytest.raises(IllegalTransition):
        entry.move(SandboxState.STARTING)
    state.removed("a")
    assert state.release("a") is False


def test_adopt_parks_warm_once_and_shutdown_stops_everything():
    state, clock = make()
    assert state.adopt("x", "tx", "actor", {}, idle_for=5) is True
    assert state.adopt("x", "tx", "actor", {}, idle_for=5) is False
    assert state.entries["x"].state is SandboxState.WARM
    assert state.entries["x"].released_at == clock.now - 5
    create(state, "a")
    doomed = state.begin_shutdown()
    assert sorted(e.sandbox_id for e in doomed) == ["a", "x"]
    assert all(e.state is SandboxState.STOPPING for e in doomed)


# ── reconcile rules ─────────────────────────────────────────────────────────


def actor(sid, container="c-" , started=True, dead=None, engine="E1"):
    return ActorView(sid, started, container + sid if started else None, engine, dead)


def container(sid, running=True, engine="E1", cid=None):
    return ContainerView(sid, cid or "c-" + sid, running, engine, "node-1")


def test_reconcile_adopts_live_pairs_and_leaves_known_ones():
    plan = plan_reconcile({"known"}, {"known": actor("known"), "new": actor("new")},
                          [container("known"), container("new")], {"E1"})
    assert [a.sandbox_id for a in plan.adopt] == ["new"]
    assert plan.repair == plan.remove_containers == plan.end_actors == plan.forget == []


def test_reconcile_orphan_containers_and_actors():
    plan = plan_reconcile(
        {"gone"},
        {"no-container": actor("no-container")},
        [container("orphan-running"), container("orphan-stopped", running=False)],
        {"E1"},
    )
    assert plan.repair == ["orphan-running"]  # probed: re-adopted if it answers, else removed
    assert [c.sandbox_id for c in plan.remove_containers] == ["orphan-stopped"]
    assert plan.end_actors == ["no-container"]
    assert plan.forget == ["gone"]


def test_reconcile_never_two_containers_and_respects_unknown_and_busy():
    plan = plan_reconcile(
        set(),
        {"dup": actor("dup"), "quiet": None, "busy": actor("busy", started=False)},
        [container("dup"), container("dup", engine="E2", cid="other"), container("quiet", running=False)],
        {"E1", "E2"},
        busy={"busy"},
    )
    assert [(c.sandbox_id, c.container_id) for c in plan.remove_containers] == [("dup", "other")]
    assert [a.sandbox_id for a in plan.adopt] == ["dup"]
    assert "quiet" not in plan.repair and "busy" not in plan.repair


def test_reconcile_keeps_actor_whose_engine_was_not_seen():
    plan = plan_reconcile({"x"}, {"x": actor("x", engine="E9")}, [], {"E1"})
    assert plan.is_empty()


def test_reconcile_dead_or_unstarted_actor_needs_repair():
    plan = plan_reconcile(set(), {"d": actor("d", dead="stopped"), "u": actor("u", started=False)}, [], {"E1"})
    assert sorted(plan.repair) == ["d", "u"]


def test_evict_lru_warm_for_a_node_slot():
    state, clock = make(replicas=10)
    for sid in "abc":
        create(state, sid)
    assert state.evict_lru_warm() is None  # nothing warm: nothing to give up
    state.release("b")
    clock.advance(1)
    state.release("a")
    victim = state.evict_lru_warm()
    assert victim.sandbox_id == "b" and victim.state is SandboxState.STOPPING
    assert state.entries["a"].state is SandboxState.WARM and state.entries["c"].state is SandboxState.ACTIVE
