"""The reconcile pass: compare what exists with what the pool believes, and make them agree.

It gathers three views across awaits (live SandboxActors, each engine's
labelled containers, silent actors' nodes), then takes the pool's own facts
(its entries, what is busy, what changed) after the last await, plans with
:func:`~sandbox_actors.reconcile.plan_reconcile`, and carries the plan out
through the :class:`~sandbox_actors.lifecycle.Lifecycle`. A pass never dies:
the pool's loop logs a failing one and runs the next.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from . import hibernation, snapshots
from .engines import Engines
from .errors import SandboxError
from .lifecycle import Lifecycle
from .raycalls import ActorGone
from .reconcile import ActorView, ContainerView, AsleepPlan, ReconcilePlan, plan_asleep, plan_reconcile
from .state import ASLEEP, SandboxState

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What one pass saw across its awaits (the pool's own facts are read after them)."""

    epoch: int
    owed: dict[str, str | None]  # owed destroys: sandbox id -> container id
    asleep_records: dict[str, dict[str, object]]
    views: list[ActorView]
    handles: dict[str, Any]  # actor name -> handle
    silent: set[str]  # actor names that did not answer
    engines: Engines
    containers: list[ContainerView]
    engines_seen: set[str]
    alive: set[str]  # live node ids


class Reconciler:
    """Runs reconcile passes for one pool (one at a time)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._life = lifecycle
        self._lock = asyncio.Lock()

    async def run(self, strict: bool = False) -> dict[str, int]:
        """One pass; returns what it did (counts per action). With ``strict``, a node that cannot
        isolate sandboxes as configured raises (IsolationUnavailable, NotSupported)."""
        async with self._lock:
            if self._life.closed:
                return {}  # shutting down: the sweep removes what exists
            return await self._pass(strict)

    async def finish(self) -> None:
        """Until a pass under way has ended (for shutdown: no pass may remake what the sweep
        removes, such as an engine's network). Passes after :attr:`Lifecycle.closed` do nothing."""
        async with self._lock:
            return

    async def _pass(self, strict: bool) -> dict[str, int]:
        life = self._life
        seen = await self._look(strict)
        # The last await is behind us: the pool's own facts from here on are current, and nothing
        # below awaits before the plan is carried out as far as forgetting entries goes.
        plan, sleeping, owners = self._plan(seen)
        done: collections.Counter[str] = collections.Counter()
        self._settle(plan, seen, done)
        await self._carry_out(plan, sleeping, owners, seen, done)
        for key, value in done.items():
            life.tally.count(f"reconcile_{key}", value)
        life.tally.count("reconcile_passes")
        if not plan.is_empty():
            logger.info("reconcile: %s", dict(done))
        life.top_up()
        return {key: value for key, value in done.items() if value}

    async def _look(self, strict: bool) -> _Seen:
        """What exists now, gathered across awaits: records, actors, engines, containers, nodes."""
        life, fleet = self._life, self._life.fleet
        epoch = life.state.epoch
        owed = await asyncio.to_thread(life.records.doomed)
        asleep_records = await asyncio.to_thread(life.records.hibernated)
        views, handles, silent = await fleet.actor_views()
        engines = await fleet.engines()
        await fleet.prepare(engines, strict)
        containers, engines_seen = await fleet.containers(engines)
        alive = await fleet.alive_nodes()
        await snapshots.reap(life, engines)
        return _Seen(epoch, owed, asleep_records, views, handles, silent, engines, containers, engines_seen, alive)

    def _plan(self, seen: _Seen) -> tuple[ReconcilePlan, AsleepPlan, dict[str, ActorView]]:
        """The plan, from what was seen and the pool's facts now (no await)."""
        life = self._life
        state, fleet = life.state, life.fleet
        changed = state.changed_since(seen.epoch)
        for sandbox_id, container_id in seen.owed.items():
            if sandbox_id not in changed:
                state.doomed_found(sandbox_id, None, container_id)  # a dead pool owed it: never adopt it
        hibernation.load(life, seen.asleep_records, changed)
        # Owed destroys are finished by repairs, never judged by the plan; hibernated sandboxes
        # keep their stopped container (planned apart).
        doomed = {sid for sid in state.ids({SandboxState.DOOMED}) if life.ops.get(sid) is None}
        asleep = [e for e in state.in_state(SandboxState.HIBERNATED) if e.sandbox_id not in changed
                  and life.ops.get(e.sandbox_id) is None]
        busy = (life.ops.busy() | changed | state.ids({SandboxState.STARTING, SandboxState.STOPPING,
                                                      SandboxState.DOOMED, *ASLEEP, SandboxState.RESUMING}))
        silent_ids, unplaced = self._place_silent(seen.silent, seen.handles, seen.alive)
        plan = plan_reconcile(state.ids(), seen.views, seen.containers, seen.engines_seen, busy | silent_ids,
                              fleet.keep_names, any_unknown=unplaced)
        plan.repair += sorted(doomed)
        sleeping = plan_asleep([(e.sandbox_id, e.container_id, e.info.get("engine_id"), e.info.get("node_id"))
                                for e in asleep], seen.containers, seen.engines_seen, seen.alive)
        plan.forget += sleeping.forget
        plan.remove_containers += sleeping.remove_containers
        asleep_ids = {e.sandbox_id for e in asleep}
        plan.end_actors += [v.name for v in seen.views if v.sandbox_id in asleep_ids and v.name not in plan.end_actors]
        owners = {v.sandbox_id: v for v in seen.views if v.sandbox_id is not None and v.name not in plan.end_actors}
        return plan, sleeping, owners

    def _settle(self, plan: ReconcilePlan, seen: _Seen, done: collections.Counter[str]) -> None:
        """Adopt and forget, before any await (the facts they rest on are current)."""
        life = self._life
        state, fleet = life.state, life.fleet
        for view in plan.adopt:
            if view.sandbox_id is not None and state.adopt(view.sandbox_id, view.thread_id, seen.handles[view.name],
                                                           dict(view.info), view.idle_for):
                done["adopted"] += 1
            else:  # its thread already has another sandbox: never two
                fleet.later(fleet.discard(seen.handles[view.name]))
                done["ended_actors"] += 1
        for sandbox_id in plan.forget:
            state.removed(sandbox_id)
            life.tally.count("lost")
            done["forgotten"] += 1

    async def _carry_out(self, plan: ReconcilePlan, sleeping: AsleepPlan, owners: dict[str, ActorView],
                         seen: _Seen, done: collections.Counter[str]) -> None:
        """Remove, end and repair what the plan says (across awaits: each step checks again)."""
        life, fleet, handles = self._life, self._life.fleet, seen.handles
        if sleeping.forget:
            logger.warning("hibernated sandboxes lost with their container or node: %s", sleeping.forget)
            await asyncio.to_thread(_each, life.records.drop_hibernated, sleeping.forget)
        for container in plan.remove_containers:
            if container.engine_id in seen.engines and await fleet.remove(seen.engines, container):
                done["removed_containers"] += 1
        for name in plan.end_actors:
            if await self._still_unwanted(name, handles[name]):
                fleet.kill(handles[name])  # a kill, not a stop: a duplicate's container is another's
                done["ended_actors"] += 1
        repairs = [
            life.repair(sandbox_id, handles.get(owners[sandbox_id].name) if sandbox_id in owners else None)
            for sandbox_id in dict.fromkeys(plan.repair)
        ]
        results = await asyncio.gather(*(r for r in repairs if r is not None), return_exceptions=True)
        done["repaired"] += sum(1 for r in results if r == "readopted")
        done["removed_containers"] += sum(1 for r in results if r in ("removed", "died", "lost"))
        done["destroyed"] += sum(1 for r in results if r == "destroyed")

    def _place_silent(self, silent: set[str], handles: dict[str, Any], alive: set[str]) -> tuple[set[str], bool]:
        """Sandbox ids whose actor did not answer, and whether any such actor is not ours to place."""
        if not silent:
            return set(), False
        state, fleet = self._life.state, self._life.fleet
        by_name = {e.info.get("actor_name"): e for e in state.entries.values()}
        ids, unplaced = set(), False
        for name in silent:
            entry = by_name.get(name)
            if entry is None:
                unplaced = unplaced or name not in fleet.keep_names
            elif entry.info.get("node_id") not in alive:
                fleet.kill(handles[name])  # its node is gone: so is it; free its name and slot now
            else:
                ids.add(entry.sandbox_id)
        return ids, unplaced

    async def _still_unwanted(self, name: str, handle: Any) -> bool:
        """Ask an actor once more before ending it: it may have been given a sandbox since."""
        fleet = self._life.fleet
        if name in fleet.keep_names:
            return False
        try:
            info = await fleet.describe(handle)
        except ActorGone:
            return False  # already gone
        except SandboxError:
            return False  # silent: decide next pass
        entry = self._life.state.entry(info.get("sandbox_id") or "")
        return entry is None or entry.info.get("actor_name") != name


def _each(call: Callable[[str], None], items: Iterable[str]) -> None:
    for item in items:
        call(item)
