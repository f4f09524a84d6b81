"""Hibernation's logic without Ray: SandboxPool on a fake fleet, in-memory records, a fake clock.
The real thing (containers, files kept, a restarted pool) is in tests/test_lifecycle.py."""

from __future__ import annotations

import asyncio

import pytest

from sandbox_actors.errors import BackendUnavailable, InvalidRequest
from sandbox_actors.records import MemoryRecords, MemoryStore
from sandbox_actors.state import SandboxState
from tests.test_pool_unit import make, run


async def idle_out(pool, fleet, box) -> None:
    """Make ``box`` idle past the timeout and run the idle pass."""
    pool._state.clock.now += 11
    fleet.actor_of(box.sandbox_id).idle_for = 11
    await pool._idle_pass()
    await pool._life.ops.drain()


def test_an_idle_sandbox_hibernates_and_its_thread_resumes_the_same_container():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        actor = fleet.actor_of(box.sandbox_id)
        await idle_out(pool, fleet, box)
        entry = pool._state.entry(box.sandbox_id)
        assert entry.state is SandboxState.HIBERNATED
        assert not actor.alive and not fleet.boxes[box.info["container_id"]].running  # kept, stopped
        assert pool._life.records.hibernated()[box.sandbox_id]["container_id"] == box.info["container_id"]
        again = await pool.acquire("t1")
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]
        assert fleet.creates == 1 and fleet.resumes == 1
        assert pool._life.records.hibernated() == {}
        assert pool._life.tally.counters["hibernated"] == 1 and pool._life.tally.counters["resumed"] == 1

    run(body)


def test_a_destroying_pool_still_destroys_idle_sandboxes():
    async def body():
        pool, fleet = make()
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.release(box.sandbox_id)
        await idle_out(pool, fleet, box)
        assert pool._state.entry(box.sandbox_id) is None and box.info["container_id"] not in fleet.boxes

    run(body)


def test_a_restarted_pool_keeps_a_hibernated_sandbox_instead_of_reaping_its_stopped_container():
    async def body():
        store = MemoryStore()
        pool, fleet = make(store=store, idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        assert await pool.hibernate(box.sandbox_id)
        fresh, _ = make(fleet=fleet, store=store, idle_action="hibernate")
        await fresh.ping()  # its first reconcile pass meets a stopped container with no actor
        assert fresh._state.entry(box.sandbox_id).state is SandboxState.HIBERNATED
        assert box.info["container_id"] in fleet.boxes
        again = await fresh.acquire("t1")
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]

    run(body)


async def hibernated_then_removed():
    """A pool with thread t1's sandbox hibernated and its stopped container then removed by
    someone else (`docker rm`). Returns (pool, fleet, the sandbox's last lease)."""
    pool, fleet = make(idle_action="hibernate")
    await pool.ping()
    box = await pool.acquire("t1")
    await pool.hibernate(box.sandbox_id)
    del fleet.boxes[box.info["container_id"]]
    return pool, fleet, box


def test_a_hibernated_sandbox_whose_container_vanished_is_forgotten_and_its_thread_starts_afresh():
    async def body():
        pool, fleet, box = await hibernated_then_removed()
        await pool.reconcile()
        assert pool._state.entry(box.sandbox_id) is None
        assert pool._life.records.hibernated() == {}
        again = await pool.acquire("t1")
        assert again.path == "cold"

    run(body)


def test_a_hibernated_sandbox_whose_container_vanished_before_any_reconcile_is_not_called_resumed():
    async def body():
        pool, fleet, box = await hibernated_then_removed()  # and no reconcile pass since
        again = await pool.acquire("t1")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]
        assert fleet.resumes == 0 and pool._life.records.hibernated() == {}
        assert (await pool.stats())["counters"]["resume_failed"] == 1

    run(body)


def test_hibernated_sandboxes_expire_after_the_ttl_and_beyond_the_most_kept():
    async def body():
        pool, fleet = make(idle_action="hibernate", hibernate_ttl=100, max_hibernated=1)
        await pool.ping()
        first, second = await pool.acquire("t1"), await pool.acquire("t2")
        await pool.hibernate(first.sandbox_id)
        pool._state.clock.now += 1
        await pool.hibernate(second.sandbox_id)
        await pool._idle_pass()  # two asleep, one kept: the older goes
        await pool._life.ops.drain()
        assert pool._state.entry(first.sandbox_id) is None and first.info["container_id"] not in fleet.boxes
        assert pool._state.entry(second.sandbox_id).state is SandboxState.HIBERNATED
        pool._state.clock.now += 101
        await pool._idle_pass()
        await pool._life.ops.drain()
        assert pool._state.entry(second.sandbox_id) is None and second.info["container_id"] not in fleet.boxes
        assert MemoryRecords("unit", pool._life.records._store).hibernated() == {}

    run(body)


def test_hibernated_sandboxes_do_not_count_toward_max_sandboxes():
    async def body():
        pool, _fleet = make(idle_action="hibernate", max_sandboxes=1, replicas=1, capacity_timeout=0.2)
        await pool.ping()
        first = await pool.acquire("t1")
        await pool.hibernate(first.sandbox_id)
        second = await pool.acquire("t2")  # room: the first one holds no actor and no running container
        assert second.path == "cold"

    run(body)


def test_an_acquire_during_a_hibernation_waits_for_it_then_resumes():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        fleet.gate("hibernate")
        sleeping = asyncio.create_task(pool.hibernate(box.sandbox_id))
        await fleet.entered("hibernate")
        back = asyncio.create_task(pool.acquire("t1"))
        await asyncio.sleep(0.01)
        fleet.open("hibernate")
        assert await sleeping
        again = await back
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]

    run(body)


def test_a_hibernation_the_engine_refuses_leaves_the_sandbox_serving():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        fleet.engine_down = True
        with pytest.raises(BackendUnavailable):
            await pool.hibernate(box.sandbox_id)
        fleet.engine_down = False
        assert pool._state.entry(box.sandbox_id).state is SandboxState.ACTIVE
        assert (await pool.acquire("t1")).path == "hot"

    run(body)


def test_a_snapshot_only_starts_new_sandboxes():
    async def body():
        pool, _fleet = make()
        await pool.ping()
        await pool.acquire("t1")
        with pytest.raises(InvalidRequest, match="no snapshot named"):
            await pool.acquire("t2", snapshot="nope")
        pool._life.snapshot_records["base"] = {"name": "base", "image": "img:base", "engine_id": "engine-1"}
        with pytest.raises(InvalidRequest, match="exists already"):
            await pool.acquire("t1", snapshot="base")

    run(body)


def test_a_fork_whose_actor_died_as_it_started_gets_its_sandbox_back_not_an_error():
    async def body():
        pool, fleet = make()
        await pool.ping()
        pool._life.snapshot_records["base"] = {"name": "base", "image": "img:base", "engine_id": "engine-1"}
        fleet.gate("started")
        fork = asyncio.ensure_future(pool.acquire("fork-1", snapshot="base"))
        await fleet.entered("started")
        (box,) = fleet.boxes.values()
        await pool.report_dead(box.sandbox_id)  # its actor's death, reported during the start
        fleet.open("started")
        got = await fork  # the repair finds the container whole: it is the fork's, not "exists already"
        assert got.sandbox_id == box.sandbox_id and fleet.boxes[got.info["container_id"]].running

    run(body)


def test_a_hibernated_sandbox_whose_engine_is_gone_gives_its_thread_a_new_sandbox():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.hibernate(box.sandbox_id)
        fleet.engine_lost = True  # its node went, and the engine with it
        fleet.boxes.clear()
        again = await pool.acquire("t1")
        assert again.path == "cold" and again.info["container_id"] != box.info["container_id"]
        assert pool._life.tally.counters["resume_failed"] == 1
        assert pool._life.records.hibernated() == {}

    run(body)


def test_a_resume_while_its_engine_is_away_fails_typed_and_the_sandbox_sleeps_on():
    async def body():
        pool, fleet = make(idle_action="hibernate")
        await pool.ping()
        box = await pool.acquire("t1")
        await pool.hibernate(box.sandbox_id)
        fleet.engine_down = True  # its node lives; its engine does not answer for a moment
        with pytest.raises(BackendUnavailable):
            await pool.acquire("t1")
        assert pool._state.entry(box.sandbox_id).state is SandboxState.HIBERNATED
        assert box.info["container_id"] in fleet.boxes  # nothing given up
        fleet.engine_down = False
        again = await pool.acquire("t1")
        assert again.path == "resumed" and again.info["container_id"] == box.info["container_id"]

    run(body)


class _Fleet:
    """The fleet's node and engine look-ups, as a resume uses them."""

    def __init__(self, answering: dict[str, str], alive: set[str]) -> None:
        self.engine_on: dict[str, str] = {}
        self.answering, self.alive, self.looked_up = answering, alive, 0

    async def engines(self):
        self.looked_up += 1
        self.engine_on = dict(self.answering)
        return {engine: ("reaper", node) for node, engine in sorted(self.answering.items())}

    async def alive_nodes(self):
        return self.alive


def _life_with(answering: dict[str, str], full: set[str], alive=frozenset({"lost", "survivor", "elsewhere"})):
    from types import SimpleNamespace

    from sandbox_actors.errors import PoolExhausted

    tried: list[str] = []

    async def start_sandbox(sandbox_id, thread_id, node_id=None, resume=False, container_id=None, checkpoint=None):
        assert resume and container_id == "c1"  # started by the id the pool recorded
        tried.append(node_id)
        if node_id in full:
            raise PoolExhausted(f"no room on {node_id}")
        return "actor", {"node_id": node_id}

    return SimpleNamespace(fleet=_Fleet(answering, set(alive)), start_sandbox=start_sandbox), tried


def _asleep_on(node: str):
    from types import SimpleNamespace

    return SimpleNamespace(sandbox_id="s1", thread_id="t1", container_id="c1",
                           info={"engine_id": "engine-1", "node_id": node})


def test_a_resume_tries_every_node_on_its_engine_its_own_first():
    """Right after a node is lost, Ray still lists it alive (and its reaper may still answer):
    an actor pinned there is never placed (the multinode run's PoolExhausted). A resume then
    tries the next node on the same engine; a node whose reaper is gone is not tried at all."""
    from sandbox_actors.errors import PoolExhausted
    from sandbox_actors.hibernation import _start_on_its_engine

    entry = _asleep_on("lost")
    life, tried = _life_with({"lost": "engine-1", "survivor": "engine-1", "elsewhere": "engine-2"}, full={"lost"})
    assert asyncio.run(_start_on_its_engine(life, entry)) == ("actor", {"node_id": "survivor"})
    assert tried == ["lost", "survivor"]  # its own node first; never a node of another engine
    life, tried = _life_with({"survivor": "engine-1"}, full=set())
    asyncio.run(_start_on_its_engine(life, entry))
    assert tried == ["survivor"]  # a node whose reaper did not answer is not tried
    life, tried = _life_with({"lost": "engine-1", "survivor": "engine-1"}, full={"lost", "survivor"})
    with pytest.raises(PoolExhausted):
        asyncio.run(_start_on_its_engine(life, entry))


def test_a_resume_on_a_node_the_pool_knows_alive_asks_no_reaper_first():
    """The engines as the pool last looked them up (reconcile does, every pass) serve a resume
    while Ray lists the sandbox's own node alive; once Ray lists it dead, they are looked up
    again, and the resume goes to a live node on the same engine."""
    from sandbox_actors.hibernation import _start_on_its_engine

    entry = _asleep_on("lost")
    life, tried = _life_with({"lost": "engine-1", "survivor": "engine-1"}, full=set())
    life.fleet.engine_on = {"lost": "engine-1", "survivor": "engine-1", "elsewhere": "engine-2"}
    assert asyncio.run(_start_on_its_engine(life, entry)) == ("actor", {"node_id": "lost"})
    assert tried == ["lost"] and life.fleet.looked_up == 0
    life.fleet.alive, life.fleet.answering = {"survivor", "elsewhere"}, {"survivor": "engine-1"}
    assert asyncio.run(_start_on_its_engine(life, entry)) == ("actor", {"node_id": "survivor"})
    assert tried == ["lost", "survivor"] and life.fleet.looked_up == 1
