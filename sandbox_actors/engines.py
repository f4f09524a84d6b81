"""The pool's engines: one reaper per Docker engine, and what the pool asks of them (listing,
probing and removing containers, preparing a node's network, snapshot images, the sweep)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from . import raycalls, spawn
from .config import SandboxConfig
from .errors import IsolationUnavailable, NotSupported, SandboxError
from .raycalls import ActorGone
from .views import ContainerView

logger = logging.getLogger(__name__)

REAPER_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
Engines = dict[str, tuple[Any, str]]  # engine id -> (its reaper, the reaper's node id)


class EngineCalls:
    """The reapers of one pool (a part of :class:`~sandbox_actors.fleet.RayFleet`)."""

    _config: SandboxConfig

    def __init__(self) -> None:
        self._reapers: dict[str, Any] = {}  # node id -> reaper
        self.engine_on: dict[str, str] = {}  # node id -> engine id, for reapers that answered last time
        self.prepared: dict[str, dict[str, Any]] = {}  # engine id -> what its reaper set up there

    async def snapshot_images(self, engines: Engines) -> dict[str, list[dict[str, Any]]]:
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

    async def remove_image(self, engines: Engines, engine_id: str, image: str) -> bool:
        """Remove a snapshot image from one engine; False when a container still uses it."""
        return await raycalls.call(engines[engine_id][0].remove_image.remote(image), REAPER_TIMEOUT, "remove image")

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

    async def engines(self) -> Engines:
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
        engines: Engines = {}
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

    async def prepare(self, engines: Engines, strict: bool) -> None:
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

    async def containers(self, engines: Engines) -> tuple[list[ContainerView], set[str]]:
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

    async def remove(self, engines: Engines, container: ContainerView) -> bool:
        """Remove exactly this container (not a namesake created since it was listed)."""
        reaper = engines[container.engine_id][0]
        return await raycalls.call(
            reaper.remove.remote(container.sandbox_id, container.container_id), REAPER_TIMEOUT, "remove container"
        )

    async def probe(self, engines: Engines, container: ContainerView) -> dict[str, Any] | None:
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
