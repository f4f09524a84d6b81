"""Carrying out the pool's decisions, one sandbox at a time: start, check, claim, stop, repair.

Each is an operation of :class:`~sandbox_actors.operations.Operations` (one
per sandbox at a time, which anyone needing the sandbox waits for). They act
through the :class:`~sandbox_actors.fleet.Fleet` and report back to the
:class:`~sandbox_actors.state.PoolState`; after every ``await`` they ask the
state again instead of trusting what they saw before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from backends.base import Mount

from .config import SandboxConfig
from .errors import (
    BackendUnavailable,
    PoolExhausted,
    SandboxDied,
    SandboxError,
    SandboxStartError,
)
from .fleet import WATCH_SECONDS, Fleet
from .metrics import Tally
from .operations import OpKind, Operations
from .options import reaper_name
from .raycalls import ActorGone
from .reconcile import RepairFacts, RepairPlan, plan_repair, repair_needs_probe
from .records import PoolRecords
from .state import Entry, MustCheck, PoolState, SandboxState, StopReason
from .threads import anonymous_sandbox_id
from .views import ActorView, ContainerView, Lease, StartOutcome

logger = logging.getLogger(__name__)

_START_ATTEMPTS = 3
_PLACEMENT_POLL = 1.0


class Changed:
    """Wakes whoever waits for the pool's state to change (capacity freed, a stop done)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))


# What a death report acts on: sandboxes that serve, repaired at once; and those in passing, always
# under an operation (a start, a stop, a hibernation, a resume), settled when it ends.
_SERVING = (SandboxState.SPARE, SandboxState.ACTIVE, SandboxState.WARM)
_IN_PASSING = (SandboxState.STARTING, SandboxState.STOPPING, SandboxState.HIBERNATING, SandboxState.RESUMING)


_COUNTED_AS = {StopReason.IDLE: "reaped", StopReason.SHUTDOWN: "destroyed"}  # the counter a stop adds to


def lease(entry: Entry, path: str) -> Lease:
    return Lease(entry.sandbox_id, entry.thread_id, entry.actor, path, dict(entry.info))


class Lifecycle:
    """The operations on a pool's sandboxes.

    Args:
        config: the pool's config.
        state: the pool's decisions.
        fleet: its actors and reapers.
        records: what it keeps in Ray's KV (called in worker threads).
        tally: event counts and metrics.
    """

    def __init__(self, config: SandboxConfig, state: PoolState, fleet: Fleet, records: PoolRecords,
                 tally: Tally) -> None:
        self.config = config
        self.state = state
        self.fleet = fleet
        self.records = records
        self.tally = tally
        self.ops = Operations()
        self.changed = Changed()
        self.snapshot_records: dict[str, dict[str, Any]] = {}  # snapshot name -> its record (as in Ray's KV)
        self._watches: dict[str, asyncio.Task[None]] = {}  # actor key -> the watch on it
        self.capacity_waits = 0  # acquires waiting for capacity (max_sandboxes) now
        self._told = False  # a change is told already, on the loop's next turn
        state.on_change = self._state_changed

    @property
    def closed(self) -> bool:
        """The pool is shutting down (or refused to start): nothing new starts, nothing is repaired."""
        return self.state.closed

    def _state_changed(self) -> None:
        """PoolState tells every change; what it means is told once per turn of the loop, after
        the decision that made it is complete."""
        if self._told:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a pool being built): nobody can be waiting yet
            self._notify()
            return
        self._told = True
        loop.call_soon(self._notify)

    def _notify(self) -> None:
        """The state changed: wake whoever waits on it, and watch any actor newly serving a sandbox."""
        self._told = False
        self.changed.notify()
        self.tally.states(self.state.counts())
        self._watch_actors()

    # ── hearing of an actor's death ────────────────────────────────────────

    def _watch_actors(self) -> None:
        """One watch per actor serving a sandbox. An acquire of an active sandbox hands its actor
        out unchecked (that is what makes it fast), so a dead actor must leave the table the moment
        it dies: the reconcile pass would find it only ``reconcile_interval`` later."""
        if self.closed:
            return
        for entry in self.state.entries.values():
            if entry.actor is not None:
                key = self.fleet.actor_key(entry.actor)
                if key not in self._watches:
                    self._watches[key] = self.fleet.later(self._watch(entry.actor, key))

    async def _watch(self, actor: Any, key: str) -> None:
        try:
            while not self.closed and self._served_by(key):
                began = time.monotonic()
                if not await self.fleet.outlives(actor, WATCH_SECONDS):
                    await self._actor_died(key)
                    return
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))  # never a busy loop
        finally:
            del self._watches[key]

    def _served_by(self, key: str) -> list[str]:
        return [e.sandbox_id for e in self.state.entries.values()
                if e.actor is not None and self.fleet.actor_key(e.actor) == key]

    async def _actor_died(self, key: str) -> None:
        """Repair what the dead actor served (a repair re-adopts a running container with a new actor)."""
        served = self._served_by(key)
        for sandbox_id in served:
            logger.info("sandbox %s: its actor died; repairing it", sandbox_id)
            self.died(sandbox_id)
        for sandbox_id in served:
            # Until then this watch stays registered, so no second one starts on the dead actor.
            await self.ops.wait(sandbox_id)

    def died(self, sandbox_id: str) -> None:
        """Its actor, a client or the engine says the sandbox died: repair it now, or, when an
        operation is under way on it (a start, a stop, a hibernation, a resume, a snapshot, ...),
        as soon as that ends. Never dropped: an operation that looked before the death may end
        believing it whole, and an active sandbox is handed out unchecked."""
        entry = self.state.entry(sandbox_id)
        if entry is None or self.closed or entry.state not in _SERVING + _IN_PASSING:
            return  # unknown, doomed, or hibernated (its container is stopped on purpose)
        if entry.state in _SERVING and self.repair(sandbox_id) is not None:
            return
        # (A stop's or a hibernation's own container stopping is reported too: settled as nothing.)
        # An acquire settles a reported death before handing the sandbox out (see acquire).
        if self.ops.get(sandbox_id) is not None and self.state.report_death(sandbox_id):
            logger.debug("sandbox %s reported dead during its %s", sandbox_id, self.ops.kind(sandbox_id))
            self.fleet.later(self._repair_after(sandbox_id))

    def settle(self, sandbox_id: str) -> asyncio.Task[str] | None:
        """A death reported during an operation that has ended: the repair it calls for, None when
        there is none to make (the sandbox is gone, doomed or hibernated since)."""
        self.state.death_settled(sandbox_id)
        entry = self.state.entry(sandbox_id)
        if entry is None or entry.state not in _SERVING:
            return None
        logger.info("sandbox %s was reported dead during an operation now ended; repairing it", sandbox_id)
        return self.repair(sandbox_id)

    async def _repair_after(self, sandbox_id: str) -> None:
        while sandbox_id in self.state.deaths and not self.closed:
            await self.ops.wait(sandbox_id)
            if self.ops.get(sandbox_id) is None:
                self.settle(sandbox_id)

    def stop_watching(self) -> None:
        """At shutdown: the watches end (the actors are ended by the shutdown itself)."""
        for watch in self._watches.values():
            watch.cancel()

    # ── starting ───────────────────────────────────────────────────────────

    def create(self, entry: Entry) -> asyncio.Task[Lease]:
        """Start the container of a new STARTING entry (the 'start' operation)."""
        return self.ops.start(entry.sandbox_id, OpKind.START, self._create(entry))

    async def _create(self, entry: Entry) -> Lease:
        sandbox_id = entry.sandbox_id
        try:
            actor, info = await self.start_sandbox(sandbox_id, entry.thread_id, **self._image_of(entry),
                                                   **self._host_of(entry))
        except BaseException:
            self.state.start_failed(sandbox_id)
            self.tally.count("failed")
            raise
        started = self.state.started(sandbox_id, actor, info)
        if started is None:  # the pool let go of it meanwhile (shutting down): keep nothing
            self.fleet.later(self.fleet.discard(actor))
            raise SandboxDied(f"sandbox {sandbox_id} was let go while it started; acquire again")
        adopted = bool(info.get("adopted"))
        self.tally.count("adopted" if adopted else "created")
        return lease(started, "adopted" if adopted else "cold")

    def _image_of(self, entry: Entry) -> dict[str, Any]:
        """How a sandbox started from a snapshot gets its image: the name, and the name of the
        reaper of an engine that has it (for a node whose engine does not). A name, not the
        handle: an actor handle in a call's arguments cost each new SandboxActor ~40 ms of CPU
        (32 forks at once: 3.2-3.3 s of the actors' CPU instead of 1.9-2.1), and only an actor
        on another node ever uses it."""
        if entry.image is None:
            return {}
        record = self.snapshot_records.get(entry.image, {})
        node_id = record.get("node_id")
        source = reaper_name(self.config, node_id) if node_id and self.fleet.reaper_on(node_id) is not None else None
        checkpoint = record.get("checkpoint") or {}
        return {"image": record.get("image", entry.image), "image_from": source,
                **({"restore_from": checkpoint["path"]} if checkpoint.get("path") else {})}

    @staticmethod
    def _host_of(entry: Entry) -> dict[str, Any]:
        """The node a new sandbox must start on and the directories it mounts, when asked for."""
        if entry.host is None:
            return {}
        return {"node_id": entry.host.node_id, "mounts": entry.host.mounts}

    async def start_sandbox(
        self, sandbox_id: str, thread_id: str | None, node_id: str | None = None, resume: bool = False,
        image: str | None = None, image_from: str | None = None, container_id: str | None = None,
        mounts: tuple[Mount, ...] = (), checkpoint: str | None = None, restore_from: str | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """An actor serving ``sandbox_id`` with its container up and answering (pinned to
        ``node_id`` when given). Adopts the live actor that already owns the container, if any;
        starts its stopped container again with ``resume`` (by ``container_id`` when known; from
        its live ``checkpoint`` when given);
        creates a new one of ``image`` (a snapshot's; from its checkpoint in ``restore_from``, a
        live one's) when given, mounting ``mounts`` (host
        directories of ``node_id``) instead of the pool's thread directories when given.

        Raises:
            PoolExhausted: no node had room within ``capacity_timeout``.
            ImageNotFound, ReadinessTimeout, SandboxStartError, ...: the container did not start.
        """
        fleet = self.fleet
        fleet.start_began()
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                actor, name, spare = await fleet.actor_for(node_id)
                try:
                    if not spare:  # a spare is placed already: it answered before it became one
                        await self._place(actor, sandbox_id, node_id)
                    info = await fleet.start(actor, sandbox_id, thread_id, resume, image, image_from, container_id,
                                             mounts, checkpoint, restore_from)
                except PoolExhausted:
                    fleet.kill(actor)  # never placed: nothing to stop
                    raise
                except SandboxDied:
                    fleet.kill(actor)  # the actor died under us (e.g. a spare): try another
                    if attempt == _START_ATTEMPTS:
                        raise
                    continue
                except BaseException:
                    fleet.later(fleet.discard(actor))
                    raise
                finally:
                    fleet.launched(name)
                if info.get("outcome") != StartOutcome.OWNED:
                    return actor, info
                # Another live actor serves the container (a start a pool restart cut short): this
                # one served nothing; the sandbox is the owner's once its start is done.
                fleet.kill(actor)
                try:
                    return await fleet.owner_of(sandbox_id, info["owner"])
                except ActorGone:
                    if attempt == _START_ATTEMPTS:
                        raise
                    # the owner died while its start was waited for: start it again
            raise AssertionError("unreachable")
        finally:
            fleet.start_ended()

    async def _place(self, actor: Any, sandbox_id: str, node_id: str | None) -> None:
        """Wait until Ray places the actor. Ray leaves an actor no node can host pending forever,
        so with custom resources the wait is bounded by ``capacity_timeout`` and room is made
        meanwhile, one at a time: an idle spare gives way first, else a warm sandbox (on
        ``node_id`` when pinned). With none, any node can host it (num_cpus=0): a slow placement
        is only a slow worker start."""
        config = self.config
        if not config.ray.resources:
            if not await self.fleet.placed(actor, config.readiness_timeout + 120):
                raise SandboxStartError(f"the actor for sandbox {sandbox_id} never started")
            return
        deadline = time.monotonic() + config.capacity_timeout
        while True:
            remaining = deadline - time.monotonic()
            if await self.fleet.placed(actor, max(0.01, min(_PLACEMENT_POLL, remaining))):
                return
            if remaining <= _PLACEMENT_POLL:
                raise PoolExhausted(
                    f"no node could host sandbox {sandbox_id} within {config.capacity_timeout:.0f}s "
                    f"(resources {config.ray.resources}; are all sandbox slots taken?)"
                )
            if not self.fleet.give_up_spare(node_id):
                self._make_room(sandbox_id, node_id)

    def _make_room(self, waiting_for: str, node_id: str | None) -> None:
        """Evict the least recently released warm sandbox (one at a time: a stop takes about as
        long as a placement poll)."""
        stopping = (self.state.entry(op.sandbox_id) for op in self.ops.of_kind(OpKind.STOP))
        if any(entry is not None and entry.stop is StopReason.EVICTED for entry in stopping):
            return
        victim = self.state.evict_lru_warm(node_id, busy=self.ops.busy())
        if victim is not None:
            logger.info("no node has room for sandbox %s: evicting warm sandbox %s", waiting_for, victim.sandbox_id)
            self.stop_later(victim)

    def top_up(self) -> None:
        """Keep ``prewarm`` spare sandboxes and ``spare_actors`` spare actors ready (in the background)."""
        if self.closed:
            return
        self.fleet.refill()
        while (entry := self.state.begin_spare(anonymous_sandbox_id())) is not None:
            self.ops.start(entry.sandbox_id, OpKind.START, self._create_spare(entry))

    async def _create_spare(self, entry: Entry) -> None:
        try:
            await self._create(entry)
        except SandboxError as exc:
            # Shutting down ends the spares on their way: nothing to warn of.
            (logger.info if self.closed else logger.warning)("could not pre-warm a spare sandbox: %s", exc.message)

    # ── handing out ────────────────────────────────────────────────────────

    def check(self, decision: MustCheck) -> asyncio.Task[Lease | bool]:
        """Reclaim a warm sandbox once its actor says it still runs (the 'check' operation).
        The task returns the lease, False when the sandbox is dead, True when it changed meanwhile."""
        return self.ops.start(decision.entry.sandbox_id, OpKind.CHECK, self._check(decision))

    async def _check(self, decision: MustCheck) -> Lease | bool:
        entry = decision.entry
        if not await self.fleet.alive(entry.actor, entry.info):
            logger.info("warm sandbox %s no longer runs; not handing it out", entry.sandbox_id)
            return False
        acquired = self.state.reclaim(entry.sandbox_id, decision.version)
        if acquired is None:
            return True
        self.tally.count("reclaimed")
        return lease(acquired.entry, "warm")

    def claim(self, entry: Entry) -> asyncio.Task[Lease | None]:
        """Hand a pre-warmed spare to its thread (the 'claim' operation); None when it was dead."""
        return self.ops.start(entry.sandbox_id, OpKind.CLAIM, self._claim(entry))

    async def _claim(self, entry: Entry) -> Lease | None:
        try:
            if entry.thread_id is not None:  # anonymous claims need no record
                await asyncio.to_thread(self.records.put_claim, entry.sandbox_id, entry.thread_id)
            self.state.update_info(entry.sandbox_id, await self.fleet.claim(entry.actor, entry.thread_id))
        except SandboxError as exc:
            logger.warning("spare sandbox %s could not be claimed (%s); removing it", entry.sandbox_id, exc.message)
            self.state.claim_failed(entry.sandbox_id)
            self.fleet.later(self.fleet.discard(entry.actor))
            self.fleet.later(asyncio.to_thread(self.records.drop_claim, entry.sandbox_id))
            return None
        finally:
            self.top_up()
        self.tally.count("prewarmed")
        return lease(entry, "prewarmed")

    # ── stopping ───────────────────────────────────────────────────────────

    def stop_later(self, entry: Entry) -> asyncio.Task[bool]:
        """Remove a STOPPING sandbox (the 'stop' operation). The task returns False when an idle
        stop was called off, True when the sandbox is gone, and raises when the engine did not
        confirm (the sandbox is DOOMED then)."""
        return self.ops.start(entry.sandbox_id, OpKind.STOP, self._stop(entry))

    async def _stop(self, entry: Entry) -> bool:
        sandbox_id, why = entry.sandbox_id, entry.stop or StopReason.DESTROYED
        try:
            if why is StopReason.IDLE and not await self._idle_stop_goes_ahead(entry):
                return False
            # A hibernating pool keeps what idles or is evicted: stopped, not removed.
            if (why in (StopReason.IDLE, StopReason.EVICTED) and self.config.idle_action == "hibernate"
                    and self.state.stop_to_hibernate(sandbox_id)):
                return await self._hibernate(entry, self.config.hibernate_live)
            # The intent first: a pool that dies from here on leaves it for the next one.
            await asyncio.to_thread(self.records.mark_doomed, sandbox_id, entry.container_id)
            if not await self._remove(entry):
                raise BackendUnavailable(
                    f"the engine holding sandbox {sandbox_id} did not confirm its removal; the pool retries it"
                )
        except SandboxError as exc:
            if self.state.stop_failed(sandbox_id) is not None:
                logger.warning("could not stop sandbox %s (%s); it stays doomed and is retried", sandbox_id,
                               exc.message)
            raise
        self.tally.count(_COUNTED_AS.get(why, why.value))
        self.state.removed(sandbox_id)
        await asyncio.to_thread(self._forget_records, sandbox_id, entry.spare, entry.hibernated_at is not None)
        logger.info("sandbox %s %s", sandbox_id, "reaped" if why is StopReason.IDLE else why.value)
        self.top_up()
        return True

    def hibernate_later(self, entry: Entry, live: bool = False) -> asyncio.Task[bool]:
        """Hibernate a HIBERNATING sandbox (the 'hibernate' operation; ``live``: keeping its
        processes and memory). The task returns True when it is hibernated, and raises when it
        could not be (the sandbox serves on)."""
        return self.ops.start(entry.sandbox_id, OpKind.HIBERNATE, self._hibernate(entry, live))

    async def _hibernate(self, entry: Entry, live: bool = False) -> bool:
        """Stop the container (its filesystem stays; with ``live``, its processes and memory in a
        checkpoint), end the actor, record the sandbox as hibernated."""
        sandbox_id = entry.sandbox_id
        try:
            info = await self.fleet.hibernate(entry.actor, sandbox_id, live)
        except SandboxError as exc:
            self.state.hibernate_failed(sandbox_id)
            # It serves on as it was; an actor that died meanwhile is the next reconcile's to repair.
            logger.warning("could not hibernate sandbox %s (%s)", sandbox_id, exc.message)
            raise
        record = {"thread_id": entry.thread_id, "container_id": entry.container_id, "image": entry.image,
                  "engine_id": entry.info.get("engine_id"), "node_id": entry.info.get("node_id"),
                  "container_name": entry.info.get("container_name"), "since": time.time(),
                  "checkpoint": info.get("checkpoint")}
        await asyncio.to_thread(self.records.put_hibernated, sandbox_id, record)
        self.state.hibernated(sandbox_id, info.get("checkpoint"))
        self.tally.count("hibernated_live" if info.get("checkpoint") else "hibernated")
        logger.info("sandbox %s hibernated (container %s stopped%s, actor ended)", sandbox_id, record["container_name"],
                    f", processes and memory in a checkpoint of {info['checkpoint'].get('bytes', 0)} bytes"
                    if info.get("checkpoint") else "")
        self.top_up()
        return True

    async def _idle_stop_goes_ahead(self, entry: Entry) -> bool:
        """Ask the sandbox to stop serving (it refuses if an operation started), then make the
        decision with no await in between: an acquire that came meanwhile calls the stop off."""
        sandbox_id = entry.sandbox_id
        try:
            agreed = await self.fleet.begin_stop(entry.actor, self.config.idle_timeout)
        except ActorGone:
            # Its actor died meanwhile: whether the container is worth keeping is for a repair to
            # judge (the next idle pass or reconcile starts one), not for an idle stop.
            self.state.stop_called_off(sandbox_id)
            return False
        if not agreed:
            logger.info("sandbox %s got busy; not stopping it", sandbox_id)
            self.state.stop_called_off(sandbox_id)
            return False
        if not self.state.commit_stop(sandbox_id):
            logger.info("sandbox %s was acquired while its idle stop was pending; keeping it", sandbox_id)
            with contextlib.suppress(SandboxError):
                await self.fleet.cancel_stop(entry.actor)
            self.state.stop_called_off(sandbox_id)
            self.tally.count("idle_stop_called_off")
            return False
        return True

    async def _remove(self, entry: Entry) -> bool:
        if entry.actor is not None:
            try:
                name, node = entry.info.get("actor_name"), entry.info.get("node_id")
                return await self.fleet.stop(entry.actor, entry.sandbox_id,
                                             (name, node) if name and node else None)
            except ActorGone:
                pass  # its container may outlive it: remove that directly
        return await self.fleet.remove_everywhere(entry.sandbox_id, entry.container_id, entry.info.get("engine_id"))

    def _forget_records(self, sandbox_id: str, spare: bool, asleep: bool) -> None:
        """A removed sandbox's records go: its owed destroy; its hibernation record, when it was
        stopped asleep (a resume drops that record itself); a spare's claim."""
        self.records.clear_doomed(sandbox_id)
        if asleep:
            self.records.drop_hibernated(sandbox_id)
        if spare:
            self.records.drop_claim(sandbox_id)

    # ── idle ───────────────────────────────────────────────────────────────

    async def idle_pass(self) -> None:
        """Stop sandboxes idle past the timeout (each confirms it is idle first); repair those
        whose actor is gone."""
        self.top_up()
        busy = self.ops.busy()
        candidates = [(e, v) for e, v in self.state.idle_candidates() if e.sandbox_id not in busy]
        if not candidates:
            return
        reports = await self.fleet.activity({entry.sandbox_id: entry.actor for entry, _ in candidates})
        if self.closed:
            return  # shut down meanwhile (a pass is never cut short): the shutdown stops everything
        for entry, version in candidates:
            report = reports[entry.sandbox_id]
            if isinstance(report, ActorGone):
                self.died(entry.sandbox_id)
                continue
            if isinstance(report, BaseException):
                logger.warning("sandbox %s did not report activity: %s", entry.sandbox_id, report)
                continue
            idle_for, inflight, _dead = report
            self.state.note_activity(entry.sandbox_id, idle_for, inflight)
            if self.ops.get(entry.sandbox_id) is None and self.state.begin_idle_stop(entry.sandbox_id, version):
                logger.info("sandbox %s idle for %.1fs (its own count: %.1fs); stopping it", entry.sandbox_id,
                            self.state.clock() - entry.last_active, idle_for)
                self.stop_later(entry)

    # ── repair ─────────────────────────────────────────────────────────────

    def repair(self, sandbox_id: str, handle: Any = None) -> asyncio.Task[str] | None:
        """Look closely at one sandbox and make it whole or make it gone (the 'repair' operation).
        None when another operation is under way on it (it will be looked at again after)."""
        if self.ops.get(sandbox_id) is not None or self.closed:
            return None
        self.state.death_settled(sandbox_id)  # whatever was reported, this repair looks afresh
        return self.ops.start(sandbox_id, OpKind.REPAIR, self._repair(sandbox_id, handle))

    async def _repair(self, sandbox_id: str, handle: Any) -> str:
        try:
            return await self._repair_one(sandbox_id, handle)
        except SandboxError as exc:
            logger.warning("repair of sandbox %s failed (%s); the next reconcile retries", sandbox_id, exc.message)
            return "unknown"

    async def _repair_one(self, sandbox_id: str, handle: Any) -> str:
        entry = self.state.entry(sandbox_id)
        if entry is not None and entry.actor is not None:
            handle = entry.actor
        view = None
        if handle is not None:
            try:
                view = ActorView.from_description(await self.fleet.describe(handle))
            except ActorGone:
                # Dead, or unreachable with its node: end it now so its slot frees up at once.
                self.fleet.kill(handle)
                handle = None
            if view is not None and view.sandbox_id != sandbox_id:
                # It served this sandbox when it was looked up; it has been kept for another since
                # (a stopped sandbox's actor is reused): not this sandbox's actor, not ours to end.
                view, handle = None, None
        engines = await self.fleet.engines()
        containers, _seen = await self.fleet.containers(engines)
        found = tuple(c for c in containers if c.sandbox_id == sandbox_id)
        doomed = sandbox_id in await asyncio.to_thread(self.records.doomed)
        facts = RepairFacts(sandbox_id, self.state.entry(sandbox_id) is not None, doomed, view, found)
        if repair_needs_probe(facts):
            facts = RepairFacts(**{**facts.__dict__, "answering": await self._answering(engines, found)})
        plan = plan_repair(facts)
        return await self._carry_out(plan, facts, engines, handle)

    async def _answering(self, engines: dict[str, tuple[Any, str]], found: tuple[ContainerView, ...]) -> str | None:
        for container in found:
            if container.running and await self.fleet.probe(engines, container) is not None:
                return container.container_id
        return None

    async def _carry_out(self, plan: RepairPlan, facts: RepairFacts, engines: dict[str, tuple[Any, str]],
                         handle: Any) -> str:
        sandbox_id = facts.sandbox_id
        for container in plan.remove:
            await self.fleet.remove(engines, container)
        if plan.stop_actor:
            await self.fleet.stop(handle, sandbox_id)
        elif plan.end_actor and handle is not None:
            self.fleet.kill(handle)
        if plan.adopt and facts.actor is not None:
            self.state.adopt(sandbox_id, facts.actor.thread_id, handle, dict(facts.actor.info), facts.actor.idle_for)
        if plan.readopt is not None:
            return await self._readopt(sandbox_id, plan.readopt, engines)
        if plan.forget:
            if plan.outcome != "removed":
                self.tally.count(plan.outcome)  # counted before it leaves the table: both show at once
            await self._forget(sandbox_id)
        return plan.outcome

    async def _readopt(self, sandbox_id: str, keep: ContainerView, engines: dict[str, tuple[Any, str]]) -> str:
        """A fresh actor on the container's node takes it over (the old one never finished or died)."""
        entry = self.state.entry(sandbox_id)
        # Which thread: what the pool holds, else a claim recorded in Ray's KV (pre-warmed
        # sandboxes), else the container's label. Never the owner record inside it.
        thread_id = entry.thread_id if entry is not None else None
        thread_id = thread_id or await asyncio.to_thread(self.records.get_claim, sandbox_id) or keep.thread_id
        try:
            handle, info = await self.start_sandbox(sandbox_id, thread_id, node_id=keep.node_id)
        except PoolExhausted:
            # No slot on the container's node: an unowned container must not linger.
            # (With thread mounts, its workspace lives on the host, not in the container.)
            logger.warning("no room to re-adopt sandbox %s on its node; removing its container", sandbox_id)
            await self.fleet.remove(engines, keep)
            await self._forget(sandbox_id)
            self.tally.count("lost")
            return "removed"
        if not self.state.replace_actor(sandbox_id, handle, info) and not self.state.adopt(
            sandbox_id, thread_id, handle, info, float(info.get("idle_for") or 0.0)
        ):
            await self.fleet.discard(handle)  # the thread got another sandbox meanwhile
            return "removed"
        self.tally.count("readopted")
        logger.info("sandbox %s: container re-adopted by a new actor", sandbox_id)
        return "readopted"

    async def _forget(self, sandbox_id: str) -> None:
        """The sandbox is gone for good: drop its entry, any owed destroy and any claim."""
        entry = self.state.entry(sandbox_id)
        if entry is not None and entry.state is not SandboxState.STARTING:
            self.state.removed(sandbox_id)
        await asyncio.to_thread(self._forget_records, sandbox_id, True, True)
