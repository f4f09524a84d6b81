"""NodeReaper: the pool's hands on one node's Docker engine.

The pool's own node cannot see other nodes' engines, so reconcile asks one
reaper per engine what containers exist, whether one still answers, and to
remove the ones that must go. A reaper only touches containers whose
engine-id label is its own engine's. It also follows the engine's event
stream and tells the pool at once when one of its containers dies, so the
pool's state stays true between its own looks.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from typing import Any

from backends import SandboxAPI
from backends.errors import BackendUnavailable, SandboxError

from . import checkpoints, raycalls
from .actorconfig import ActorConfig
from .config import SandboxConfig
from .outbound import Outbound
from .runtime import make_backend, read_owner
from .threads import checkpoint_dir

_PROBE_TIMEOUT = 3.0
_RECONNECT_SECONDS = 1.0
_TASK_SWEEP_SECONDS = 30.0

logger = logging.getLogger(__name__)


class NodeReaper:
    """Lists, probes and removes this pool's containers on the local engine."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._limits = ActorConfig.of(config).limits
        self._pool = config.pool_name
        self._backend = make_backend(ActorConfig.of(config), cluster=raycalls.session_name())
        self._node_id = raycalls.current_node_id()
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self._preparing = asyncio.Lock()  # a teardown waits for a prepare under way, never races it
        self._tasks_swept_at = 0.0
        self._outbound = Outbound(config, self._backend)

    async def identity(self) -> tuple[str, str]:
        """(engine id, Ray node id)."""
        return await self._backend.engine_id(), self._node_id

    async def prepare(self, cluster_addresses: list[str]) -> dict[str, Any]:
        """Make this engine ready for the pool's sandboxes: its network, with firewall rules that
        also refuse every node of the cluster (``cluster_addresses``), refreshed on every call; the
        runtime and limits checked. Rules of pools whose network is gone are removed.

        Raises:
            IsolationUnavailable, NotSupported: this node cannot isolate sandboxes as configured.
        """
        config = self._config
        async with self._preparing:
            found = await self._backend.prepare(
                self._pool, image=config.image, runtime=config.runtime, limits=self._limits,
                extra_blocked=cluster_addresses,
            )
            if config.network.allow_domains:  # its sandboxes reach names through its proxy here
                found = {**found, **await self._outbound.ensure(cluster_addresses)}
            await self._backend.sweep_rules()
        self._watch()
        return {**found, "node_id": self._node_id}

    def _watch(self) -> None:
        """Follow the engine's container events (once per reaper, in a thread of its own)."""
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._follow_events, name="container-events", daemon=True)
            self._watcher.start()

    def _follow_events(self) -> None:
        pool = None
        while not self._closing.is_set():
            try:
                for event in self._backend.container_events(self._pool):
                    pool = pool or raycalls.get_actor(self._pool, self._config.namespace)
                    if pool is not None:
                        # Fire and forget: the pool checks it against what it knows.
                        pool.report_dead.remote(event.sandbox_id, event.container_id)
            except SandboxError as exc:
                logger.info("container events of %s interrupted (%s); following again", self._pool, exc.message)
            pool = None  # the pool may have been restarted meanwhile
            self._closing.wait(_RECONNECT_SECONDS)

    async def snapshot_images(self) -> list[dict[str, Any]]:
        """This pool's snapshot images on this engine."""
        return await self._backend.snapshot_images(self._pool)

    async def remove_image(self, image: str) -> bool:
        """Remove a snapshot image of this pool here, and a live snapshot's checkpoint with it;
        False when a container still uses it."""
        removed = await self._backend.remove_image(image)
        if removed:
            name = image.rpartition(":")[2]
            await asyncio.to_thread(shutil.rmtree, checkpoint_dir(self._config.base_dir, name), True)
        return removed

    async def export_image(self, image: str) -> bytes:
        """A snapshot image as an archive, for a node whose engine lacks it."""
        return await self._backend.export_image(image)

    async def export_checkpoint(self, snapshot: str) -> bytes:
        """A live snapshot's checkpoint kept on this node, as an archive, for a node that forks
        from it and does not have it."""
        return await asyncio.to_thread(checkpoints.pack, checkpoint_dir(self._config.base_dir, snapshot))

    async def teardown(self) -> dict[str, int]:
        """Remove the pool's network, rules and socket directories here (once its containers are gone)."""
        self._closing.set()
        async with self._preparing:
            await self._outbound.close()
            removed = await self._backend.teardown(self._pool)
        await self._sweep_tasks()
        return removed

    async def _sweep_tasks(self) -> None:
        """What the engine's runtime kept of containers gone (see Backend.sweep_tasks); at most
        every _TASK_SWEEP_SECONDS."""
        self._tasks_swept_at = time.monotonic()
        try:
            if ended := await self._backend.sweep_tasks():
                logger.info("ended %d runtime task(s) of containers the engine no longer has", ended)
        except SandboxError as exc:
            logger.info("could not look for runtime tasks of gone containers: %s", exc.message)

    async def containers(self) -> list[dict[str, Any]]:
        """This pool's containers on this engine."""
        if time.monotonic() - self._tasks_swept_at > _TASK_SWEEP_SECONDS:
            await self._sweep_tasks()
        engine = await self._backend.engine_id()
        return [
            {
                "sandbox_id": record.sandbox_id,
                "thread_id": record.thread_id,
                "container_id": record.container_id,
                "running": record.running,
                "engine_id": record.engine_id,
                "node_id": self._node_id,
            }
            for record in await self._backend.list(self._pool)
            if record.engine_id == engine and record.sandbox_id
        ]

    async def probe(self, sandbox_id: str) -> dict[str, Any] | None:
        """None unless the sandbox's container runs and its API answers; then its owner record
        (which actor owned it; empty when the image keeps none)."""
        record = await self._backend.discover(sandbox_id)
        if record is None or not record.running or record.pool != self._pool:
            return None
        api = SandboxAPI(record.url, record.token)
        try:
            await api.wait_ready(
                _PROBE_TIMEOUT,
                is_running=lambda: self._backend.is_running(sandbox_id),
                log_tail=lambda: self._backend.logs_tail(sandbox_id),
            )
            return await read_owner(api) or {}
        except BackendUnavailable:
            raise  # the engine did not answer: that says nothing about the sandbox
        except SandboxError:
            return None
        finally:
            await api.aclose()

    async def remove(self, sandbox_id: str, container_id: str | None = None) -> bool:
        """Remove the container of ``sandbox_id`` if it is this pool's, on this engine (and, when
        given, still the container ``container_id``: a namesake created since is left alone)."""
        record = await self._backend.discover(sandbox_id)
        if record is None or record.pool != self._pool or record.engine_id != await self._backend.engine_id():
            return False
        return await self._backend.destroy(sandbox_id, container_id)
