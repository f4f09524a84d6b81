"""SandboxPool: the one named, detached actor that decides for a pool.

It is async and thin: decisions come from :class:`~sandbox_actors.state.PoolState`
(no ``await`` inside a decision), slow work (creating, stopping, probing
sandboxes) runs as tasks outside it, and every decision is asked again after
an ``await``. Two loops run on its event loop: the idle check and reconcile.
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
from .actors import ActorCallTimeout, ActorGone
from .config import SandboxConfig
from .errors import PoolExhausted, PoolShutDown, SandboxDied, SandboxError
from .metrics import PoolMetrics
from .reconcile import ActorView, ContainerView, plan_reconcile
from .state import Acquired, Entry, MustCreate, MustWait, PoolState, SandboxState
from .threads import anonymous_sandbox_id, sandbox_id_for

logger = logging.getLogger(__name__)

_DESCRIBE_TIMEOUT = 3.0
_STOP_TIMEOUT = 60.0
_REAPER_TIMEOUT = 30.0
_SPAWN_ATTEMPTS = 3
_PLACEMENT_POLL = 1.0


@dataclass(frozen=True)
class Lease:
    """What acquire returns: the sandbox and the actor that serves it.

    ``path`` is how it was obtained: 'hot' (already active), 'warm'
    (reclaimed), 'cold' (new container) or 'adopted' (a live sandbox the pool
    took over).
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
        self._state = PoolState(config.replicas, config.max_sandboxes, config.idle_timeout)
        self._creations: dict[str, asyncio.Task[Lease]] = {}
        self._stops: dict[str, asyncio.Task[bool]] = {}
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._doomed: set[str] = set()  # destroy asked, but the engine did not answer yet
        self._reapers: dict[str, Any] = {}  # node id -> reaper handle
        self._changed = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._started: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._shutdown: asyncio.Task[dict[str, int]] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self._metrics = PoolMetrics(config.pool_name)

    # ── lifecycle ──────────────────────────────────────────────────────────

    async def _ready(self) -> None:
        if self._shutdown is not None:
            raise PoolShutDown(f"pool {self._config.pool_name} was shut down; connect again for a new one")
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._startup())
        await asyncio.shield(self._started)

    async def _startup(self) -> None:
        # Rebuild the view before serving: a restarted pool must find its sandboxes.
        try:
            await self._reconcile_pass()
        except Exception:
            logger.exception("initial reconcile failed; serving anyway, next pass in %ss", self._config.reconcile_interval)
        self._loops = [
            self._spawn(self._every(self._config.idle_check_interval, self._idle_pass, "idle check")),
            self._spawn(self._every(self._config.reconcile_interval, self._reconcile_pass, "reconcile")),
        ]

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
        """The thread's sandbox: active, else reclaimed warm, else adopted or created.

        Raises:
            InvalidThreadId, PoolExhausted (retryable), PoolShutDown, and the
            start errors of a new sandbox (ImageNotFound, ReadinessTimeout, ...).
        """
        await self._ready()
        started = time.monotonic()
        lease = await self._acquire(thread_id, started + self._config.capacity_timeout)
        self._metrics.acquired(lease.path, time.monotonic() - started)
        self._metrics.states(self._state.counts())
        return lease

    async def _acquire(self, thread_id: str | None, deadline: float) -> Lease:
        config = self._config
        sandbox_id = anonymous_sandbox_id() if thread_id is None else sandbox_id_for(config.pool_name, thread_id)
        while True:
            if self._shutdown is not None:
                raise PoolShutDown(f"pool {config.pool_name} is shutting down")
            repair = self._repairs.get(sandbox_id)
            if repair is not None:
                await asyncio.shield(repair)
                continue
            decision = self._state.acquire(sandbox_id, thread_id)
            if isinstance(decision, Acquired):
                self._count("reclaimed" if decision.path == "warm" else "acquired_hot")
                return self._lease(decision.entry, decision.path)
            for victim in decision.evict:
                logger.info("evicting warm sandbox %s to stay within replicas=%d", victim.sandbox_id, config.replicas)
                self._stop_later(victim, "evicted")
            if isinstance(decision, MustCreate):
                if decision.over_soft_cap:
                    logger.warning(
                        "all %d replica slots are in active use; creating sandbox %s beyond the soft limit",
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
                await self._wait_changed(0.05)
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

    async def _create(self, entry: Entry) -> Lease:
        sandbox_id = entry.sandbox_id
        try:
            actor, info = await self._start_actor(sandbox_id, entry.thread_id)
            self._state.started(sandbox_id, actor, info)
        except BaseException:
            self._state.start_failed(sandbox_id)
            self._count("failed")
            raise
        finally:
            self._creations.pop(sandbox_id, None)
            self._notify()
        path = "adopted" if info.get("adopted") else "cold"
        self._count("adopted" if info.get("adopted") else "created")
        return self._lease(entry, path)

    async def _start_actor(
        self, sandbox_id: str, thread_id: str | None, node_id: str | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Spawn (or find) the SandboxActor and have it start; roll back on failure."""
        config = self._config
        for attempt in range(1, _SPAWN_ATTEMPTS + 1):
            actor = await asyncio.to_thread(actors.spawn_sandbox_actor, config, sandbox_id, thread_id, node_id)
            try:
                await self._placed(actor, sandbox_id)
                info = await actors.call(
                    actor.start.remote(), config.readiness_timeout + 120, f"starting sandbox {sandbox_id}"
                )
                return actor, info
            except PoolExhausted:
                actors.kill(actor)  # never placed: nothing to stop, and its name must not linger
                raise
            except SandboxDied:
                # get_if_exists handed back an actor of the same name that is being
                # destroyed (or just died): end it, wait for the name to free up, retry.
                actors.kill(actor)
                if attempt == _SPAWN_ATTEMPTS:
                    raise
                await asyncio.sleep(0.2 * attempt)
            except BaseException:
                self._spawn(self._discard_actor(actor))
                raise
        raise AssertionError("unreachable")

    async def _placed(self, actor: Any, sandbox_id: str) -> None:
        """Wait until Ray places the actor on a node (it leaves an actor no node can host
        pending forever, so the wait is bounded by ``capacity_timeout``). While it waits, warm
        sandboxes are evicted one by one: each holds a node slot a new sandbox may need."""
        deadline = time.monotonic() + self._config.capacity_timeout
        ping = actor.ping.remote()
        while True:
            remaining = deadline - time.monotonic()
            try:
                await actors.call(ping, max(0.01, min(_PLACEMENT_POLL, remaining)), f"placing sandbox {sandbox_id}")
                return
            except ActorCallTimeout as exc:
                if remaining <= _PLACEMENT_POLL:
                    config = self._config
                    raise PoolExhausted(
                        f"no node could host sandbox {sandbox_id} within {config.capacity_timeout:.0f}s "
                        f"(resources {config.ray.resources or 'none'}; are all sandbox slots taken?)"
                    ) from exc
            victim = self._state.evict_lru_warm()
            if victim is not None:
                logger.info("no node has room for sandbox %s: evicting warm sandbox %s", sandbox_id, victim.sandbox_id)
                self._stop_later(victim, "evicted")

    async def _discard_actor(self, actor: Any) -> None:
        """Make sure an actor we gave up on leaves nothing behind."""
        with contextlib.suppress(SandboxError):
            await actors.call(actor.stop.remote(), _STOP_TIMEOUT, "discarding a failed sandbox")
        actors.kill(actor)

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
            found = self._state.begin_destroy(sandbox_id)
            if found is None:
                return False
            if isinstance(found, MustWait):
                task = self._creations.get(sandbox_id) or self._stops.get(sandbox_id)
                if task is None:
                    await self._wait_changed(0.05)
                    continue
                with contextlib.suppress(Exception):
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
                    stopped = await actors.call(entry.actor.stop.remote(if_idle_for), _STOP_TIMEOUT, f"stop {sandbox_id}")
                except ActorGone:
                    await self._remove_container(sandbox_id, entry.info.get("engine_id"))
                    stopped = True
                if not stopped:
                    logger.info("sandbox %s got busy; not stopping it", sandbox_id)
                    self._state.stop_refused(sandbox_id)
                    return False
                actors.kill(entry.actor)
            self._state.removed(sandbox_id)
            self._doomed.discard(sandbox_id)
            self._count(reason)
            logger.info("sandbox %s %s", sandbox_id, reason)
            return True
        except SandboxError as exc:
            # The engine (or actor) did not answer. Forget the entry but remember to
            # finish the job: reconcile removes doomed sandboxes instead of adopting them.
            logger.warning("could not stop sandbox %s (%s); reconcile will retry", sandbox_id, exc.message)
            self._state.removed(sandbox_id)
            self._doomed.add(sandbox_id)
            return True
        finally:
            self._stops.pop(sandbox_id, None)
            self._notify()

    async def _remove_container(self, sandbox_id: str, engine_id: str | None) -> bool:
        removed = False
        for engine, (reaper, _node) in (await self._engines()).items():
            if engine_id is None or engine == engine_id:
                removed |= await actors.call(reaper.remove.remote(sandbox_id), _REAPER_TIMEOUT, "remove container")
        return removed

    async def report_dead(self, sandbox_id: str) -> None:
        """A SandboxActor (or client) saw this sandbox die: repair it now, not at the next pass."""
        self._schedule_repair(sandbox_id)

    # ── idle ───────────────────────────────────────────────────────────────

    async def _idle_pass(self) -> None:
        candidates = self._state.idle_candidates()
        if not candidates:
            return
        reports = await asyncio.gather(
            *(actors.call(entry.actor.activity.remote(), _DESCRIBE_TIMEOUT, "activity") for entry, _ in candidates),
            return_exceptions=True,
        )
        for (entry, version), report in zip(candidates, reports):
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

    async def _engines(self) -> dict[str, tuple[Any, str]]:
        """One reaper per Docker engine: engine id -> (reaper, node id)."""
        nodes = await asyncio.to_thread(actors.sandbox_nodes, self._config)
        for node_id in list(self._reapers):
            if node_id not in nodes:
                del self._reapers[node_id]
        for node_id in sorted(nodes):
            if node_id not in self._reapers:
                self._reapers[node_id] = await asyncio.to_thread(actors.spawn_reaper, self._config, node_id)
        node_ids = sorted(self._reapers)
        identities = await asyncio.gather(
            *(actors.call(self._reapers[n].identity.remote(), _REAPER_TIMEOUT, "reaper") for n in node_ids),
            return_exceptions=True,
        )
        engines: dict[str, tuple[Any, str]] = {}
        for node_id, identity in zip(node_ids, identities):
            if isinstance(identity, BaseException):
                logger.warning("reaper on node %s did not answer: %s", node_id[:12], identity)
                if isinstance(identity, ActorGone):
                    self._reapers.pop(node_id, None)
                continue
            engines.setdefault(identity[0], (self._reapers[node_id], node_id))
        return engines

    async def _containers(self, engines: dict[str, tuple[Any, str]]) -> tuple[list[ContainerView], set[str]]:
        engine_ids = list(engines)
        lists = await asyncio.gather(
            *(actors.call(engines[e][0].containers.remote(), _REAPER_TIMEOUT, "list containers") for e in engine_ids),
            return_exceptions=True,
        )
        containers, seen = [], set()
        for engine_id, listed in zip(engine_ids, lists):
            if isinstance(listed, BaseException):
                logger.warning("could not list containers on engine %s: %s", engine_id[:12], listed)
                continue
            seen.add(engine_id)
            containers += [ContainerView(**item) for item in listed]
        return containers, seen

    async def _actor_views(self) -> tuple[dict[str, ActorView | None], dict[str, Any]]:
        named = await asyncio.to_thread(actors.list_sandbox_actors, self._config.namespace)
        ids = list(named)
        described = await asyncio.gather(
            *(actors.call(named[i].describe.remote(), _DESCRIBE_TIMEOUT, "describe") for i in ids),
            return_exceptions=True,
        )
        views: dict[str, ActorView | None] = {}
        for sandbox_id, result in zip(ids, described):
            if isinstance(result, ActorGone):
                continue
            views[sandbox_id] = None if isinstance(result, BaseException) else ActorView.from_description(result)
        return views, named

    def _busy(self) -> set[str]:
        return (
            set(self._creations) | set(self._stops) | set(self._repairs)
            | self._state.ids({SandboxState.STARTING, SandboxState.STOPPING})
        )

    async def reconcile(self) -> dict[str, int]:
        """Run a reconcile pass now; returns what it did (counts per action)."""
        await self._ready()
        return await self._reconcile_pass()

    async def _reconcile_pass(self) -> dict[str, int]:
        async with self._reconcile_lock:
            views, handles = await self._actor_views()
            engines = await self._engines()
            containers, seen = await self._containers(engines)
            plan = plan_reconcile(self._state.ids(), views, containers, seen, self._busy())
            done: collections.Counter[str] = collections.Counter()
            for view in plan.adopt:
                if view.sandbox_id in self._doomed:
                    plan.repair.append(view.sandbox_id)
                elif self._state.adopt(view.sandbox_id, view.thread_id, handles[view.sandbox_id], view.info, view.idle_for):
                    done["adopted"] += 1
            for container in plan.remove_containers:
                if container.engine_id in engines:
                    reaper = engines[container.engine_id][0]
                    if await actors.call(reaper.remove.remote(container.sandbox_id), _REAPER_TIMEOUT, "remove"):
                        done["removed_containers"] += 1
            for sandbox_id in plan.end_actors:
                actors.kill(handles[sandbox_id])
                done["ended_actors"] += 1
            for sandbox_id in plan.forget:
                self._state.removed(sandbox_id)
                done["forgotten"] += 1
            repairs = [self._schedule_repair(sandbox_id) for sandbox_id in plan.repair]
            results = await asyncio.gather(*(r for r in repairs if r is not None), return_exceptions=True)
            done["repaired"] += sum(1 for r in results if r == "readopted")
            done["removed_containers"] += sum(1 for r in results if r == "removed")
            for key, value in done.items():
                self._count(f"reconcile_{key}", value)
            if not plan.is_empty():
                logger.info("reconcile: %s", dict(done))
            self._notify()
            return {key: value for key, value in done.items() if value}

    def _schedule_repair(self, sandbox_id: str) -> asyncio.Task[str] | None:
        if sandbox_id in self._repairs:
            return self._repairs[sandbox_id]
        if sandbox_id in self._creations or sandbox_id in self._stops or self._shutdown is not None:
            return None
        task = asyncio.get_running_loop().create_task(self._repair(sandbox_id))
        self._repairs[sandbox_id] = task
        task.add_done_callback(lambda _t: self._repairs.pop(sandbox_id, None))
        return task

    async def _repair(self, sandbox_id: str) -> str:
        """Look closely at one sandbox and make it whole or make it gone.

        Returns what happened: 'healthy', 'readopted', 'removed' or 'unknown'.
        """
        try:
            return await self._repair_one(sandbox_id)
        except SandboxError as exc:
            logger.warning("repair of sandbox %s failed (%s); next reconcile retries", sandbox_id, exc.message)
            return "unknown"
        finally:
            self._notify()

    async def _repair_one(self, sandbox_id: str) -> str:
        entry = self._state.entries.get(sandbox_id)
        handle = entry.actor if entry is not None and entry.actor is not None else None
        if handle is None:
            name = actors.sandbox_actor_name(sandbox_id)
            handle = await asyncio.to_thread(actors.get_actor, name, self._config.namespace)
        view = None
        if handle is not None:
            try:
                view = ActorView.from_description(
                    await actors.call(handle.describe.remote(), _DESCRIBE_TIMEOUT, "describe")
                )
            except ActorGone:
                # Dead, or unreachable with its node: end it now so its name frees up at
                # once, rather than when Ray gets round to declaring the node dead.
                actors.kill(handle)
                handle = None
        engines = await self._engines()
        containers, _seen = await self._containers(engines)
        found = [c for c in containers if c.sandbox_id == sandbox_id]
        doomed = sandbox_id in self._doomed
        own = [c for c in found if view is not None and c.container_id == view.container_id]

        async def remove(victims: list[ContainerView]) -> None:
            for container in victims:
                reaper = engines[container.engine_id][0]
                await actors.call(reaper.remove.remote(sandbox_id), _REAPER_TIMEOUT, "remove")

        if view is not None and view.started:
            await remove([c for c in found if c not in own])  # never two containers for one sandbox
            if not doomed and view.dead_reason is None and own and own[0].running:
                if entry is None:
                    self._state.adopt(sandbox_id, view.thread_id, handle, view.info, view.idle_for)
                return "healthy"
            # Its container died (or destroy is pending): clean both up; the next acquire starts fresh.
            await actors.call(handle.stop.remote(), _STOP_TIMEOUT, f"stop {sandbox_id}")
            actors.kill(handle)
            self._state.removed(sandbox_id)
            self._doomed.discard(sandbox_id)
            self._count("destroyed" if doomed else "died")
            return "removed"
        # The actor is gone or never finished starting: keep one container that answers.
        keep = None
        if not doomed:
            for container in found:
                reaper = engines[container.engine_id][0]
                if container.running and await actors.call(reaper.probe.remote(sandbox_id), _REAPER_TIMEOUT, "probe"):
                    keep = container
                    break
        await remove([c for c in found if c is not keep])
        if keep is None:
            if handle is not None:
                actors.kill(handle)
            if entry is not None and not doomed:
                self._count("lost")  # its actor and container are gone (e.g. with their node)
            self._state.removed(sandbox_id)
            self._doomed.discard(sandbox_id)
            return "removed"
        if handle is not None:  # started by a pool that died mid-create: let it finish (it adopts)
            info = await actors.call(handle.start.remote(), self._config.readiness_timeout + 60, "start")
        else:
            try:
                handle, info = await self._start_actor(sandbox_id, keep.thread_id, node_id=keep.node_id)
            except PoolExhausted:
                # No slot on the container's node: an unowned container must not linger.
                # (Its thread's workspace lives on the host, not in the container.)
                logger.warning("no room to re-adopt sandbox %s on its node; removing its container", sandbox_id)
                await remove([keep])
                self._state.removed(sandbox_id)
                self._count("lost")
                return "removed"
        if not self._state.replace_actor(sandbox_id, handle, info):
            self._state.adopt(sandbox_id, keep.thread_id, handle, info, float(info.get("idle_for") or 0.0))
        self._count("readopted")
        logger.info("sandbox %s: container re-adopted by a new actor", sandbox_id)
        return "readopted"

    # ── views ──────────────────────────────────────────────────────────────

    async def list(self) -> list[dict[str, Any]]:
        """Every sandbox the pool holds, as plain dicts (for tables and JSON)."""
        await self._ready()
        now = self._state.clock()
        rows = []
        for entry in self._state.entries.values():
            rows.append(
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
            )
        return rows

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
            "counters": dict(self.counters),
        }

    # ── shutdown ───────────────────────────────────────────────────────────

    async def shutdown(self) -> dict[str, int]:
        """Destroy every sandbox of the pool and stop its loops. Idempotent and safe concurrently."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._shutdown_all())
        return await asyncio.shield(self._shutdown)

    async def _shutdown_all(self) -> dict[str, int]:
        for loop in self._loops:
            loop.cancel()
        pending = [*self._creations.values(), *self._repairs.values()]
        await asyncio.gather(*pending, return_exceptions=True)
        for entry in self._state.begin_shutdown():
            self._stop_later(entry, "destroyed")
        results = await asyncio.gather(*self._stops.values(), return_exceptions=True)
        destroyed = sum(1 for r in results if r is True)
        swept = await self._sweep()
        logger.info("pool %s shut down: %d destroyed, %s swept", self._config.pool_name, destroyed, swept)
        return {"destroyed": destroyed, **swept}

    async def _sweep(self) -> dict[str, int]:
        """Remove whatever of this pool still exists: actors, containers, then the reapers."""
        swept = {"actors": 0, "containers": 0}
        named = await asyncio.to_thread(actors.list_sandbox_actors, self._config.namespace)
        for handle in named.values():
            with contextlib.suppress(SandboxError):
                await actors.call(handle.stop.remote(), _STOP_TIMEOUT, "stop")
            actors.kill(handle)
            swept["actors"] += 1
        try:
            engines = await self._engines()
            containers, _ = await self._containers(engines)
            for container in containers:
                reaper = engines[container.engine_id][0]
                if await actors.call(reaper.remove.remote(container.sandbox_id), _REAPER_TIMEOUT, "remove"):
                    swept["containers"] += 1
        except SandboxError as exc:
            logger.warning("shutdown sweep could not reach an engine: %s", exc.message)
        for handle in await asyncio.to_thread(actors.list_reapers, self._config):
            actors.kill(handle)
        self._reapers.clear()
        return swept
