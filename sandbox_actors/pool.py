"""SandboxPool: the one named, detached actor that decides for a pool.

It is async and thin: decisions come from :class:`~sandbox_actors.state.PoolState`
(no ``await`` inside a decision), slow work (starting, stopping, probing
sandboxes) runs as tasks through the :class:`~sandbox_actors.fleet.Fleet`, and
every decision is asked again after an ``await``. Two loops run on its event
loop: the idle check and reconcile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from . import actors
from .actors import ActorGone
from .config import SandboxConfig
from .errors import IsolationUnavailable, NotSupported, PoolExhausted, PoolShutDown, SandboxError
from .fleet import DESCRIBE_TIMEOUT, STOP_TIMEOUT, Fleet
from .metrics import PoolMetrics
from .reconcile import ActorView, ContainerView, plan_reconcile
from .state import Acquired, Claimed, Entry, MustCreate, MustWait, PoolState, SandboxState
from .threads import anonymous_sandbox_id, sandbox_id_for, validate_thread_id

logger = logging.getLogger(__name__)

_CLAIM_TIMEOUT = 10.0


@dataclass(frozen=True)
class Lease:
    """What acquire returns: the sandbox and the actor that serves it.

    ``path`` is how it was obtained: 'hot' (already active), 'warm'
    (reclaimed), 'prewarmed' (a spare sandbox, started ahead of need),
    'cold' (a new container) or 'adopted' (a live sandbox the pool took over).
    """

    sandbox_id: str
    thread_id: str | None
    actor: Any
    path: str
    info: dict[str, Any] = field(default_factory=dict)


def _configure_logging() -> None:
    level = os.environ.get("SANDBOX_ACTORS_LOG_LEVEL", "WARNING").upper()
    for name in ("sandbox_actors", "backends"):
        logging.getLogger(name).setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class SandboxPool:
    """Acquire, release, destroy and watch the sandboxes of one pool.

    Created through :func:`sandbox_actors.actors.pool_actor`; use it through
    :class:`sandbox_actors.client.PoolClient`.
    """

    def __init__(self, config: SandboxConfig) -> None:
        _configure_logging()
        self._config = config
        self._state = PoolState(config.replicas, config.max_sandboxes, config.idle_timeout, config.prewarm)
        self._fleet = Fleet(config, on_no_room=self._make_room)
        self._creations: dict[str, asyncio.Task[Lease]] = {}
        self._stops: dict[str, asyncio.Task[bool]] = {}
        self._repairs: dict[str, asyncio.Task[str]] = {}
        self._doomed: set[str] = set()  # destroy asked, but the engine did not answer yet
        self._changed = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._started: asyncio.Task[None] | None = None
        self._refused: SandboxError | None = None  # why the pool would not start (isolation it cannot give)
        self._loops: list[asyncio.Task[None]] = []
        self._shutdown: asyncio.Task[dict[str, int]] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self._metrics = PoolMetrics(config.pool_name)
        self._evicting: set[str] = set()
        with contextlib.suppress(RuntimeError):  # no running loop: the first call starts it
            # Reconcile at once, also when Ray restarts the pool and nobody calls it yet.
            self._started = asyncio.get_running_loop().create_task(self._startup())

    # ── lifecycle ──────────────────────────────────────────────────────────

    async def _ready(self) -> None:
        if self._shutdown is not None:
            raise PoolShutDown(f"pool {self._config.pool_name} was shut down; connect again for a new one")
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._startup())
        await asyncio.shield(self._started)
        if self._refused is not None:
            raise self._refused

    async def _startup(self) -> None:
        # Rebuild the view before serving: a restarted pool must find its sandboxes. A node that
        # cannot isolate sandboxes as configured stops the pool here, before any sandbox exists.
        try:
            await self._reconcile_pass(strict=True)
        except (IsolationUnavailable, NotSupported) as exc:
            logger.error("pool %s refuses to start: %s", self._config.pool_name, exc.message)
            self._refused = exc
            await self._fleet.close()
            await self._fleet.sweep()
            return
        except Exception:
            logger.exception("initial reconcile failed; serving anyway, next pass in %ss", self._config.reconcile_interval)
        self._loops = [
            self._spawn(self._every(self._config.idle_check_interval, self._idle_pass, "idle check")),
            self._spawn(self._every(self._config.reconcile_interval, self._reconcile_pass, "reconcile")),
        ]
        self._top_up()

    async def _every(self, interval: float, work: Any, name: str) -> None:
        """Run ``work`` every ``interval`` seconds until shutdown; a failing pass is logged, never fatal."""
        while self._shutdown is None:
            await asyncio.sleep(interval)
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s pass failed; next in %.1fs", name, interval)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._metrics.states(self._state.counts())

    def _count(self, event: str, amount: int = 1) -> None:
        self.counters[event] += amount
        self._metrics.count(event, amount)

    async def _wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def ping(self) -> str:
        """Answers once the pool has started (initial reconcile done); returns its node id."""
        await self._ready()
        return actors.current_node_id()

    async def config(self) -> SandboxConfig:
        return self._config

    # ── acquire ────────────────────────────────────────────────────────────

    async def acquire(self, thread_id: str | None = None) -> Lease:
        """The thread's sandbox: active, else reclaimed warm, else a spare, else adopted or created.

        Raises:
            InvalidThreadId, PoolExhausted (retryable), PoolShutDown, and the
            start errors of a new sandbox (ImageNotFound, ReadinessTimeout, ...).
        """
        await self._ready()
        started = time.monotonic()
        lease = await self._acquire(thread_id, started + self._config.capacity_timeout)
        self._metrics.acquired(lease.path, time.monotonic() - started)
        if lease.path != "hot":  # a hot acquire changes no state
            self._metrics.states(self._state.counts())
        return lease

    async def resolve(self, thread_id: str) -> str:
        """The sandbox id of ``thread_id``: the one it holds, else the one it would get."""
        await self._ready()
        return self._sandbox_id(thread_id)

    def _sandbox_id(self, thread_id: str | None) -> str:
        if thread_id is None:
            return anonymous_sandbox_id()
        validate_thread_id(thread_id)
        return self._state.lookup(thread_id) or sandbox_id_for(self._config.pool_name, thread_id)

    async def _acquire(self, thread_id: str | None, deadline: float) -> Lease:
        config = self._config
        while True:
            if self._shutdown is not None:
                raise PoolShutDown(f"pool {config.pool_name} is shutting down")
            sandbox_id = self._sandbox_id(thread_id)
            repair = self._repairs.get(sandbox_id)
            if repair is not None:
                await asyncio.shield(repair)
                continue
            decision = self._state.acquire(sandbox_id, thread_id)
            if isinstance(decision, Acquired):
                self._count("reclaimed" if decision.path == "warm" else "acquired_hot")
                return self._lease(decision.entry, decision.path)
            if isinstance(decision, Claimed):
                lease = await self._claim(decision.entry)
                if lease is not None:
                    return lease
                continue
            for victim in decision.evict:
                logger.info("evicting warm sandbox %s to stay within replicas=%d", victim.sandbox_id, config.replicas)
                self._stop_later(victim, "evicted")
            if isinstance(decision, MustCreate):
                if decision.over_soft_cap:
                    logger.warning(
                        "all %d replica slots are in use; creating sandbox %s beyond the soft limit",
                        config.replicas, sandbox_id,
                    )
                task = asyncio.get_running_loop().create_task(self._create(decision.entry))
                self._creations[sandbox_id] = task
                return await asyncio.shield(task)
            await self._wait_for(decision, deadline)

    async def _wait_for(self, decision: MustWait, deadline: float) -> None:
        if decision.reason == "starting":
            await asyncio.shield(self._creations[decision.sandbox_id])
        elif decision.reason == "stopping":
            stop = self._stops.get(decision.sandbox_id)
            if stop is not None:
                await asyncio.shield(stop)
            else:
                await self._wait_changed(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() > deadline:
                raise PoolExhausted(f"sandbox {decision.sandbox_id} is still being stopped; retry")
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._count("exhausted")
                raise PoolExhausted(
                    f"pool {self._config.pool_name} is at max_sandboxes={self._config.max_sandboxes} and none "
                    f"freed up within {self._config.capacity_timeout:.0f}s; release or destroy sandboxes, or retry",
                    max_sandboxes=self._config.max_sandboxes,
                )
            await self._wait_changed(remaining)

    def _lease(self, entry: Entry, path: str) -> Lease:
        return Lease(entry.sandbox_id, entry.thread_id, entry.actor, path, dict(entry.info))

    async def _claim(self, entry: Entry) -> Lease | None:
        """Hand a pre-warmed spare to its thread (one actor call); None when the spare was dead."""
        config = self._config
        try:
            if entry.thread_id is not None:  # anonymous claims need no record
                await asyncio.to_thread(actors.put_claim, config, entry.sandbox_id, entry.thread_id)
            entry.info = dict(
                await actors.call(entry.actor.claim.remote(entry.thread_id), _CLAIM_TIMEOUT, "claim a spare")
            )
        except SandboxError as exc:
            logger.warning("spare sandbox %s could not be claimed (%s); removing it", entry.sandbox_id, exc.message)
            self._state.claim_failed(entry.sandbox_id)
            self._spawn(self._fleet.discard(entry.actor))
            self._spawn(asyncio.to_thread(actors.drop_claim, config, entry.sandbox_id))
            return None
        finally:
            self._top_up()
        self._count("prewarmed")
        return self._lease(entry, "prewarmed")

    async def _create(self, entry: Entry) -> Lease:
        sandbox_id = entry.sandbox_id
        try:
            actor, info = await self._fleet.start_sandbox(sandbox_id, entry.thread_id)
            self._state.started(sandbox_id, actor, info)
            self._doomed.discard(sandbox_id)  # a sandbox of this id lives again: nothing left to finish
        except BaseException:
            self._state.start_failed(sandbox_id)
            self._count("failed")
            raise
        finally:
            self._creations.pop(sandbox_id, None)
            self._notify()
        self._count("adopted" if info.get("adopted") else "created")
        return self._lease(entry, "adopted" if info.get("adopted") else "cold")

    def _top_up(self) -> None:
        """Keep ``prewarm`` spare sandboxes and ``spare_actors`` spare actors ready (in the background)."""
        if self._shutdown is not None:
            return
        self._fleet.refill()
        while (entry := self._state.begin_spare(anonymous_sandbox_id())) is not None:
            self._creations[entry.sandbox_id] = self._spawn(self._create_spare(entry))

    async def _create_spare(self, entry: Entry) -> None:
        try:
            await self._create(entry)
        except SandboxError as exc:
            logger.warning("could not pre-warm a spare sandbox: %s", exc.message)

    def _make_room(self, waiting_for: str, node_id: str | None = None) -> None:
        """No node has a free slot for ``waiting_for``: evict the least recently released warm
        sandbox, one at a time (a stop takes about as long as a placement poll)."""
        self._evicting &= set(self._stops)
        if self._evicting:
            return
        victim = self._state.evict_lru_warm(node_id)
        if victim is not None:
            logger.info("no node has room for sandbox %s: evicting warm sandbox %s", waiting_for, victim.sandbox_id)
            self._evicting.add(victim.sandbox_id)
            self._stop_later(victim, "evicted")

    # ── release, get, destroy ──────────────────────────────────────────────

    async def release(self, sandbox_id: str) -> bool:
        """Park an active sandbox in the warm pool (its container keeps running)."""
        await self._ready()
        released = self._state.release(sandbox_id)
        if released:
            self._count("released")
            self._notify()  # a warm sandbox can be evicted for an acquire waiting on capacity
        return released

    async def get(self, sandbox_id: str) -> Lease | None:
        """The lease of an active sandbox (activity refreshed), else None."""
        await self._ready()
        entry = self._state.get(sandbox_id)
        return None if entry is None else self._lease(entry, "hot")

    async def destroy(self, sandbox_id: str) -> bool:
        """Stop and remove a sandbox, active or warm. Idempotent: False when there was none."""
        await self._ready()
        while True:
            busy = self._repairs.get(sandbox_id)  # a repair could re-adopt it right after us
            found = self._state.begin_destroy(sandbox_id) if busy is None else MustWait(sandbox_id, "repairing")
            if found is None:
                return False
            if isinstance(found, MustWait):
                task = busy or self._creations.get(sandbox_id) or self._stops.get(sandbox_id)
                if task is None:
                    await self._wait_changed(0.05)
                    continue
                with contextlib.suppress(SandboxError):
                    await asyncio.shield(task)
                continue
            return await asyncio.shield(self._stop_later(found, "destroyed"))

    def _stop_later(self, entry: Entry, reason: str, if_idle_for: float | None = None) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._stop(entry, reason, if_idle_for))
        self._stops[entry.sandbox_id] = task
        return task

    async def _stop(self, entry: Entry, reason: str, if_idle_for: float | None) -> bool:
        sandbox_id = entry.sandbox_id
        try:
            if entry.actor is not None:
                try:
                    stopped = await actors.call(entry.actor.stop.remote(if_idle_for), STOP_TIMEOUT, f"stop {sandbox_id}")
                except ActorGone:
                    stopped = await self._fleet.remove_everywhere(
                        sandbox_id, entry.info.get("container_id"), entry.info.get("engine_id")
                    )
                    if not stopped:
                        raise SandboxError(
                            f"the engine holding sandbox {sandbox_id} did not confirm its removal"
                        ) from None
                if not stopped:
                    logger.info("sandbox %s got busy; not stopping it", sandbox_id)
                    self._state.stop_refused(sandbox_id)
                    return False
                actors.kill(entry.actor)
            self._state.removed(sandbox_id)
            self._doomed.discard(sandbox_id)
            self._count(reason)
            logger.info("sandbox %s %s", sandbox_id, reason)
            if entry.spare:
                await asyncio.to_thread(actors.drop_claim, self._config, sandbox_id)
            return True
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever went wrong, the entry must not stay STOPPING
            # The engine (or actor) did not answer. Forget the entry but remember to
            # finish the job: reconcile removes doomed sandboxes instead of adopting them.
            logger.warning("could not stop sandbox %s (%s: %s); reconcile will retry", sandbox_id,
                           type(exc).__name__, exc)
            self._state.removed(sandbox_id)
            self._doomed.add(sandbox_id)
            return True
        finally:
            self._stops.pop(sandbox_id, None)
            self._notify()
            self._top_up()

    async def report_dead(self, sandbox_id: str) -> None:
        """A SandboxActor (or client) saw this sandbox die: repair it now, not at the next pass."""
        self._schedule_repair(sandbox_id)

    # ── idle ───────────────────────────────────────────────────────────────

    async def _idle_pass(self) -> None:
        self._top_up()
        candidates = self._state.idle_candidates()
        if not candidates:
            return
        reports = await actors.call_each(
            {entry.sandbox_id: entry.actor.activity.remote() for entry, _ in candidates}, DESCRIBE_TIMEOUT, "activity"
        )
        for entry, version in candidates:
            report = reports[entry.sandbox_id]
            if isinstance(report, ActorGone):
                self._schedule_repair(entry.sandbox_id)
                continue
            if isinstance(report, BaseException):
                logger.warning("sandbox %s did not report activity: %s", entry.sandbox_id, report)
                continue
            idle_for, inflight, _dead = report
            self._state.note_activity(entry.sandbox_id, idle_for, inflight)
            doomed = self._state.begin_idle_stop(entry.sandbox_id, version)
            if doomed is not None:
                # The sandbox re-checks itself: it refuses if an operation started meanwhile.
                self._stop_later(doomed, "reaped", if_idle_for=self._config.idle_timeout)

    # ── reconcile ──────────────────────────────────────────────────────────

    def _busy(self) -> set[str]:
        return (
            set(self._creations) | set(self._stops) | set(self._repairs)
            | self._state.ids({SandboxState.STARTING, SandboxState.STOPPING})
        )

    async def reconcile(self) -> dict[str, int]:
        """Run a reconcile pass now; returns what it did (counts per action)."""
        await self._ready()
        return await self._reconcile_pass()

    async def _reconcile_pass(self, strict: bool = False) -> dict[str, int]:
        async with self._reconcile_lock:
            # The three views are taken across awaits: whatever changed meanwhile (or was
            # busy at any point) is left for the next pass instead of judged on a stale view.
            epoch, busy, keep = self._state.epoch, self._busy(), self._fleet.keep_names
            views, handles, silent = await self._fleet.actor_views()
            engines = await self._fleet.engines()
            await self._fleet.prepare(engines, strict)
            containers, seen = await self._fleet.containers(engines)
            busy |= self._busy() | self._state.changed_since(epoch)
            # A silent actor of a sandbox we hold: leave that sandbox for the next pass (or end
            # the actor, when its node is dead). A silent actor we cannot place: touch nothing.
            silent_ids, unplaced = await self._place_silent(silent, handles)
            plan = plan_reconcile(
                self._state.ids(), views, containers, seen, busy | silent_ids, keep | self._fleet.keep_names,
                any_unknown=unplaced,
            )
            done: collections.Counter[str] = collections.Counter()
            owners = {v.sandbox_id: v for v in views if v.sandbox_id is not None and v.name not in plan.end_actors}
            for view in plan.adopt:
                handle = handles[view.name]
                if view.sandbox_id in self._doomed:
                    plan.repair.append(view.sandbox_id)
                elif self._state.adopt(view.sandbox_id, view.thread_id, handle, view.info, view.idle_for):
                    done["adopted"] += 1
                else:  # its thread already has another sandbox: never two
                    self._spawn(self._fleet.discard(handle))
                    done["ended_actors"] += 1
            for sandbox_id in plan.forget:  # before any await: the plan is fresh only until then
                self._state.removed(sandbox_id)
                self._count("lost")
                done["forgotten"] += 1
            for container in plan.remove_containers:
                if container.engine_id in engines and await self._fleet.remove(engines, container):
                    done["removed_containers"] += 1
            for name in plan.end_actors:
                if await self._still_unwanted(name, handles[name]):
                    actors.kill(handles[name])  # a kill, not a stop: a duplicate's container is another's
                    done["ended_actors"] += 1
            repairs = [
                self._schedule_repair(sandbox_id, handles.get(owners[sandbox_id].name) if sandbox_id in owners else None)
                for sandbox_id in plan.repair
            ]
            results = await asyncio.gather(*(r for r in repairs if r is not None), return_exceptions=True)
            done["repaired"] += sum(1 for r in results if r == "readopted")
            done["removed_containers"] += sum(1 for r in results if r == "removed")
            for key, value in done.items():
                self._count(f"reconcile_{key}", value)
            if not plan.is_empty():
                logger.info("reconcile: %s", dict(done))
            self._notify()
            self._top_up()
            return {key: value for key, value in done.items() if value}

    async def _place_silent(self, silent: set[str], handles: dict[str, Any]) -> tuple[set[str], bool]:
        """Sandbox ids whose actor did not answer, and whether any such actor is not ours to place."""
        if not silent:
            return set(), False
        by_name = {e.info.get("actor_name"): e for e in self._state.entries.values()}
        alive = await asyncio.to_thread(actors.alive_nodes)
        ids, unplaced = set(), False
        for name in silent:
            entry = by_name.get(name)
            if entry is None:
                unplaced = unplaced or name not in self._fleet.keep_names
            elif entry.info.get("node_id") not in alive:
                actors.kill(handles[name])  # its node is gone: so is it; free its name and slot now
            else:
                ids.add(entry.sandbox_id)
        return ids, unplaced

    async def _still_unwanted(self, name: str, handle: Any) -> bool:
        """Ask an actor once more before ending it: it may have been given a sandbox since."""
        if name in self._fleet.keep_names:
            return False
        try:
            info = await actors.call(handle.describe.remote(), DESCRIBE_TIMEOUT, "describe")
        except ActorGone:
            return False  # already gone
        except SandboxError:
            return False  # silent: decide next pass
        entry = self._state.entries.get(info.get("sandbox_id") or "")
        return entry is None or entry.info.get("actor_name") != name

    def _schedule_repair(self, sandbox_id: str, handle: Any = None) -> asyncio.Task[str] | None:
        if sandbox_id in self._repairs:
            return self._repairs[sandbox_id]
        if sandbox_id in self._creations or sandbox_id in self._stops or self._shutdown is not None:
            return None
        task = asyncio.get_running_loop().create_task(self._repair(sandbox_id, handle))
        self._repairs[sandbox_id] = task
        task.add_done_callback(lambda _t: self._repairs.pop(sandbox_id, None))
        return task

    async def _repair(self, sandbox_id: str, handle: Any) -> str:
        """Look closely at one sandbox and make it whole or make it gone.

        Returns what happened: 'healthy', 'readopted', 'removed' or 'unknown'.
        """
        try:
            return await self._repair_one(sandbox_id, handle)
        except SandboxError as exc:
            logger.warning("repair of sandbox %s failed (%s); next reconcile retries", sandbox_id, exc.message)
            return "unknown"
        finally:
            self._notify()

    async def _repair_one(self, sandbox_id: str, handle: Any) -> str:
        entry = self._state.entries.get(sandbox_id)
        if entry is not None and entry.actor is not None:
            handle = entry.actor
        view = None
        if handle is not None:
            try:
                view = ActorView.from_description(
                    await actors.call(handle.describe.remote(), DESCRIBE_TIMEOUT, "describe")
                )
            except ActorGone:
                # Dead, or unreachable with its node: end it now so its slot frees up at
                # once, rather than when Ray gets round to declaring the node dead.
                actors.kill(handle)
                handle = None
        engines = await self._fleet.engines()
        containers, _seen = await self._fleet.containers(engines)
        found = [c for c in containers if c.sandbox_id == sandbox_id]
        doomed = sandbox_id in self._doomed
        own = [c for c in found if view is not None and c.container_id == view.container_id]

        async def remove(victims: list[ContainerView]) -> None:
            for container in victims:
                await self._fleet.remove(engines, container)

        if view is not None and view.started:
            await remove([c for c in found if c not in own])  # never two containers for one sandbox
            if not doomed and view.dead_reason is None and own and own[0].running:
                if entry is None:
                    self._state.adopt(sandbox_id, view.thread_id, handle, view.info, view.idle_for)
                return "healthy"
            # Its container died (or destroy is pending): clean both up; the next acquire starts fresh.
            await actors.call(handle.stop.remote(), STOP_TIMEOUT, f"stop {sandbox_id}")
            actors.kill(handle)
            await self._forget(sandbox_id)
            self._count("destroyed" if doomed else "died")
            return "removed"
        # The actor is gone or never finished starting: keep one container that answers.
        keep = None
        if not doomed:
            for container in found:
                if container.running and await self._fleet.probe(engines, container) is not None:
                    keep = container
                    break
        await remove([c for c in found if c is not keep])
        if keep is None:
            if handle is not None:
                actors.kill(handle)
            if entry is not None and not doomed:
                self._count("lost")  # its actor and container are gone (e.g. with their node)
            await self._forget(sandbox_id)
            return "removed"
        # Which thread: what the pool holds, else a claim recorded in GCS (pre-warmed
        # sandboxes), else the container's label. Never the owner record inside it.
        thread_id = entry.thread_id if entry is not None else None
        thread_id = thread_id or await asyncio.to_thread(actors.get_claim, self._config, sandbox_id) or keep.thread_id
        if handle is not None:
            actors.kill(handle)  # it never finished starting; a fresh actor on the container's node adopts it
        try:
            handle, info = await self._fleet.start_sandbox(sandbox_id, thread_id, node_id=keep.node_id)
        except PoolExhausted:
            # No slot on the container's node: an unowned container must not linger.
            # (With thread mounts, its workspace lives on the host, not in the container.)
            logger.warning("no room to re-adopt sandbox %s on its node; removing its container", sandbox_id)
            await remove([keep])
            await self._forget(sandbox_id)
            self._count("lost")
            return "removed"
        if not self._state.replace_actor(sandbox_id, handle, info) and not self._state.adopt(
            sandbox_id, thread_id, handle, info, float(info.get("idle_for") or 0.0)
        ):
            await self._fleet.discard(handle)  # the thread got another sandbox meanwhile
            return "removed"
        self._count("readopted")
        logger.info("sandbox %s: container re-adopted by a new actor", sandbox_id)
        return "readopted"

    async def _forget(self, sandbox_id: str) -> None:
        """The sandbox is gone for good: drop its entry, any pending destroy and any claim."""
        self._state.removed(sandbox_id)
        self._doomed.discard(sandbox_id)
        await asyncio.to_thread(actors.drop_claim, self._config, sandbox_id)

    # ── views ──────────────────────────────────────────────────────────────

    async def list(self) -> list[dict[str, Any]]:
        """Every sandbox the pool holds, as plain dicts (for tables and JSON)."""
        await self._ready()
        entries = [e for e in self._state.entries.values() if e.actor is not None]
        reports = await actors.call_each(
            {e.sandbox_id: e.actor.activity.remote() for e in entries}, DESCRIBE_TIMEOUT, "activity"
        )
        for entry in entries:
            report = reports[entry.sandbox_id]
            if not isinstance(report, BaseException):  # silent ones show what was last known
                self._state.note_activity(entry.sandbox_id, report[0], report[1])
        now = self._state.clock()
        return [
            {
                "sandbox_id": entry.sandbox_id,
                "thread_id": entry.thread_id,
                "state": entry.state.value,
                "node_id": entry.info.get("node_id"),
                "container_name": entry.info.get("container_name"),
                "url": entry.info.get("url"),
                "age_s": round(now - entry.created_at, 3),
                "idle_s": round(now - entry.last_active, 3),
                "inflight": entry.inflight,
            }
            for entry in self._state.entries.values()
        ]

    async def stats(self) -> dict[str, Any]:
        """Totals per state and counters since the pool (re)started."""
        await self._ready()
        return {
            "pool": self._config.pool_name,
            "namespace": self._config.namespace,
            "states": self._state.counts(),
            "total": len(self._state.entries),
            "replicas": self._config.replicas,
            "max_sandboxes": self._config.max_sandboxes,
            "spare_actors": self._fleet.spare_count,
            "pid": os.getpid(),
            "counters": dict(self.counters),
            "isolation": self._isolation(),
        }

    def _isolation(self) -> dict[str, Any]:
        """The pool's isolation settings as status shows them."""
        config = self._config
        if config.backend.kind != "docker":
            return {"network": "decided by the provisioner", "runtime": "decided by the provisioner"}
        return {
            "network": config.network.policy().describe(),
            "runtime": config.runtime or "default",
            "user": config.user,
            "read_only_rootfs": config.read_only_rootfs,
            "engines": {engine[:12]: info for engine, info in self._fleet.prepared.items()},
        }

    # ── shutdown ───────────────────────────────────────────────────────────

    async def shutdown(self) -> dict[str, int]:
        """Destroy every sandbox of the pool and stop its loops. Idempotent and safe concurrently."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._shutdown_all())
        return await asyncio.shield(self._shutdown)

    async def _shutdown_all(self) -> dict[str, int]:
        # First: a client that finds the pool gone from here on must not bring it back by retrying.
        await asyncio.to_thread(actors.mark_shut_down, self._config)
        for loop in self._loops:
            loop.cancel()
        await self._fleet.close()
        pending = [*self._creations.values(), *self._repairs.values()]
        await asyncio.gather(*pending, return_exceptions=True)
        for entry in self._state.begin_shutdown():
            self._stop_later(entry, "destroyed")
        results = await asyncio.gather(*self._stops.values(), return_exceptions=True)
        destroyed = sum(1 for r in results if r is True)
        swept = await self._fleet.sweep()
        logger.info("pool %s shut down: %d destroyed, %s swept", self._config.pool_name, destroyed, swept)
        return {"destroyed": destroyed, **swept}
