"""The pool's hands: SandboxActors to start, spares to keep, reapers to ask.

:class:`Fleet` does what the pool decides: it starts sandboxes (on a spare,
already-running actor when one is ready, so a new thread does not wait for a
Ray worker to boot), keeps the spare actors topped up, finds one reaper per
Docker engine, and lists, probes and removes containers through them. It holds
no sandbox state: that is the pool's :class:`~sandbox_actors.state.PoolState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from . import actors
from .actors import ActorCallTimeout, ActorGone
from .config import SandboxConfig
from .errors import IsolationUnavailable, NotSupported, PoolExhausted, SandboxDied, SandboxError, SandboxOwned
from .reconcile import ActorView, ContainerView

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = 3.0
STOP_TIMEOUT = 60.0
REAPER_TIMEOUT = 30.0
_START_ATTEMPTS = 3
_PLACEMENT_POLL = 1.0


class Fleet:
    """Actors and reapers of one pool.

    Args:
        config: the pool's config.
        on_no_room: called (sandbox id, required node or None) each second an
            actor waits for a node with room and no spare can give way; the pool
            evicts a warm sandbox there (each holds a node slot).
    """

    def __init__(self, config: SandboxConfig, on_no_room: Callable[[str, str | None], None]) -> None:
        self._config = config
        self._on_no_room = on_no_room
        self._spares: list[tuple[Any, str, str]] = []  # placed, idle SandboxActors: (handle, name, node id)
        self._launching: dict[str, Any] = {}  # name -> actor started but not yet serving a sandbox
        self._reapers: dict[str, Any] = {}  # node id -> reaper
        self._refilling: asyncio.Task[None] | None = None
        self._spawning = 0  # spawns in flight in worker threads (they cannot be cancelled)
        self._starting = 0  # sandbox starts in flight (refills wait for them: they compete for CPU)
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget work, kept referenced
        self._named: dict[str, Any] = {}  # the pool's named actors at the last look: name -> handle
        self.prepared: dict[str, dict[str, Any]] = {}  # engine id -> what its reaper set up there

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    @property
    def keep_names(self) -> set[str]:
        """Actors the fleet holds that serve no sandbox (reconcile must leave them be)."""
        return {name for _, name, _ in self._spares} | set(self._launching)

    # ── starting sandboxes ────────────────────────────────────────────────

    async def start_sandbox(
        self, sandbox_id: str, thread_id: str | None, node_id: str | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """An actor serving ``sandbox_id`` with its container up and answering.

        Takes a spare actor when one is ready (and no node is required), else
        starts one. Adopts the actor that already owns the container, if any.

        Raises:
            PoolExhausted: no node had room within ``capacity_timeout``.
            ImageNotFound, ReadinessTimeout, SandboxStartError, ...: the container did not start.
        """
        self._starting += 1
        try:
            return await self._start_sandbox(sandbox_id, thread_id, node_id)
        finally:
            self._starting -= 1

    async def _start_sandbox(
        self, sandbox_id: str, thread_id: str | None, node_id: str | None
    ) -> tuple[Any, dict[str, Any]]:
        config = self._config
        for attempt in range(1, _START_ATTEMPTS + 1):
            actor, name = self._take_spare(node_id)
            spare = actor is not None
            if not spare:
                actor, name = await self._spawn_actor(node_id)
            self._launching[name] = actor
            self.refill()
            try:
                if not spare:  # a spare is placed already: it answered before it became one
                    await self._placed(actor, sandbox_id, node_id)
                info = await actors.call(
                    actor.start.remote(sandbox_id, thread_id), config.readiness_timeout + 120,
                    f"starting sandbox {sandbox_id}",
                )
                return actor, info
            except PoolExhausted:
                actors.kill(actor)  # never placed: nothing to stop
                raise
            except SandboxOwned as exc:
                actors.kill(actor)
                return await self._owner_of(sandbox_id, exc)
            except SandboxDied:
                actors.kill(actor)  # the actor died under us (e.g. a spare): try another
                if attempt == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.later(self.discard(actor))
                raise
            finally:
                self._launching.pop(name, None)
        raise AssertionError("unreachable")

    def _take_spare(self, node_id: str | None) -> tuple[Any, str]:
        """A ready spare actor (on ``node_id``, when given), or (None, '')."""
        for index, (actor, name, node) in enumerate(self._spares):
            if node_id is None or node == node_id:
                del self._spares[index]
                return actor, name
        return None, ""

    async def _spawn_actor(self, node_id: str | None) -> tuple[Any, str]:
        self._spawning += 1
        try:
            return await asyncio.to_thread(actors.spawn_sandbox_actor, self._config, node_id)
        finally:
            self._spawning -= 1

    async def _owner_of(self, sandbox_id: str, owned: SandboxOwned) -> tuple[Any, dict[str, Any]]:
        handle = await asyncio.to_thread(actors.get_actor, owned.owner, self._config.namespace)
        if handle is None:
            raise owned
        info = await actors.call(handle.describe.remote(), DESCRIBE_TIMEOUT, f"describe {owned.owner}")
        if info.get("sandbox_id") != sandbox_id or not info.get("started"):
            raise owned
        return handle, {**info, "adopted": True}

    def later(self, work: Any) -> asyncio.Task[Any]:
        """Run ``work`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _placed(self, actor: Any, sandbox_id: str, node_id: str | None) -> None:
        """Wait until Ray places the actor on a node. Ray leaves an actor no node can host
        pending forever, so the wait is bounded by ``capacity_timeout``. Meanwhile room is
        made: an idle spare gives way first, else a warm sandbox (on ``node_id`` when pinned).

        With no custom resources (``ray.resources`` empty) any node can host it (num_cpus=0):
        a slow placement is only a slow worker start, never a full cluster."""
        ping = actor.ping.remote()
        if not self._config.ray.resources and node_id is None:
            await actors.call(ping, self._config.readiness_timeout + 120, f"starting an actor for sandbox {sandbox_id}")
            return
        deadline = time.monotonic() + self._config.capacity_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                await actors.call(ping, max(0.01, min(_PLACEMENT_POLL, remaining)), f"placing sandbox {sandbox_id}")
                return
            except ActorCallTimeout as exc:
                if remaining <= _PLACEMENT_POLL:
                    raise PoolExhausted(
                        f"no node could host sandbox {sandbox_id} within {self._config.capacity_timeout:.0f}s "
                        f"(resources {self._config.ray.resources or 'none'}; are all sandbox slots taken?)"
                    ) from exc
            if not self._config.ray.resources:
                continue  # pinned to a node, but nothing a sandbox holds can stand in the way there
            # An idle spare holds a node slot too: give it up before any user's sandbox.
            spare, name = self._take_spare(node_id)
            if spare is not None:
                logger.info("no node has room for sandbox %s: ending spare actor %s", sandbox_id, name)
                actors.kill(spare)
            else:
                self._on_no_room(sandbox_id, node_id)

    async def discard(self, actor: Any) -> None:
        """Make sure an actor we gave up on leaves nothing behind."""
        with contextlib.suppress(SandboxError):
            await actors.call(actor.stop.remote(), STOP_TIMEOUT, "discarding a failed sandbox")
        actors.kill(actor)

    # ── spare actors ──────────────────────────────────────────────────────

    def refill(self) -> None:
        """Top the spare actors up to ``spare_actors``, in the background."""
        if not self._closed and (self._refilling is None or self._refilling.done()):
            self._refilling = self.later(self._refill())

    async def _refill(self) -> None:
        config = self._config
        while not self._closed and len(self._spares) < config.spare_actors:
            while self._starting and not self._closed:
                await asyncio.sleep(0.1)  # new threads first: a spare's start-up would slow theirs
            if self._closed:
                return
            try:
                actor, name = await self._spawn_actor(None)
            except SandboxError as exc:
                logger.warning("could not create a spare SandboxActor (%s); will retry", exc.message)
                return
            if self._closed:
                actors.kill(actor)
                return
            self._launching[name] = actor
            try:
                node = await actors.call(actor.ping.remote(), config.capacity_timeout, "starting a spare actor")
                # Connect it to its engine now, so a new thread does not wait for that either.
                await actors.call(actor.warm_up.remote(), REAPER_TIMEOUT, "warming up a spare actor")
            except SandboxError as exc:
                # No room (spares need a slot like any sandbox) or a crash: try again later.
                actors.kill(actor)
                logger.info("could not start a spare SandboxActor (%s); will retry", exc.message)
                return
            finally:
                self._launching.pop(name, None)
            self._spares.append((actor, name, node))

    async def close(self) -> None:
        """Stop refilling and end the spare actors (for shutdown)."""
        self._closed = True
        while self._spawning:  # a spawn in a worker thread finishes, then sees _closed
            await asyncio.sleep(0.01)
        if self._refilling is not None:
            self._refilling.cancel()
            await asyncio.gather(self._refilling, return_exceptions=True)
        for actor in [*(a for a, _, _ in self._spares), *self._launching.values()]:
            actors.kill(actor)
        self._spares.clear()
        self._launching.clear()

    # ── what exists ───────────────────────────────────────────────────────

    async def actor_views(self) -> tuple[list[ActorView], dict[str, Any], set[str]]:
        """Every live SandboxActor of the pool: (views, handles by name, names that did not answer)."""
        named = await asyncio.to_thread(actors.list_sandbox_actors, self._config, self._named)
        self._named = named
        described = await actors.call_each(
            {name: handle.describe.remote() for name, handle in named.items()}, DESCRIBE_TIMEOUT, "describe"
        )
        views, unknown = [], set()
        for name, result in described.items():
            if isinstance(result, ActorGone):
                continue
            if isinstance(result, BaseException):
                unknown.add(name)
                logger.warning("SandboxActor %s did not answer: %s", name, result)
                continue
            views.append(ActorView.from_description(result))
        return views, named, unknown

    async def engines(self) -> dict[str, tuple[Any, str]]:
        """One reaper per Docker engine: engine id -> (reaper, node id)."""
        nodes = await asyncio.to_thread(actors.sandbox_nodes, self._config)
        for node_id in list(self._reapers):
            if node_id not in nodes:
                del self._reapers[node_id]
        for node_id in sorted(nodes):
            if node_id not in self._reapers:
                self._reapers[node_id] = await asyncio.to_thread(actors.spawn_reaper, self._config, node_id)
        identities = await actors.call_each(
            {n: self._reapers[n].identity.remote() for n in sorted(self._reapers)}, REAPER_TIMEOUT, "reaper"
        )
        engines: dict[str, tuple[Any, str]] = {}
        for node_id, identity in identities.items():
            if isinstance(identity, BaseException):
                logger.warning("reaper on node %s did not answer: %s", node_id[:12], identity)
                gone = self._reapers.pop(node_id, None) if isinstance(identity, ActorGone) else None
                if gone is not None:
                    actors.kill(gone)
                continue
            reaper = self._reapers.get(node_id)
            if reaper is not None:
                engines.setdefault(identity[0], (reaper, node_id))
        return engines

    async def prepare(self, engines: dict[str, tuple[Any, str]], strict: bool) -> None:
        """Have each engine's reaper make its node ready for the pool's sandboxes (network and
        isolation rules, refreshed with the cluster's node addresses; runtime and limits checked).

        Raises:
            IsolationUnavailable, NotSupported: with ``strict``, when a node cannot isolate
                sandboxes as configured (otherwise logged: the sandboxes' own actors refuse then).
        """
        addresses = await asyncio.to_thread(actors.node_addresses)
        results = await actors.call_each(
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
        lists = await actors.call_each(
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
        return await actors.call(
            reaper.remove.remote(container.sandbox_id, container.container_id), REAPER_TIMEOUT, "remove container"
        )

    async def probe(self, engines: dict[str, tuple[Any, str]], container: ContainerView) -> dict[str, Any] | None:
        """What the container's owner record says when it runs and answers, else None."""
        reaper = engines[container.engine_id][0]
        return await actors.call(reaper.probe.remote(container.sandbox_id), REAPER_TIMEOUT, "probe")

    async def remove_everywhere(self, sandbox_id: str, container_id: str | None, engine_id: str | None) -> bool:
        """Remove a sandbox's container whose actor is gone; False when it could not be confirmed."""
        engines = await self.engines()
        if engine_id is not None and engine_id not in engines:
            return False  # that engine's reaper did not answer
        containers, _seen = await self.containers(engines)
        removed = True
        for container in containers:
            if container.sandbox_id == sandbox_id and container_id in (None, container.container_id):
                removed &= await self.remove(engines, container)
        return removed

    async def sweep(self) -> dict[str, int]:
        """Remove whatever of the pool still exists: actors, containers, then the reapers."""
        swept = {"actors": 0, "containers": 0}
        named = await asyncio.to_thread(actors.list_sandbox_actors, self._config)
        for handle in named.values():
            with contextlib.suppress(SandboxError):
                await actors.call(handle.stop.remote(), STOP_TIMEOUT, "stop")
            actors.kill(handle)
            swept["actors"] += 1
        try:
            engines = await self.engines()
            containers, _ = await self.containers(engines)
            for container in containers:
                if await self.remove(engines, container):
                    swept["containers"] += 1
            torn = await actors.call_each(
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
        for handle in await asyncio.to_thread(actors.list_reapers, self._config):
            actors.kill(handle)
        self._reapers.clear()
        return swept
