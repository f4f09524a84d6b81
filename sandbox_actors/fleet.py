"""The pool's hands: its SandboxActors, the spares kept ahead of need, one reaper per engine.

:class:`Fleet` does what the pool decides and reports what happened; it
decides nothing about sandboxes (that is :class:`~sandbox_actors.state.PoolState`)
and never calls back into the pool. Every Ray call the pool makes goes
through here, so the pool's logic runs on a fake fleet in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from typing import Any

from backends.base import Mount

from . import raycalls, spawn
from .config import SandboxConfig
from .errors import IsolationUnavailable, NotSupported, PoolShutDown, SandboxError, SandboxOwned
from .raycalls import ActorGone
from .views import ActorView, ContainerView

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = 3.0
STOP_TIMEOUT = 60.0
REAPER_TIMEOUT = 30.0
IMAGE_TIMEOUT = 600.0  # committing, saving or loading an image of a few GB
CLAIM_TIMEOUT = 10.0
WATCH_SECONDS = 300.0  # how long one watch call on an actor lasts (the pool calls again while it needs the actor)
BURST_WINDOW = 2.0  # new sandboxes asked for within this many seconds count as one burst
REFILL_BATCH = 2  # spare actors started at once (each start is ~1 s of a core)
# While destroyed sandboxes' actors are being kept as spares (the last one within RECYCLE_GAP s), a
# start waiting for a spare waits for the next of them and none is started for it: that one
# usually comes sooner than a new worker process, whose start is ~1 s of a core (on a busy node, a
# worker start per waiting start costs more CPU than the sandboxes themselves, and the queue grows
# without end). When they pause (the last within RECYCLE_WINDOW s), at most WAITER_SPAWNS are
# started at once for the waiting starts; otherwise (a burst, or nothing destroyed lately) one for
# each. A waiting start asks again every WAITER_RECHECK s.
RECYCLE_GAP = 2.0
RECYCLE_WINDOW = 10.0
WAITER_SPAWNS = 2
WAITER_RECHECK = 0.5
OWNER_GRACE = 30.0  # seconds past readiness_timeout to wait for another actor's start of a sandbox
SPARE_BYTES = 60 * 2**20  # what an idle SandboxActor holds (USS), for the memory bound
SPARE_MEMORY_SHARE = 0.25  # learned spares take at most this share of the free memory


class Demand:
    """How many new sandboxes were asked for at once lately: the spare actors worth keeping.

    A burst is the number of starts within ``BURST_WINDOW`` seconds; :meth:`peak` is the
    largest burst of the last ``decay`` seconds (a sliding-window maximum: a newer, larger
    burst replaces older ones, a smaller one waits behind them for its turn).
    """

    def __init__(self, window: float = BURST_WINDOW) -> None:
        self._window = window
        self._recent: deque[float] = deque()  # start times within the window
        self._peaks: deque[tuple[float, int]] = deque()  # (time, burst): bursts decrease front to back

    def note(self, now: float) -> int:
        """A start asked for at ``now``; returns the burst it belongs to so far."""
        self._recent.append(now)
        while self._recent[0] < now - self._window:
            self._recent.popleft()
        burst = len(self._recent)
        while self._peaks and self._peaks[-1][1] <= burst:
            self._peaks.pop()
        self._peaks.append((now, burst))
        return burst

    def peak(self, now: float, decay: float) -> int:
        """The largest burst that began less than ``decay`` seconds before ``now`` (0: none)."""
        while self._peaks and self._peaks[0][0] < now - decay:
            self._peaks.popleft()
        return self._peaks[0][1] if self._peaks else 0


def available_memory() -> int | None:
    """Bytes of memory available on this node (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def waiter_spawns(waiting: int, starting: int, since_recycle: float) -> int:
    """How many more spare actors to start for ``waiting`` starts waiting for one, with
    ``starting`` under way: one each; but none while destroyed sandboxes' actors are being kept
    as spares (the last ``since_recycle`` seconds ago: the waiting starts get those), and at most
    ``WAITER_SPAWNS`` under way when they paused only lately."""
    if since_recycle < RECYCLE_GAP:
        return 0
    if since_recycle < RECYCLE_WINDOW:
        waiting = min(waiting, WAITER_SPAWNS)
    return max(0, waiting - starting)


def spare_target(config: SandboxConfig, peak: int, spares: int, free_bytes: int | None) -> int:
    """Spare actors to keep: ``spare_actors``, or the recent ``peak`` of new sandboxes asked for
    at once when larger, bounded by ``spare_actors_max``, ``max_sandboxes`` and a share of the
    free memory (the ``spares`` there now count as free: they would be what is kept)."""
    learned = min(peak, config.spare_actors_max, config.max_sandboxes or peak)
    if free_bytes is not None:
        learned = min(learned, int((free_bytes + spares * SPARE_BYTES) * SPARE_MEMORY_SHARE) // SPARE_BYTES)
    return max(config.spare_actors, learned)


class Fleet:
    """The actors and reapers of one pool.

    Args:
        config: the pool's config.
    """

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._spares: list[tuple[Any, str, str]] = []  # placed, idle SandboxActors: (handle, name, node id)
        self._launching: dict[str, Any] = {}  # name -> actor started but not yet serving a sandbox
        self._reapers: dict[str, Any] = {}  # node id -> reaper
        self.engine_on: dict[str, str] = {}  # node id -> engine id, for reapers that answered last time
        self._refilling: asyncio.Task[None] | None = None
        self._spawning = 0  # spawns in flight in worker threads (they cannot be cancelled)
        self.demand = Demand()
        self._recycled_at = -math.inf  # when a destroyed sandbox's actor was last kept as a spare
        self._waiting: deque[asyncio.Future[tuple[Any, str, str]]] = deque()  # starts waiting for a spare
        self._adding: set[asyncio.Task[bool]] = set()  # spares being started
        self.starting = 0  # sandbox starts in flight (refills wait for them: they compete for CPU)
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget work, kept referenced
        self._named: dict[str, Any] = {}  # the pool's named actors at the last look: name -> handle
        self.prepared: dict[str, dict[str, Any]] = {}  # engine id -> what its reaper set up there

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    @property
    def spares_starting(self) -> int:
        """Spare actors being started now (each a new Ray worker process)."""
        return len(self._adding)

    @property
    def starts_waiting(self) -> int:
        """Sandbox starts waiting for a spare actor now."""
        return sum(1 for waiter in self._waiting if not waiter.done())

    def spare_target(self) -> int:
        """How many spare actors to keep now (see :func:`spare_target`)."""
        peak = self.demand.peak(time.monotonic(), self._config.spare_decay)
        return spare_target(self._config, peak, len(self._spares), available_memory())

    @property
    def keep_names(self) -> set[str]:
        """Actors the fleet holds that serve no sandbox (reconcile must leave them be)."""
        return {name for _, name, _ in self._spares} | set(self._launching)

    def later(self, work: Any) -> asyncio.Task[Any]:
        """Run ``work`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ── an actor for a sandbox ─────────────────────────────────────────────

    async def actor_for(self, node_id: str | None) -> tuple[Any, str, bool]:
        """An actor to start a sandbox on: a ready spare when one is (and no node is required),
        else the next spare to become ready (when any node can host it: no ``ray.resources``),
        else a new one. Returns (handle, name, is_spare); a spare is placed already. The actor
        counts as launching (kept by reconcile) until :meth:`launched`. Each call counts as
        demand: the spares kept grow to the largest recent burst."""
        if self._closed:
            # A start still under way when the pool shuts down: a container made now could
            # outlive the shutdown's sweep.
            raise PoolShutDown(f"pool {self._config.pool_name} is shutting down")
        self.demand.note(time.monotonic())
        actor, name = self.take_spare(node_id)
        spare = actor is not None
        if not spare and node_id is None and not self._config.ray.resources:
            # Ray starts worker processes a few at a time: waiting for whichever spare is ready
            # first beats queueing a worker start of one's own behind the spares'.
            try:
                actor, name, _node = await self._next_spare()
                spare = True
            except PoolShutDown:
                raise
            except SandboxError as exc:
                logger.info("no spare actor came (%s); starting one for this sandbox", exc.message)
        if not spare:
            actor, name = await self._spawn_actor(node_id)
        self._launching[name] = actor
        self.refill()
        return actor, name, spare

    async def _next_spare(self) -> tuple[Any, str, str]:
        """The next spare actor to become ready (one is started for this wait, unless destroyed
        sandboxes' actors are coming: see :func:`waiter_spawns`).

        Raises:
            SandboxError: the spare started for it failed (the caller starts an actor of its own).
        """
        waiter: asyncio.Future[tuple[Any, str, str]] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.refill()
        try:
            while not (await asyncio.wait([waiter], timeout=WAITER_RECHECK))[0]:
                self.refill()  # the destroyed sandboxes' actors may have stopped coming
            return waiter.result()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                actor, name, node = waiter.result()  # handed over as we were cancelled: a spare again
                self._launching.pop(name, None)
                self._spares.append((actor, name, node))
            raise
        finally:
            waiter.cancel()  # a no-op once it has its actor; else nobody may hand it one now
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def launched(self, name: str) -> None:
        """The actor now serves a sandbox (or was given up)."""
        self._launching.pop(name, None)

    async def placed(self, actor: Any, timeout: float) -> bool:
        """Whether Ray placed the actor on a node within ``timeout`` (it answers a ping)."""
        try:
            await raycalls.call(actor.ping.remote(), timeout, "placing an actor")
            return True
        except raycalls.ActorCallTimeout:
            return False

    async def start(self, actor: Any, sandbox_id: str, thread_id: str | None, resume: bool = False,
                    image: str | None = None, image_from: str | None = None,
                    container_id: str | None = None, mounts: tuple[Mount, ...] = ()) -> dict[str, Any]:
        """Have ``actor`` serve ``sandbox_id``: adopt its running container, start its stopped one
        again (``resume``, by its ``container_id`` when known), or create one (of a snapshot's
        ``image``, fetched from the reaper named ``image_from`` when this node's engine lacks it;
        mounting ``mounts`` instead of the pool's thread directories when given).

        Raises:
            SandboxOwned: another live actor owns the container.
            ImageNotFound, ReadinessTimeout, SandboxStartError, ...: the container did not start.
        """
        return await raycalls.call(
            actor.start.remote(sandbox_id, thread_id, resume, image, image_from, container_id, mounts),
            self._config.readiness_timeout + 120 + (IMAGE_TIMEOUT if image else 0), f"starting sandbox {sandbox_id}",
        )

    async def hibernate(self, actor: Any, sandbox_id: str) -> dict[str, Any]:
        """Have the actor stop its container, keeping the filesystem (then end the actor).

        Raises:
            ActorGone: the actor is gone; BackendUnavailable: the engine did not stop it.
        """
        info = await raycalls.call(actor.hibernate.remote(), STOP_TIMEOUT, f"hibernate {sandbox_id}")
        raycalls.kill(actor)
        return info

    async def snapshot(self, actor: Any, sandbox_id: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
        """Commit the sandbox's filesystem as ``image``; returns its id and size."""
        return await raycalls.call(actor.snapshot.remote(image, labels), IMAGE_TIMEOUT, f"snapshot {sandbox_id}")

    async def snapshot_images(self, engines: dict[str, tuple[Any, str]]) -> dict[str, list[dict[str, Any]]]:
        """The pool's snapshot images on each engine that answered."""
        lists = await raycalls.call_each(
            {e: reaper.snapshot_images.remote() for e, (reaper, _node) in engines.items()}, REAPER_TIMEOUT, "images"
        )
        found = {}
        for engine_id, listed in lists.items():
            if isinstance(listed, BaseException):
                logger.warning("could not list snapshot images on engine %s: %s", engine_id[:12], listed)
                continue
            found[engine_id] = listed
        return found

    async def remove_image(self, engines: dict[str, tuple[Any, str]], engine_id: str, image: str) -> bool:
        """Remove a snapshot image from one engine; False when a container still uses it."""
        return await raycalls.call(engines[engine_id][0].remove_image.remote(image), REAPER_TIMEOUT, "remove image")

    async def owner_of(self, sandbox_id: str, owned: SandboxOwned) -> tuple[Any, dict[str, Any]]:
        """The live actor that owns ``sandbox_id`` (it refused to let another start it), once its
        own start of it is done (a start cut short by a pool restart may still be under way there).

        Raises:
            SandboxOwned: it is gone, serves another sandbox, or did not finish starting this one in time.
        """
        handle = await asyncio.to_thread(raycalls.get_actor, owned.owner, self._config.namespace)
        if handle is None:
            raise owned
        deadline = time.monotonic() + self._config.readiness_timeout + OWNER_GRACE
        while True:
            info = await raycalls.call(handle.describe.remote(), DESCRIBE_TIMEOUT, f"describe {owned.owner}")
            if info.get("sandbox_id") != sandbox_id:
                raise owned
            if info.get("started"):
                return handle, {**info, "adopted": True}
            if time.monotonic() > deadline:
                raise owned
            await asyncio.sleep(0.2)

    def take_spare(self, node_id: str | None) -> tuple[Any, str]:
        """A ready spare actor (on ``node_id``, when given), or (None, '')."""
        for index, (actor, name, node) in enumerate(self._spares):
            if node_id is None or node == node_id:
                del self._spares[index]
                return actor, name
        return None, ""

    def give_up_spare(self, node_id: str | None) -> bool:
        """End an idle spare (on ``node_id``, when given): it holds a node slot. False: none."""
        actor, name = self.take_spare(node_id)
        if actor is None:
            return False
        logger.info("ending spare actor %s to free its slot", name)
        raycalls.kill(actor)
        return True

    async def _spawn_actor(self, node_id: str | None) -> tuple[Any, str]:
        self._spawning += 1
        try:
            return await asyncio.to_thread(spawn.sandbox_actor, self._config, node_id)
        finally:
            self._spawning -= 1

    # ── talking to a sandbox's actor ───────────────────────────────────────

    async def claim(self, actor: Any, thread_id: str | None) -> dict[str, Any]:
        return await raycalls.call(actor.claim.remote(thread_id), CLAIM_TIMEOUT, "claim a spare")

    async def alive(self, actor: Any) -> bool:
        """Whether the sandbox's actor lives and its container runs (a cheap check)."""
        try:
            return bool(await raycalls.call(actor.alive.remote(), DESCRIBE_TIMEOUT, "alive"))
        except SandboxError:
            return False

    @staticmethod
    def actor_key(actor: Any) -> str:
        """The same key for every handle of one actor (a handle looked up again is another object)."""
        return str(actor._actor_id.hex())

    async def outlives(self, actor: Any, seconds: float) -> bool:
        """False as soon as Ray reports the actor dead; True once ``seconds`` have passed, or when
        the call went unanswered or Ray calls the actor unreachable for now (a slow or cut-off node
        is the reconcile's to judge)."""
        try:
            await raycalls.call(actor.watched.remote(seconds), seconds + DESCRIBE_TIMEOUT, "watch")
        except ActorGone as exc:
            if not raycalls.only_unreachable(exc):
                return False
            logger.debug("watched actor unreachable for now: %s", exc)
        except SandboxError as exc:
            logger.debug("watch of an actor ended without an answer: %s", exc)
        return True

    async def describe(self, actor: Any) -> dict[str, Any]:
        return await raycalls.call(actor.describe.remote(), DESCRIBE_TIMEOUT, "describe")

    async def activity(self, actors: dict[str, Any]) -> dict[str, Any]:
        """Sandbox id -> (idle seconds, operations in flight, dead reason), or the error it raised."""
        return await raycalls.call_each({sid: a.activity.remote() for sid, a in actors.items()}, DESCRIBE_TIMEOUT,
                                        "activity")

    async def begin_stop(self, actor: Any, if_idle_for: float) -> bool:
        """Ask the sandbox to stop serving if it has been idle that long; False when it is busy."""
        return bool(await raycalls.call(actor.begin_stop.remote(if_idle_for), DESCRIBE_TIMEOUT, "begin stop"))

    async def cancel_stop(self, actor: Any) -> None:
        await raycalls.call(actor.cancel_stop.remote(), DESCRIBE_TIMEOUT, "cancel stop")

    async def stop(self, actor: Any, sandbox_id: str, recycle_as: tuple[str, str] | None = None) -> bool:
        """Have the actor remove its container, then end it; or, given its (name, node) in
        ``recycle_as`` while a spare is wanted (and no node slots are configured), keep it as a
        spare (its process is reused: no Ray worker start for the next new sandbox).

        Raises:
            ActorGone: the actor is gone (its container may still exist).
            BackendUnavailable: the engine did not answer; nothing was removed.
        """
        # Not with node slots (ray.resources): a stop may be what frees a slot another sandbox waits for.
        recycle = recycle_as is not None and not self._config.ray.resources and not self._closed and self._wants_spare()
        if recycle and recycle_as is not None:
            self._launching[recycle_as[0]] = actor  # serving nothing for a moment: reconcile must keep it
        try:
            stopped = await raycalls.call(actor.stop.remote(sandbox_id, recycle), STOP_TIMEOUT, f"stop {sandbox_id}")
        finally:
            if recycle and recycle_as is not None:
                self._launching.pop(recycle_as[0], None)
        if stopped is None:
            return True  # it serves another sandbox now (kept for it after this one's stop): leave it be
        if recycle and stopped and recycle_as is not None and not self._closed:
            self._recycled_at = time.monotonic()
            self._hand_over(actor, *recycle_as)
            return True
        raycalls.kill(actor)
        return bool(stopped)

    def _wants_spare(self) -> bool:
        """Whether a start waits for a spare, or the spares (with those coming) are short of the target."""
        waiting = self.starts_waiting
        return waiting > 0 or len(self._spares) + max(0, len(self._adding) - waiting) < self.spare_target()

    @staticmethod
    def kill(actor: Any) -> None:
        raycalls.kill(actor)

    async def discard(self, actor: Any) -> None:
        """Make sure an actor we gave up on leaves nothing behind."""
        with contextlib.suppress(SandboxError):
            await raycalls.call(actor.stop.remote(), STOP_TIMEOUT, "discarding a failed sandbox")
        raycalls.kill(actor)

    # ── spare actors ──────────────────────────────────────────────────────

    def refill(self) -> None:
        """Start a spare for each start waiting for one, at once (unless destroyed sandboxes' actors
        are being kept as spares: the waiting starts get those); then, in the background, top the spares up to
        :meth:`spare_target` or end the learned ones past it."""
        if self._closed:
            self._fail_waiters()
            return
        waiting = self.starts_waiting
        for _ in range(waiter_spawns(waiting, len(self._adding), time.monotonic() - self._recycled_at)):
            self._launch_spare()
        if self._refilling is None or self._refilling.done():
            self._refilling = self.later(self._refill())

    async def _refill(self) -> None:
        while not self._closed:
            # Starts first: a spare's start-up would slow theirs (they compete for CPU), and with
            # node slots a spare could take the slot one waits for. Starts waiting for a spare get
            # theirs at once (refill), not from here.
            while self.starting and not self._closed:
                await asyncio.sleep(0.1)
            target = self.spare_target()
            if len(self._spares) > target:
                if not self.starting and not self._adding:
                    self._trim(target)
                return
            coming = len(self._adding) - self.starts_waiting
            missing = target - len(self._spares) - max(0, coming)
            if self._closed or missing <= 0:
                return
            added = await asyncio.gather(*(self._launch_spare() for _ in range(min(missing, REFILL_BATCH))))
            if not all(added):
                return  # no room or a crash: the next refill (idle pass, next start) tries again

    def _trim(self, target: int) -> None:
        """End the spares past ``target`` (no burst that large came for ``spare_decay`` seconds)."""
        extra = self._spares[target:]
        del self._spares[target:]
        logger.info("ending %d learned spare actors: no burst of %d new sandboxes in the last %.0fs",
                    len(extra), target + len(extra), self._config.spare_decay)
        for actor, _name, _node in extra:
            raycalls.kill(actor)

    def _launch_spare(self) -> asyncio.Task[bool]:
        task = self.later(self._add_spare())
        self._adding.add(task)
        task.add_done_callback(self._adding.discard)
        return task

    def _hand_over(self, actor: Any, name: str, node: str) -> None:
        """A ready spare goes to the first start waiting for one, else joins the spares."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self._launching[name] = actor  # the waiter's, from now on: never unaccounted for
                waiter.set_result((actor, name, node))
                return
        self._spares.append((actor, name, node))

    def _fail_a_waiter(self, error: SandboxError) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                return

    async def _add_spare(self) -> bool:
        """Start one spare actor and connect it to its engine; False when that failed (a start
        waiting for it is told, and starts an actor of its own)."""
        config = self._config
        try:
            actor, name = await self._spawn_actor(None)
        except SandboxError as exc:
            logger.warning("could not create a spare SandboxActor (%s); will retry", exc.message)
            self._fail_a_waiter(exc)
            return False
        if self._closed:
            raycalls.kill(actor)
            return False
        self._launching[name] = actor
        try:
            node = await raycalls.call(actor.ping.remote(), config.capacity_timeout, "starting a spare actor")
            # Connect it to its engine now, so a new thread does not wait for that either.
            await raycalls.call(actor.warm_up.remote(), REAPER_TIMEOUT, "warming up a spare actor")
        except SandboxError as exc:
            # No room (spares need a slot like any sandbox) or a crash: try again later.
            self._launching.pop(name, None)
            raycalls.kill(actor)
            logger.info("could not start a spare SandboxActor (%s); will retry", exc.message)
            self._fail_a_waiter(exc)
            return False
        except asyncio.CancelledError:
            self._launching.pop(name, None)
            raycalls.kill(actor)  # shutting down
            raise
        self._launching.pop(name, None)
        if self._closed:
            raycalls.kill(actor)
            return False
        self._hand_over(actor, name, node)
        return True

    async def close(self) -> None:
        """Stop refilling and end the spare actors (for shutdown)."""
        self._closed = True
        while self._spawning:  # a spawn in a worker thread finishes, then sees _closed
            await asyncio.sleep(0.01)
        for task in [self._refilling, *self._adding]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._refilling, *self._adding] if t is not None), return_exceptions=True)
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        """Starts waiting for a spare start an actor of their own (no spare comes any more)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(PoolShutDown(f"pool {self._config.pool_name} is shutting down"))
        for actor in [*(a for a, _, _ in self._spares), *self._launching.values()]:
            raycalls.kill(actor)
        self._spares.clear()
        self._launching.clear()

    # ── what exists ───────────────────────────────────────────────────────

    async def actor_views(self) -> tuple[list[ActorView], dict[str, Any], set[str]]:
        """Every live SandboxActor of the pool: (views, handles by name, names that did not answer)."""
        named = await asyncio.to_thread(spawn.sandbox_actors, self._config, self._named)
        self._named = named
        described = await raycalls.call_each(
            {name: handle.describe.remote() for name, handle in named.items()}, DESCRIBE_TIMEOUT, "describe"
        )
        views, unknown = [], set()
        for name, result in described.items():
            if isinstance(result, ActorGone):
                continue
            if isinstance(result, BaseException):
                unknown.add(name)
                # One the fleet is starting may still wait for its worker process (on a busy node,
                # seconds): expected, and no cause for alarm.
                log = logger.info if name in self._launching else logger.warning
                log("SandboxActor %s did not answer: %s", name, result)
                continue
            views.append(ActorView.from_description(result))
        return views, named, unknown

    @staticmethod
    def node_id() -> str:
        """The node this process (the pool) runs on."""
        return raycalls.current_node_id()

    async def pool_exists(self, name: str) -> bool:
        """Whether a pool of that name runs (in this pool's namespace)."""
        return await asyncio.to_thread(raycalls.get_actor, name, self._config.namespace) is not None

    async def alive_nodes(self) -> set[str]:
        return await asyncio.to_thread(raycalls.alive_nodes)

    def reaper_on(self, node_id: str | None) -> Any:
        """The reaper of ``node_id`` as last seen (no call made), or None."""
        return self._reapers.get(node_id) if node_id is not None else None

    async def engines(self) -> dict[str, tuple[Any, str]]:
        """One reaper per Docker engine: engine id -> (reaper, node id)."""
        nodes = await asyncio.to_thread(raycalls.nodes_with, self._config.ray.resources)
        for node_id in list(self._reapers):
            if node_id not in nodes:
                del self._reapers[node_id]
        for node_id in sorted(nodes):
            if node_id not in self._reapers:
                self._reapers[node_id] = await asyncio.to_thread(spawn.reaper, self._config, node_id)
        identities = await raycalls.call_each(
            {n: self._reapers[n].identity.remote() for n in sorted(self._reapers)}, REAPER_TIMEOUT, "reaper"
        )
        engines: dict[str, tuple[Any, str]] = {}
        self.engine_on = {}
        for node_id, identity in identities.items():
            if isinstance(identity, BaseException):
                logger.warning("reaper on node %s did not answer: %s", node_id[:12], identity)
                gone = self._reapers.pop(node_id, None) if isinstance(identity, ActorGone) else None
                if gone is not None:
                    raycalls.kill(gone)
                continue
            reaper = self._reapers.get(node_id)
            if reaper is not None:
                engines.setdefault(identity[0], (reaper, node_id))
                self.engine_on[node_id] = identity[0]
        return engines

    async def prepare(self, engines: dict[str, tuple[Any, str]], strict: bool) -> None:
        """Have each engine's reaper make its node ready for the pool's sandboxes (network and
        isolation rules, refreshed with the cluster's node addresses; runtime and limits checked;
        the engine's container events followed).

        Raises:
            IsolationUnavailable, NotSupported: with ``strict``, when a node cannot isolate
                sandboxes as configured (otherwise logged: the sandboxes' own actors refuse then).
        """
        addresses = await asyncio.to_thread(raycalls.node_addresses)
        results = await raycalls.call_each(
            {e: reaper.prepare.remote(addresses) for e, (reaper, _node) in engines.items()}, REAPER_TIMEOUT,
            "prepare an engine",
        )
        for engine_id, result in results.items():
            if isinstance(result, (IsolationUnavailable, NotSupported)) and strict:
                raise result
            if isinstance(result, BaseException):
                logger.warning("engine %s could not be prepared for sandboxes: %s", engine_id[:12], result)
                continue
            self.prepared[engine_id] = result

    async def containers(self, engines: dict[str, tuple[Any, str]]) -> tuple[list[ContainerView], set[str]]:
        """The pool's containers on every engine that answered, and those engines."""
        lists = await raycalls.call_each(
            {e: reaper.containers.remote() for e, (reaper, _node) in engines.items()}, REAPER_TIMEOUT, "list containers"
        )
        containers, seen = [], set()
        for engine_id, listed in lists.items():
            if isinstance(listed, BaseException):
                logger.warning("could not list containers on engine %s: %s", engine_id[:12], listed)
                continue
            seen.add(engine_id)
            containers += [ContainerView(**item) for item in listed]
        return containers, seen

    async def remove(self, engines: dict[str, tuple[Any, str]], container: ContainerView) -> bool:
        """Remove exactly this container (not a namesake created since it was listed)."""
        reaper = engines[container.engine_id][0]
        return await raycalls.call(
            reaper.remove.remote(container.sandbox_id, container.container_id), REAPER_TIMEOUT, "remove container"
        )

    async def probe(self, engines: dict[str, tuple[Any, str]], container: ContainerView) -> dict[str, Any] | None:
        """What the container's owner record says when it runs and answers, else None."""
        reaper = engines[container.engine_id][0]
        return await raycalls.call(reaper.probe.remote(container.sandbox_id), REAPER_TIMEOUT, "probe")

    async def remove_everywhere(self, sandbox_id: str, container_id: str | None, engine_id: str | None) -> bool:
        """Remove a sandbox's container whose actor is gone; False when it could not be confirmed."""
        engines = await self.engines()
        if engine_id is not None and engine_id not in engines:
            return False  # that engine's reaper did not answer

        def its(found: list[ContainerView]) -> list[ContainerView]:
            return [c for c in found if c.sandbox_id == sandbox_id and container_id in (None, c.container_id)]

        containers, seen = await self.containers(engines)
        mine = its(containers)
        if not mine:
            return engine_id is None or engine_id in seen  # gone, if its engine could be asked
        for container in mine:
            await self.remove(engines, container)  # False: gone meanwhile (fine), or no longer ours
        # Confirmed only by a look afterwards: a container removed under us is just as gone.
        left, seen = await self.containers(engines)
        return all(c.engine_id in seen for c in mine) and not its(left)

    async def sweep(self) -> dict[str, int]:
        """Remove whatever of the pool still exists: actors, containers, networks, then the reapers."""
        swept = {"actors": 0, "containers": 0}
        named = await asyncio.to_thread(spawn.sandbox_actors, self._config)
        for handle in named.values():
            with contextlib.suppress(SandboxError):
                await raycalls.call(handle.stop.remote(), STOP_TIMEOUT, "stop")
            raycalls.kill(handle)
            swept["actors"] += 1
        try:
            engines = await self.engines()
            containers, _ = await self.containers(engines)
            for container in containers:
                if await self.remove(engines, container):
                    swept["containers"] += 1
            torn = await raycalls.call_each(
                {e: reaper.teardown.remote() for e, (reaper, _node) in engines.items()}, REAPER_TIMEOUT, "teardown"
            )
            for engine_id, result in torn.items():
                if isinstance(result, BaseException):
                    logger.warning("could not remove the pool's network on engine %s: %s", engine_id[:12], result)
                else:
                    for key, value in result.items():
                        swept[key] = swept.get(key, 0) + value
        except SandboxError as exc:
            logger.warning("shutdown sweep could not reach an engine: %s", exc.message)
        for handle in await asyncio.to_thread(spawn.reapers, self._config):
            raycalls.kill(handle)
        self._reapers.clear()
        return swept
