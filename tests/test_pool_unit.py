"""The pool's logic without Ray: SandboxPool on a fake fleet, in-memory records and a fake clock,
driven through the interleavings that used to go wrong."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import Mount
from sandbox_actors.config import SandboxConfig
from sandbox_actors.errors import BackendUnavailable
from sandbox_actors.pool import SandboxPool
from sandbox_actors.records import MemoryRecords, MemoryStore
from sandbox_actors.state import SandboxState
from sandbox_actors.threads import sandbox_id_for
from sandbox_actors.views import HostDirs
from tests.fakefleet import FakeActor, FakeContainer, FakeFleet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(fleet: FakeFleet | None = None, store: MemoryStore | None = None, **config) -> tuple[SandboxPool, FakeFleet]:
    fleet = fleet or FakeFleet()
    values = dict(pool_name="unit", idle_timeout=10, spare_actors=0, thread_mounts=False, reconcile_interval=3600,
                  idle_check_interval=3600)
    values.update(config)
    pool = SandboxPool(SandboxConfig(**values), fleet=fleet, records=MemoryRecords("unit", store or MemoryStore()),
                       clock=Clock())
    return pool, fleet


def run(test):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(test(), 10))


async def _until_replaced(pool: SandboxPool, sandbox_id: str, dead: object) -> None:
    """Until the pool has given the sandbox another actor than ``dead`` (2 s at most)."""
    for _ in range(200):
        if pool._state.entry(sandbox_id).actor is not dead:
            return
        await asyncio.sleep(0.01)


def test_building_a_pool_starts_nothing():
    pool, fleet = make()  # no event loop here: a constructor with side effects would fail or schedule work
    assert pool._started is None and fleet.actors == {}


def test_an_acquire_during_a_reconcile_await_is_never_forgotten():
    async def body():
        pool, fleet = make()
        await pool.ping()
        first = await pool.acquire("t1")
        fleet.silent.add(first.actor.name)  # a silent actor makes the pass look its node up (an await)
        fleet.gate("alive_nodes")
        passing = asyncio.create_task(pool.reconcile())
        await fleet.entered("alive_nodes")
        fleet.gate("start")
        starting = asyncio.create_task(pool.acquire("t2"))  # starts while the pass is awaiting
        await fleet.entered("start")
        fleet.open("alive_nodes")
        await passing  # plans with t2 STARTING: must leave it alone
        fleet.open("start")
        second = await starting
        assert second.path == "cold"
        assert pool._state.entry(second.sandbox_id).state is SandboxState.ACTIVE

    run(body)


def test_a_sandbox_asked_with_host_directories_starts_on_their_node_with_them():
    async def body():
        pool, fleet = make()
        await pool.ping()
        host = HostDirs("node-7", (Mount("/srv/chat/outputs", "/mnt/user-data/outputs"),))
        box = await pool.acquire("t1", host=host)
        container = next(c for c in fleet.boxes.values() if c.sandbox_id == box.sandbox_id)
        assert container.mounts == host.mounts and fleet.actors[box.actor.name].pinned == "node-7"
        plain = await pool.acquire("t2")
        assert fleet.actors[plain.actor.name].pinned is None
        assert next(c for c in fleet.boxes.values() if c.sandbox_id == plain.sandbox_id).mounts == ()

    run(body)


def test_an_acquire_during_a_pending_idle_stop_keeps_the_sandbox():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        pool._state.clock.now += 11  # idle past the timeout, by the pool's clock and the sandbox's own
        fleet.actor_of(box.sandbox_id).idle_for = 11
        fleet.gate("begin_stop")
        idle = asyncio.create_task(pool._life.idle_pass())
        await fleet.entered("begin_stop")  # the sandbox is being asked whether it is idle...
        back = asyncio.create_task(pool.acquire("t1"))  # ...when its thread comes back
        await asyncio.sleep(0.01)
        fleet.open("begin_stop")
        await idle
        again = await back
        assert again.sandbox_id == box.sandbox_id and again.path == "warm"  # the same sandbox, files and all
        assert fleet.creates == 1
        assert pool._life.tally.counters["idle_stop_called_off"] == 1
        assert fleet.actor_of(box.sandbox_id).stopping is False  # serving again

    run(body)


def test_a_dead_warm_sandbox_is_repaired_not_handed_out():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        fleet.kill_container(box.sandbox_id)  # before anyone could tell the pool
        again = await pool.acquire("t1")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]
        assert pool._life.tally.counters["died"] == 1

    run(body)


def test_a_warm_sandbox_its_quick_check_misjudges_is_reclaimed_not_checked_forever():
    """The actor's quick check (is the container's first process the one it started with?) once
    said no for a healthy sandbox after a live snapshot restored it; the repair's close look found
    it whole, and the acquire checked and repaired it again and again (20,000 calls in a minute of
    the live chaos run) without ever answering."""
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        checks = []

        async def misjudged(actor: FakeActor, info: dict | None = None) -> bool:
            checks.append(actor.name)
            return False

        fleet.alive = misjudged
        again = await pool.acquire("t1")
        assert again.sandbox_id == box.sandbox_id and again.path == "warm"
        assert again.info["container_id"] == box.info["container_id"]  # the same container, kept
        assert len(checks) == 1 and fleet.creates == 1
        assert pool._life.tally.counters["reclaimed"] == 1

    run(body)


def test_a_dead_warm_sandbox_with_its_engine_away_fails_the_acquire_typed():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        fleet.kill_container(box.sandbox_id)
        fleet.engine_down = True  # the repair cannot look: the acquire must not spin on it
        with pytest.raises(BackendUnavailable, match="engine does not answer"):
            await pool.acquire("t1")
        fleet.engine_down = False
        again = await pool.acquire("t1")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]

    run(body)


def test_a_destroy_the_engine_did_not_confirm_raises_and_survives_a_pool_restart():
    async def body():
        store = MemoryStore()
        pool, fleet = make(store=store)
        await pool.ping()
        box = await pool.acquire("t1")
        fleet.engine_down = True
        with pytest.raises(BackendUnavailable):
            await pool.destroy(box.sandbox_id)
        assert pool._state.entry(box.sandbox_id).state is SandboxState.DOOMED
        with pytest.raises(BackendUnavailable):
            await pool.acquire("t1")  # never handed out while its destroy is owed
        # The pool dies; a new one starts on the same records once the engine answers again.
        fleet.engine_down = False
        fleet.actor_of(box.sandbox_id).alive = False  # its actor went with the old pool's node, say
        fresh, _ = make(fleet=fleet, store=store)
        await fresh.ping()  # the first pass finishes the destroy instead of adopting it
        assert box.info["container_id"] not in fleet.boxes
        assert fresh._state.entry(box.sandbox_id) is None
        assert MemoryRecords("unit", store).doomed() == {}
        again = await fresh.acquire("t1")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]

    run(body)


def test_a_retried_anonymous_acquire_gets_the_same_sandbox_even_from_a_new_pool():
    async def body():
        store = MemoryStore()
        pool, fleet = make(store=store)
        await pool.ping()
        first = await pool.acquire(None, request_id="r1")
        assert (await pool.acquire(None, request_id="r1")).sandbox_id == first.sandbox_id
        assert (await pool.acquire(None, request_id="r2")).sandbox_id != first.sandbox_id
        fresh, _ = make(fleet=fleet, store=store)  # the pool died mid-call and was restarted
        await fresh.ping()
        retried = await fresh.acquire(None, request_id="r1")
        assert retried.sandbox_id == first.sandbox_id and fleet.creates == 2

    run(body)


def test_a_reported_death_is_repaired_at_once():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        fleet.kill_container(box.sandbox_id)
        await pool.report_dead(box.sandbox_id, box.info["container_id"])
        await pool._life.ops.wait(box.sandbox_id)
        assert pool._state.entry(box.sandbox_id) is None and pool._life.tally.counters["died"] == 1
        await pool.report_dead(box.sandbox_id, "c-unknown")  # a death of nothing it holds: ignored

    run(body)


def test_a_repair_leaves_alone_an_actor_that_serves_another_sandbox_now():
    # Reconcile looks owners up, then repairs: meanwhile a destroyed sandbox's actor may have been
    # kept as a spare and given to a new sandbox. Its view now names that one: not the repaired
    # sandbox's actor, never to be stopped or ended for it.
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        actor = fleet.actor_of(box.sandbox_id)
        outcome = await pool._life.repair(sandbox_id_for("unit", "gone"), actor)
        assert outcome == "removed" and actor.alive
        assert pool._state.entry(box.sandbox_id).state is SandboxState.ACTIVE
        assert (await pool.acquire("t1")).path == "hot"

    run(body)


def test_shutdown_waits_for_a_reconcile_pass_under_way_before_it_sweeps():
    # A pass cut short would leave its calls to the node reapers running unwatched: one could make
    # the pool's network again after the sweep removed it.
    async def body():
        pool, fleet = make()
        await pool.ping()
        swept = []
        sweep = fleet.sweep

        async def recorded_sweep() -> dict[str, int]:
            swept.append("alive_nodes" in fleet._gates)  # still gated: the pass not done
            return await sweep()

        fleet.sweep = recorded_sweep
        fleet.gate("alive_nodes")
        passing = asyncio.create_task(pool.reconcile())
        await fleet.entered("alive_nodes")
        closing = asyncio.create_task(pool.shutdown())
        await asyncio.sleep(0.05)
        assert not closing.done() and swept == []
        fleet.open("alive_nodes")
        await passing
        await closing
        assert swept == [False]  # swept once, after the pass
        assert await pool._reconciler.run() == {}  # and a pass after shutdown does nothing

    run(body)


def test_an_idle_pass_under_way_at_shutdown_starts_no_stop_of_its_own():
    # Shutdown lets a pass finish rather than cut it short; an idle pass that resumes after the
    # shutdown has begun must leave the stopping to it (an idle stop could hibernate a container
    # after the sweep looked).
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        pool._state.clock.now += 11
        fleet.actor_of(box.sandbox_id).idle_for = 11
        reasons = []
        stop_later = pool._life.stop_later

        def recorded(entry):  # noqa: ANN001, ANN202
            reasons.append(entry.stop)
            return stop_later(entry)

        pool._life.stop_later = recorded
        fleet.gate("activity")
        idle = asyncio.create_task(pool._life.idle_pass())
        await fleet.entered("activity")
        fleet.gate("close")
        closing = asyncio.create_task(pool.shutdown())
        await fleet.entered("close")  # the shutdown has begun (the pool is closed), nothing stopped yet
        fleet.open("activity")
        await idle
        fleet.open("close")
        await closing
        assert reasons == ["shutdown"] and fleet.boxes == {}

    run(body)


def test_a_report_of_an_older_container_is_ignored():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.report_dead(box.sandbox_id, "an-older-container")
        assert pool._life.ops.get(box.sandbox_id) is None
        assert pool._state.entry(box.sandbox_id).state is SandboxState.ACTIVE

    run(body)


def test_concurrent_acquires_of_one_thread_share_one_start():
    async def body():
        pool, fleet = make()
        await pool.ping()
        boxes = await asyncio.gather(*(pool.acquire("same") for _ in range(10)))
        assert len({b.sandbox_id for b in boxes}) == 1 and fleet.creates == 1
        assert boxes[0].sandbox_id == sandbox_id_for("unit", "same")

    run(body)


def test_shutdown_stops_everything_and_stays_down():
    async def body():
        pool, fleet = make()
        await pool.ping()
        await pool.acquire("a")
        await pool.release((await pool.acquire("b")).sandbox_id)
        result = await pool.shutdown()
        assert result["destroyed"] == 2 and fleet.boxes == {}
        assert pool._life.records.was_shut_down()

    run(body)


@pytest.fixture(autouse=True)
def _no_ray():
    """This tier must never start Ray (the pool's Ray calls all go through the fleet)."""
    import ray

    before = ray.is_initialized()  # a session of the Ray tests may run already
    yield
    assert ray.is_initialized() == before, "a unit test started Ray"


def test_an_actor_that_dies_is_replaced_at_once_without_waiting_for_a_reconcile():
    async def body():
        pool, fleet = make()  # reconcile_interval=3600: no pass runs during the test
        await pool.ping()
        box = await pool.acquire("t1")
        dead = fleet.actor_of(box.sandbox_id)
        dead.alive = False  # SIGKILLed: nobody calls it, nothing reports it
        await _until_replaced(pool, box.sandbox_id, dead)
        again = await pool.acquire("t1")  # an active sandbox is handed out unchecked: it must be whole
        assert again.sandbox_id == box.sandbox_id
        assert again.actor is not dead and again.actor.alive
        assert again.info["container_id"] == box.info["container_id"]  # its container re-adopted, not remade
        assert pool._life.tally.counters["readopted"] == 1

    run(body)


def test_a_death_reported_while_another_operation_is_under_way_is_repaired_after_it():
    async def body():
        pool, fleet = make()  # reconcile_interval=3600: no pass would find the death later
        await pool.ping()
        box = await pool.acquire("t1")
        fleet.gate("containers")
        looking = pool._life.repair(box.sandbox_id)  # has seen the container running, not yet decided
        await fleet.entered("containers")
        fleet.kill_container(box.sandbox_id)
        await pool.report_dead(box.sandbox_id, box.info["container_id"])  # the engine's death event
        fleet.open("containers")
        assert await looking == "healthy"  # what it saw was whole
        again = await pool.acquire("t1")  # an active sandbox is handed out unchecked: it must run
        assert again.info["container_id"] != box.info["container_id"]
        assert fleet.boxes[again.info["container_id"]].running
        assert box.info["container_id"] not in fleet.boxes  # the dead one was removed

    run(body)


def test_a_container_that_dies_as_its_start_ends_is_replaced_before_it_is_handed_out():
    async def body():
        pool, fleet = make()  # reconcile_interval=3600: no pass would find the death later
        await pool.ping()
        fleet.gate("started")
        first = asyncio.ensure_future(pool.acquire("t1"))
        await fleet.entered("started")  # its container answered; the pool has not marked it started yet
        (dead,) = fleet.boxes.values()
        fleet.kill_container(dead.sandbox_id)
        await pool.report_dead(dead.sandbox_id, dead.container_id)  # the engine's death event, during the start
        joined = asyncio.ensure_future(pool.acquire("t1"))  # a second caller shares that start's outcome
        await asyncio.sleep(0)
        fleet.open("started")
        for box in (await first, await joined):
            assert box.info["container_id"] != dead.container_id
            assert fleet.boxes[box.info["container_id"]].running
        assert dead.container_id not in fleet.boxes  # the dead one was removed

    run(body)


def test_a_death_during_a_resume_is_repaired_and_the_hibernation_s_own_stop_is_not_a_death():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        assert await pool.hibernate(box.sandbox_id)
        asleep = box.info["container_id"]
        await pool.report_dead(box.sandbox_id, asleep)  # the hibernation's stop, reported late: nothing to repair
        fleet.gate("started")
        resuming = asyncio.ensure_future(pool.acquire("t1"))
        await fleet.entered("started")  # the same container runs again; the pool has not marked it active yet
        assert fleet.resumes == 1 and fleet.creates == 1
        fleet.kill_container(box.sandbox_id)
        await pool.report_dead(box.sandbox_id, asleep)  # a real death, during the resume
        fleet.open("started")
        assert (await resuming).path == "resumed"  # its acquire began before the death: it may get the dead one
        again = await pool.acquire("t1")  # an active sandbox is handed out unchecked: it must run
        assert again.info["container_id"] != asleep and fleet.boxes[again.info["container_id"]].running

    run(body)


def test_an_acquire_naming_the_actor_it_holds_gets_no_handle_and_any_other_gets_one():
    async def body():
        pool, fleet = make()
        await pool.ping()
        first = await pool.acquire("t1")
        name = first.info["actor_name"]
        again = await pool.acquire("t1", None, None, name)  # the caller holds that handle already
        assert again.actor is None and again.info["actor_name"] == name and again.path == "hot"
        assert (await pool.acquire("t1", None, None, "sbx-some-other")).actor is first.actor
        fleet.actor_of(first.sandbox_id).alive = False  # replaced: the name no longer matches
        await _until_replaced(pool, first.sandbox_id, first.actor)
        replaced = await pool.acquire("t1", None, None, name)
        assert replaced.actor is not None and replaced.actor is not first.actor

    run(body)


def test_a_client_fills_in_the_handle_it_keeps_and_forgets_the_oldest():
    from sandbox_actors.client import _KnownActors
    from sandbox_actors.views import Lease

    known = _KnownActors(size=2)
    for thread in ("a", "b", "c"):
        known.complete(thread, Lease(f"s-{thread}", thread, f"handle-{thread}", "cold", {"actor_name": f"n-{thread}"}),
                       None)
    assert known.get("a") is None and known.get("c") == ("n-c", "handle-c")  # at most 2 kept
    held = known.get("b")
    filled = known.complete("b", Lease("s-b", "b", None, "hot", {"actor_name": "n-b"}), held)
    assert filled.actor == "handle-b"
    assert known.get(None) is None  # anonymous sandboxes are never kept
    import pickle

    travelled = pickle.loads(pickle.dumps(known))  # a handle sent to another task carries its client
    assert travelled.get("b") is None and travelled._size == 2


def test_a_start_that_finds_a_live_owner_hands_the_thread_to_that_owner():
    """A start can find the sandbox's container served already by another actor that lives (one a
    restarted pool lost track of). The start says so instead of serving it; the pool ends its own
    new actor and hands the thread to the owner: one actor per container, none made twice."""
    async def body():
        pool, fleet = make()
        await pool.ping()
        sandbox_id = sandbox_id_for("unit", "t1")
        fleet.boxes["c-old"] = FakeContainer(sandbox_id, "c-old", "t1")
        owner = FakeActor("sbx-owner", sandbox_id, "t1", "c-old")
        fleet.actors[owner.name] = owner
        box = await pool.acquire("t1")
        assert box.actor is owner and box.info["container_id"] == "c-old"
        assert [a.name for a in fleet.actors.values() if a.alive] == ["sbx-owner"]  # the new one was ended
        assert fleet.creates == 0

    run(body)


def test_creating_past_the_soft_limit_warns_once_a_minute_with_the_count(caplog):
    from sandbox_actors.acquire import _SoftCapWarning

    clock = Clock()
    warning = _SoftCapWarning(clock)
    with caplog.at_level("WARNING", logger="sandbox_actors.acquire"):
        said = [warning.note(4, f"s{i}") for i in range(5)]
        clock.now += 61
        said.append(warning.note(4, "s5"))
    assert said == [True, False, False, False, False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "all 4 replica slots are in use; creating sandbox s0 beyond the soft limit",
        "all 4 replica slots are in use; creating sandbox s5 beyond the soft limit (and 4 more since the last warning)",
    ]


def test_a_warm_sandbox_on_the_pool_s_node_is_checked_there_and_its_actor_asked_otherwise():
    """RayFleet.alive with what the actor last said: on the pool's node, the actor's process and
    the container's first process still being the ones named settle it without a call; on another
    node, after a restore (a new first process) or once that process is gone, the actor is asked."""
    import os
    import subprocess

    from sandbox_actors.fleet import RayFleet
    from sandbox_actors.procfs import process_start

    asked: list[bool] = []

    class Actor:  # as Ray's handle is called: actor.alive.remote() gives what to await
        class alive:  # noqa: N801
            @staticmethod
            def remote():  # noqa: ANN205
                async def answer() -> bool:
                    asked.append(True)
                    return False  # the actor's own answer: its container is gone
                return answer()

    first = subprocess.Popen(["sleep", "60"])  # stands for the container's first process
    try:
        fleet = RayFleet(SandboxConfig(pool_name="unit"))
        fleet._here = "node-a"  # the pool's node (Ray would say)
        info = {"node_id": "node-a", "dead_reason": None, "pid": os.getpid(), "pid_started": process_start(os.getpid()),
                "container_pid": first.pid, "container_started": process_start(first.pid)}

        async def body():
            assert await fleet.alive(Actor, info) and asked == []
            for other in ({"node_id": "node-b"}, {"container_started": "1"}, {"pid_started": None},
                          {"dead_reason": "its container stopped"}):
                assert not await fleet.alive(Actor, {**info, **other}), other
            assert len(asked) == 4
            first.kill()
            first.wait()
            assert not await fleet.alive(Actor, info) and len(asked) == 5
        run(body)
    finally:
        first.kill()
        first.wait()
