"""Spare SandboxActors: started ahead of need, so a new sandbox skips Ray's worker start-up.

The policy is plain functions (how many to keep, after the largest recent burst; how many to
start for starts that wait for one); :class:`Spares` keeps them: it starts them, hands each to
the first start waiting for one, keeps destroyed sandboxes' actors as spares when they are
wanted, and ends the learned ones no burst needs any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from . import raycalls, spawn
from .config import SandboxConfig
from .errors import PoolShutDown, SandboxError

logger = logging.getLogger(__name__)

REAPER_TIMEOUT = 30.0
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
SPARE_BYTES = 60 * 2**20  # what an idle SandboxActor holds (USS), for the memory bound
SPARE_MEMORY_SHARE = 0.25  # learned spares take at most this share of the free memory


class Demand:
    """How many new sandboxes were asked for at once lately: the spare actors worth keeping.

    A burst is the number of starts within ``BURST_WINDOW`` seconds, less the destroyed
    sandboxes' actors kept as spares within it (under steady churn each start takes the actor a
    destroy just gave back: no spare is missing); :meth:`peak` is the largest burst of the last
    ``decay`` seconds (a sliding-window maximum: a newer, larger burst replaces older ones, a
    smaller one waits behind them for its turn).
    """

    def __init__(self, window: float = BURST_WINDOW) -> None:
        self._window = window
        self._recent: deque[float] = deque()  # start times within the window
        self._returned: deque[float] = deque()  # times actors were given back within the window
        self._peaks: deque[tuple[float, int]] = deque()  # (time, burst): bursts decrease front to back

    def returned(self, now: float) -> None:
        """A destroyed sandbox's actor was kept as a spare at ``now``."""
        self._returned.append(now)

    def note(self, now: float) -> int:
        """A start asked for at ``now``; returns the burst it belongs to so far."""
        self._recent.append(now)
        for times in (self._recent, self._returned):
            while times and times[0] < now - self._window:
                times.popleft()
        burst = max(0, len(self._recent) - len(self._returned))
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


class Spares:
    """The spare actors of one pool, and the starts waiting for one.

    Args:
        config: the pool's config; later: runs a coroutine in the background (kept referenced).
    """

    def __init__(self, config: SandboxConfig, later: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self._config = config
        self.later = later
        self._spares: list[tuple[Any, str, str]] = []  # placed, idle SandboxActors: (handle, name, node id)
        self._launching: dict[str, Any] = {}  # name -> actor started but not yet serving a sandbox
        self._refilling: asyncio.Task[None] | None = None
        self._spawning = 0  # spawns in flight in worker threads (they cannot be cancelled)
        self.demand = Demand()
        self._recycled_at = -math.inf  # when a destroyed sandbox's actor was last kept as a spare
        self._waiting: deque[asyncio.Future[tuple[Any, str, str]]] = deque()  # starts waiting for a spare
        self._adding: set[asyncio.Task[bool]] = set()  # spares being started
        self.starting = 0  # sandbox starts in flight (refills wait for them: they compete for CPU)
        self.closed = False

    @property
    def count(self) -> int:
        return len(self._spares)

    @property
    def starting_spares(self) -> int:
        """Spare actors being started now (each a new Ray worker process)."""
        return len(self._adding)

    @property
    def waiting(self) -> int:
        """Sandbox starts waiting for a spare actor now."""
        return sum(1 for waiter in self._waiting if not waiter.done())

    def target(self) -> int:
        """How many spare actors to keep now (see :func:`spare_target`)."""
        peak = self.demand.peak(time.monotonic(), self._config.spare_decay)
        return spare_target(self._config, peak, len(self._spares), available_memory())

    @property
    def keep_names(self) -> set[str]:
        """Actors held that serve no sandbox (reconcile must leave them be)."""
        return {name for _, name, _ in self._spares} | set(self._launching)

    def launching(self, name: str) -> bool:
        return name in self._launching

    async def actor_for(self, node_id: str | None) -> tuple[Any, str, bool]:
        """An actor to start a sandbox on: a ready spare when one is (and no node is required),
        else the next spare to become ready (when any node can host it: no ``ray.resources``),
        else a new one. Returns (handle, name, is_spare); a spare is placed already. The actor
        counts as launching (kept by reconcile) until :meth:`launched`. Each call counts as
        demand: the spares kept grow to the largest recent burst."""
        if self.closed:
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

    def keep(self, actor: Any, name: str, node: str) -> None:
        """A destroyed sandbox's actor, its container removed, is a spare now."""
        self._recycled_at = time.monotonic()
        self.demand.returned(self._recycled_at)
        self._hand_over(actor, name, node)

    @contextlib.contextmanager
    def holding(self, name: str, actor: Any) -> Any:
        """While an actor serves nothing for a moment (its sandbox being removed to keep it): kept
        by reconcile."""
        self._launching[name] = actor
        try:
            yield
        finally:
            self._launching.pop(name, None)

    def wanted(self) -> bool:
        """Whether a start waits for a spare, or the spares (with those coming) are short of the target."""
        waiting = self.waiting
        return waiting > 0 or len(self._spares) + max(0, len(self._adding) - waiting) < self.target()

    def refill(self) -> None:
        """Start a spare for each start waiting for one, at once (unless destroyed sandboxes' actors
        are being kept as spares: the waiting starts get those); then, in the background, top the spares up to
        :meth:`spare_target` or end the learned ones past it."""
        if self.closed:
            self._fail_waiters()
            return
        waiting = self.waiting
        for _ in range(waiter_spawns(waiting, len(self._adding), time.monotonic() - self._recycled_at)):
            self._launch_spare()
        if self._refilling is None or self._refilling.done():
            self._refilling = self.later(self._refill())

    async def _refill(self) -> None:
        while not self.closed:
            # Starts first: a spare's start-up would slow theirs (they compete for CPU), and with
            # node slots a spare could take the slot one waits for. Starts waiting for a spare get
            # theirs at once (refill), not from here.
            while self.starting and not self.closed:
                await asyncio.sleep(0.1)
            # While destroyed sandboxes' actors are being kept as spares, they are what tops the
            # spares up: a worker started now would make one of them surplus (ended, then started
            # again for the next sandbox: ~1 s of a core each time, under steady churn).
            since_recycle = time.monotonic() - self._recycled_at
            if since_recycle < RECYCLE_GAP:
                await asyncio.sleep(RECYCLE_GAP - since_recycle)
                continue
            target = self.target()
            if len(self._spares) > target:
                if not self.starting and not self._adding:
                    self._trim(target)
                return
            coming = len(self._adding) - self.waiting
            missing = target - len(self._spares) - max(0, coming)
            if self.closed or missing <= 0:
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
        if self.closed:
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
        if self.closed:
            raycalls.kill(actor)
            return False
        self._hand_over(actor, name, node)
        return True

    async def close(self) -> None:
        """Stop refilling and end the spare actors (for shutdown)."""
        self.closed = True
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

