"""The pool's decision logic with a fake clock: no Ray, no Docker."""

from __future__ import annotations

import pytest

from backends.base import Mount
from sandbox_actors.reconcile import ActorView, ContainerView, plan_reconcile
from sandbox_actors.state import (
    TRANSITIONS,
    Acquired,
    Claimed,
    IllegalTransition,
    MustCheck,
    MustCreate,
    MustWait,
    PoolState,
    SandboxState,
)
from sandbox_actors.views import HostDirs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(replicas=3, max_sandboxes=None, idle_timeout=10.0, prewarm=0):
    clock = Clock()
    return PoolState(replicas, max_sandboxes, idle_timeout, prewarm, clock=clock), clock


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
    check = state.acquire("a", "t")  # warm: handed out only once its actor confirms it runs
    assert isinstance(check, MustCheck) and state.entries["a"].state is SandboxState.WARM
    warm = state.reclaim("a", check.version)
    assert isinstance(warm, Acquired) and warm.path == "warm"
    assert state.entries["a"].state is SandboxState.ACTIVE and state.entries["a"].released_at is None
    assert state.reclaim("a", check.version) is None  # changed meanwhile: decide again


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


def test_an_acquire_calls_off_a_pending_idle_stop_until_it_is_committed():
    state, clock = make(idle_timeout=10)
    create(state, "a")
    state.release("a")
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    assert state.begin_idle_stop("a", version).stop == "idle"
    waiting = state.acquire("a", "t")  # the thread comes back while the sandbox is asked to stop
    assert isinstance(waiting, MustWait) and waiting.reason == "stopping"
    assert state.commit_stop("a") is False  # so the stop is called off...
    state.stop_called_off("a")
    assert state.entries["a"].state is SandboxState.WARM  # ...and the thread gets its sandbox back
    assert isinstance(state.acquire("a", "t"), MustCheck)
    # Once committed, a stop can no longer be called off: the thread waits and gets a new one.
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    state.begin_idle_stop("a", version)
    assert state.commit_stop("a") is True
    assert isinstance(state.acquire("a", "t"), MustWait)
    state.stop_called_off("a")
    assert state.entries["a"].state is SandboxState.STOPPING


def test_a_stop_the_engine_did_not_confirm_is_doomed_and_never_handed_out():
    state, _ = make()
    create(state, "a")
    state.begin_destroy("a")
    doomed = state.stop_failed("a")
    assert doomed is not None and doomed.state is SandboxState.DOOMED
    assert state.counts()["doomed"] == 1
    waiting = state.acquire("a", "thread-a")
    assert isinstance(waiting, MustWait) and waiting.reason == "doomed"
    assert state.adopt("a", "thread-a", "actor", {}, 0) is False  # never adopted back
    assert state.begin_destroy("a").state is SandboxState.STOPPING  # destroy retries it
    state.removed("a")
    assert isinstance(state.acquire("a", "thread-a"), MustCreate)
    # A destroy a dead pool owed (found in Ray's KV) is doomed from the start.
    found = state.doomed_found("b", None, "c-b")
    assert found.state is SandboxState.DOOMED and found.container_id == "c-b"
    assert state.doomed_found("b", None, "c-b") is None
    assert [e.sandbox_id for e in state.begin_shutdown()] == ["b"]


def test_a_started_sandbox_whose_entry_went_is_not_kept():
    state, _ = make()
    state.acquire("a", "t")
    state.start_failed("a")
    assert state.started("a", "actor", {}) is None


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
    state.stop_called_off("w")  # the sandbox refused: an operation started meanwhile
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


def actor(sid, started=True, dead=None, engine="E1", name=None, container=None):
    return ActorView(
        name or f"sbx-{sid}", sid, started, (container or "c-" + sid) if started else None, engine, dead
    )


def container(sid, running=True, engine="E1", cid=None):
    return ContainerView(sid, cid or "c-" + sid, running, engine, "node-1")


def test_reconcile_adopts_live_pairs_and_leaves_known_ones():
    plan = plan_reconcile({"known"}, [actor("known"), actor("new")], [container("known"), container("new")], {"E1"})
    assert [a.sandbox_id for a in plan.adopt] == ["new"]
    assert plan.repair == plan.remove_containers == plan.end_actors == plan.forget == []


def test_reconcile_orphan_containers_and_actors():
    plan = plan_reconcile(
        {"gone"},
        [actor("no-container")],
        [container("orphan-running"), container("orphan-stopped", running=False)],
        {"E1"},
    )
    assert plan.repair == ["orphan-running"]  # probed: re-adopted if it answers, else removed
    assert [c.sandbox_id for c in plan.remove_containers] == ["orphan-stopped"]
    assert plan.end_actors == ["sbx-no-container"]
    assert plan.forget == ["gone"]


def test_reconcile_never_two_containers_and_respects_busy():
    plan = plan_reconcile(
        set(),
        [actor("dup"), actor("busy", started=False)],
        [container("dup"), container("dup", engine="E2", cid="other")],
        {"E1", "E2"},
        busy={"busy"},
    )
    assert [(c.sandbox_id, c.container_id) for c in plan.remove_containers] == [("dup", "other")]
    assert [a.sandbox_id for a in plan.adopt] == ["dup"]
    assert "busy" not in plan.repair


def test_reconcile_two_actors_for_one_sandbox_keeps_the_container_owner():
    owner = actor("x", name="sbx-owner")
    stray = actor("x", name="sbx-stray", container="c-stale")
    plan = plan_reconcile({"x"}, [stray, owner], [container("x")], {"E1"})
    assert plan.end_actors == ["sbx-stray"]
    assert plan.repair == [] and plan.adopt == []


def test_reconcile_spare_actors_kept_only_when_held():
    spare = ActorView("sbx-held", None, False)
    stray = ActorView("sbx-stray", None, False)
    plan = plan_reconcile(set(), [spare, stray], [], {"E1"}, keep_names={"sbx-held"})
    assert plan.end_actors == ["sbx-stray"]


def test_reconcile_with_a_silent_actor_readopts_and_forgets_nothing():
    # The silent actor may own the orphan-looking container: wait for the next pass.
    plan = plan_reconcile({"known"}, [], [container("maybe-owned")], {"E1"}, any_unknown=True)
    assert plan.is_empty()


def test_reconcile_keeps_actor_whose_engine_was_not_seen():
    plan = plan_reconcile({"x"}, [actor("x", engine="E9")], [], {"E1"})
    assert plan.is_empty()


def test_reconcile_dead_or_unstarted_actor_needs_repair():
    plan = plan_reconcile(set(), [actor("d", dead="stopped"), actor("u", started=False)], [], {"E1"})
    assert sorted(plan.repair) == ["d", "u"]


# ── pre-warmed spares ───────────────────────────────────────────────────────


def test_spares_are_started_up_to_prewarm_and_claimed_by_new_threads():
    state, _ = make(replicas=5, prewarm=2)
    first, second = state.begin_spare("s1"), state.begin_spare("s2")
    assert first.spare and second.spare and state.begin_spare("s3") is None  # prewarm=2
    state.started("s1", "actor-1", {})
    assert state.entries["s1"].state is SandboxState.SPARE
    claimed = state.acquire("hash-of-t", "t")
    assert isinstance(claimed, Claimed) and claimed.entry.sandbox_id == "s1"
    assert claimed.entry.thread_id == "t" and claimed.entry.state is SandboxState.ACTIVE
    assert state.lookup("t") == "s1"  # the thread now maps to the spare's id
    hot = state.acquire("s1", "t")
    assert isinstance(hot, Acquired) and hot.path == "hot"
    assert state.begin_spare("s3") is not None  # one spare was used: replace it


def test_spares_count_toward_caps_are_never_idle_reaped_and_never_evict():
    state, clock = make(replicas=2, prewarm=2, idle_timeout=10)
    create(state, "a")
    state.release("a")
    assert state.begin_spare("s1") is not None
    assert state.begin_spare("s2") is None  # at the soft cap: spares never evict warm ones
    state.started("s1", "actor", {})
    clock.advance(100)
    assert [e.sandbox_id for e, _ in state.idle_candidates()] == ["a"]
    assert sorted(e.sandbox_id for e in state.begin_shutdown()) == ["a", "s1"]


def test_at_the_cap_a_thread_waits_for_a_starting_spare_instead_of_overflowing():
    state, _ = make(replicas=2, prewarm=1)
    create(state, "a")
    state.begin_spare("s1")
    decision = state.acquire("hash", "t")
    assert isinstance(decision, MustWait) and (decision.sandbox_id, decision.reason) == ("s1", "starting")
    state.started("s1", "actor", {})
    assert isinstance(state.acquire("hash", "t"), Claimed)


def test_an_acquire_with_host_directories_never_gets_a_spare():
    state, _ = make(replicas=2, prewarm=1)
    state.begin_spare("s1")
    state.started("s1", "actor", {})
    host = HostDirs("node-2", (Mount("/srv/t/workspace", "/mnt/user-data/workspace"),))
    decision = state.acquire("hash", "t", host=host)  # a spare's mounts are fixed: it will not do
    assert isinstance(decision, MustCreate) and decision.entry.host == host
    assert state.entries["s1"].state is SandboxState.SPARE
    state.started("hash", "actor-2", {})
    hot = state.acquire("hash", "t", host=HostDirs("node-3"))  # an existing sandbox comes as it is
    assert isinstance(hot, Acquired) and hot.entry.host == host


def test_at_the_cap_an_acquire_with_host_directories_does_not_wait_for_a_spare():
    state, _ = make(replicas=2, prewarm=1)
    create(state, "a")
    state.begin_spare("s1")
    decision = state.acquire("hash", "t", host=HostDirs("node-1"))
    assert isinstance(decision, MustCreate) and decision.over_soft_cap


def test_a_dead_claimed_spare_is_forgotten_and_the_thread_tries_again():
    state, _ = make(prewarm=1)
    state.begin_spare("s1")
    state.started("s1", "actor", {})
    claimed = state.acquire("hash", "t")
    state.claim_failed(claimed.entry.sandbox_id)
    assert state.lookup("t") is None
    assert isinstance(state.acquire("hash", "t"), MustCreate)


def test_adopt_refuses_a_second_sandbox_for_a_thread():
    state, _ = make()
    create(state, "a")
    assert state.adopt("other", "thread-a", "actor", {}, idle_for=0) is False


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


def test_changes_are_marked_so_reconcile_skips_what_moved_meanwhile():
    state, _ = make()
    create(state, "a")
    epoch = state.epoch
    create(state, "b")
    state.release("a")
    assert state.changed_since(epoch) == {"a", "b"}
    epoch = state.epoch
    state.removed("b")
    assert state.changed_since(epoch) == {"b"}
    assert state.changed_since(state.epoch) == set()


def test_every_state_is_in_the_transition_table():
    assert set(TRANSITIONS) == set(SandboxState)
    assert all(targets <= set(SandboxState) for targets in TRANSITIONS.values())


# ── repair rules ────────────────────────────────────────────────────────────


def facts(sid="s", known=True, doomed=False, actor_view=None, containers=(), answering=None):
    from sandbox_actors.reconcile import RepairFacts

    return RepairFacts(sid, known, doomed, actor_view, tuple(containers), answering)


def test_repair_keeps_a_healthy_pair_and_removes_any_second_container():
    from sandbox_actors.reconcile import plan_repair

    own, stray = container("s", cid="c-s"), container("s", cid="c-old")
    plan = plan_repair(facts(actor_view=actor("s"), containers=[own, stray]))
    assert plan.outcome == "healthy" and plan.remove == [stray] and not plan.forget
    assert plan_repair(facts(known=False, actor_view=actor("s"), containers=[own])).adopt


def test_repair_of_a_dead_container_or_an_owed_destroy_stops_its_actor():
    from sandbox_actors.reconcile import plan_repair

    dead = plan_repair(facts(actor_view=actor("s"), containers=[container("s", cid="c-s", running=False)]))
    assert dead.outcome == "died" and dead.stop_actor and dead.forget
    owed = plan_repair(facts(doomed=True, actor_view=actor("s"), containers=[container("s", cid="c-s")]))
    assert owed.outcome == "destroyed" and owed.stop_actor  # a live, healthy pair: destroyed all the same


def test_repair_readopts_a_container_that_answers_when_its_actor_is_gone():
    from sandbox_actors.reconcile import plan_repair, repair_needs_probe

    running = container("s", cid="c-s")
    question = facts(containers=[running])
    assert repair_needs_probe(question)
    plan = plan_repair(facts(containers=[running], answering="c-s"))
    assert plan.outcome == "readopted" and plan.readopt == running and plan.remove == []
    silent = plan_repair(facts(containers=[running]))  # probed, did not answer
    assert silent.outcome == "lost" and silent.remove == [running] and silent.forget
    owed = facts(doomed=True, containers=[running], answering="c-s")
    assert not repair_needs_probe(owed) and plan_repair(owed).outcome == "destroyed"
    unknown = plan_repair(facts(known=False, containers=[running]))
    assert unknown.outcome == "removed"


def test_the_journal_records_each_change_of_state_and_actor_once():
    state, _ = make()
    create(state, "a")
    state.update_info("a", {"actor_name": "sbx-1"})
    state.release("a")
    state.replace_actor("a", "actor-2", {"actor_name": "sbx-2"})
    state.reclaim("a", state.entries["a"].version)
    create(state, "b")
    state.removed("a")
    seen = [(e["state"], e["actor"]) for e in state.history("a")]
    assert seen == [("starting", ""), ("active", ""), ("warm", "sbx-1"), ("warm", "sbx-2"), ("active", "sbx-2"),
                    ("gone", "")]
    assert [e["sandbox_id"] for e in state.history()].count("b") == 2  # starting, active
    assert all(e["at"] > 0 for e in state.history())


def test_every_change_of_state_is_told_and_nothing_else_is():
    """The pool wakes its waiters from PoolState's one notice: every move, creation and removal
    tells it; a read (lookup, a hot acquire's refresh) does not."""
    state, clock = make(replicas=2, max_sandboxes=2, idle_timeout=10)
    told: list[tuple[str, ...]] = []
    state.on_change = lambda: told.append(tuple(sorted(e.state.value for e in state.entries.values())))
    create(state, "a")  # new (starting), then active
    assert told == [("starting",), ("active",)]
    assert isinstance(state.acquire("a", "thread-a"), Acquired) and state.lookup("thread-a") == "a"
    assert len(told) == 2  # the hot acquire only refreshed its activity
    state.release("a")
    assert told[-1] == ("warm",)
    clock.advance(11)
    [(_, version)] = state.idle_candidates()
    state.begin_idle_stop("a", version)
    assert told[-1] == ("stopping",) and state.entries["a"].stop == "idle"
    state.want_back("a")
    state.stop_called_off("a")  # back where it was, told
    assert told[-1] == ("warm",) and state.entries["a"].stop is None
    state.begin_destroy("a")
    state.removed("a")
    assert told[-1] == ()
    state.close()
    assert state.closed and len(told) == 8
