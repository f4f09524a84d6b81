"""NodeReaper: the pool's hands on one node's Docker engine.

The pool's own node cannot see other nodes' engines, so reconcile asks one
reaper per engine what containers exist, whether one still answers, and to
remove the ones that must go. A reaper only touches containers whose
engine-id label is its own engine's.
"""

from __future__ import annotations

from typing import Any

from backends import SandboxAPI
from backends.errors import BackendUnavailable, SandboxError

from . import actors
from .config import SandboxConfig
from .runtime import make_backend, read_owner

_PROBE_TIMEOUT = 3.0


class NodeReaper:
    """Lists, probes and removes this pool's containers on the local engine."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._pool = config.pool_name
        self._backend = make_backend(config)
        self._node_id = actors.current_node_id()

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
        found = await self._backend.prepare(
            self._pool, image=config.image, runtime=config.runtime, limits=config.limits,
            extra_blocked=cluster_addresses,
        )
        await self._backend.sweep_rules()
        return {**found, "node_id": self._node_id}

    async def teardown(self) -> dict[str, int]:
        """Remove the pool's network, rules and socket directories here (once its containers are gone)."""
        return await self._backend.teardown(self._pool)

    async def containers(self) -> list[dict[str, Any]]:
        """This pool's containers on this engine."""
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
