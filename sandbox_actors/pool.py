"""SandboxPool: the one named, detached actor that decides for a pool.

It only receives calls and wires its loops. Decisions come from
:class:`~sandbox_actors.state.PoolState` (no ``await`` inside a decision);
slow work runs as one operation per sandbox in the
:class:`~sandbox_actors.lifecycle.Lifecycle`, through the injected
:class:`~sandbox_actors.fleet.Fleet`; reconcile passes run in the
:class:`~sandbox_actors.reconciler.Reconciler`. After every ``await`` it asks
the state again. ``SandboxPool`` itself has no side effects on construction
(tests build it with a fake fleet); :class:`PoolActor` is what Ray runs.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from backends.base import Capability

from . import hibernation, reports, snapshots, startstop
from .acquire import acquire, destroy, hibernate
from .config import SandboxConfig
from .errors import ConfigError, InvalidRequest, IsolationUnavailable, NotSupported, PoolShutDown, SandboxError
from .fleet import Fleet, RayFleet
from .lifecycle import Lifecycle, lease
from .metrics import PoolMetrics, Tally
from .reconciler import Reconciler
from .records import PoolRecords
from .state import PoolState
from .threads import anonymous_sandbox_id, sandbox_id_for, validate_thread_id
from .views import HostDirs, Lease

logger = logging.getLogger(__name__)
REFUSALS = (IsolationUnavailable, NotSupported, ConfigError)  # the pool will not start: say why, stay down


class SandboxPool:
    """Acquire, release, destroy and watch the sandboxes of one pool.

    Args:
        config: the pool's config.
        fleet: its actors and reapers (default: Ray's); records: what it keeps in Ray's KV
            (default: Ray's); tally: its counts and metrics; clock: monotonic seconds.
    """

    def __init__(self, config: SandboxConfig, fleet: Fleet | None = None, records: PoolRecords | None = None,
                 tally: Tally | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._state = PoolState(config.replicas, config.max_sandboxes, config.idle_timeout, config.prewarm, clock)
        self._life = Lifecycle(config, self._state, fleet or RayFleet(config), records or PoolRecords.for_config(config),
                               tally or Tally())
        self._reconciler = Reconciler(self._life)
        self._started: asyncio.Task[None] | None = None
        self._refused: SandboxError | None = None  # why the pool would not start
        self._shutdown: asyncio.Task[dict[str, int]] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # ── lifecycle of the pool itself ───────────────────────────────────────

    def start(self) -> asyncio.Task[None]:
        """Begin: rebuild the view of what exists, then run the idle and reconcile loops."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._startup())
        return self._started

    async def _ready(self) -> None:
        if self._shutdown is not None:
            raise PoolShutDown(f"pool {self._config.pool_name} was shut down; connect again for a new one")
        await asyncio.shield(self.start())
        if self._refused is not None:
            raise self._refused

    async def _startup(self) -> None:
        config = self._config
        try:
            await startstop.claim_base_dir(config, self._life)
            await self._reconciler.run(strict=True)  # a node that cannot isolate sandboxes stops us here
        except REFUSALS as exc:
            logger.error("pool %s refuses to start: %s", config.pool_name, exc.message)
            self._refused = exc
            self._state.close()
            await self._life.fleet.close()
            await self._life.fleet.sweep()
            return
        except Exception:
            logger.exception("initial reconcile failed; serving anyway, next pass in %ss", config.reconcile_interval)
        self._loops = [
            self._every(config.idle_check_interval, self._idle_pass, "idle check"),
            self._every(config.reconcile_interval, self._reconciler.run, "reconcile"),
        ]
        self._life.top_up()

    async def _idle_pass(self) -> None:
        await self._life.idle_pass()
        hibernation.expire(self._life)

    def _every(self, interval: float, work: Callable[[], Coroutine[Any, Any, Any]], name: str) -> asyncio.Task[None]:
        async def loop() -> None:
            while self._shutdown is None:
                await asyncio.sleep(interval)
                try:
                    # Shielded: shutdown cancels the loop, never a pass half done (its remote calls
                    # would go on unwatched); shutdown waits for the pass instead.
                    await asyncio.shield(work())
                except asyncio.CancelledError:
                    raise
                except Exception:  # a pass that fails is logged and the next one runs: the loop cannot die
                    logger.exception("%s pass failed; next in %.1fs", name, interval)

        return asyncio.get_running_loop().create_task(loop())

    async def ping(self) -> str:
        """Answers once the pool has started (initial reconcile done); returns its node id."""
        await self._ready()
        return self._life.fleet.node_id()

    async def config(self) -> SandboxConfig:
        return self._config

    # ── acquire ────────────────────────────────────────────────────────────

    async def acquire(self, thread_id: str | None = None, request_id: str | None = None,
                      snapshot: str | None = None, known_actor: str | None = None,
                      host: HostDirs | None = None) -> Lease:
        """The thread's sandbox: active, else reclaimed warm, else resumed, else a spare, else
        adopted or created. Anonymous (``thread_id`` None): a new sandbox, the same one again for
        the same ``request_id``. With ``snapshot`` (a name): a new sandbox started from it. With
        ``host``: a new sandbox starts on its node with its mounts (never a pre-warmed spare). When
        its actor is ``known_actor`` (the caller holds that actor's handle already), the lease
        comes without the handle: receiving one costs a caller ~2 ms, the rest of a hot acquire ~3.

        Raises:
            InvalidThreadId, PoolExhausted (retryable), PoolShutDown, BackendUnavailable (a destroy
            of it is still owed), InvalidRequest (no such snapshot, or the thread has a sandbox
            already), and the start errors of a new sandbox (ImageNotFound, ...).
        """
        await self._ready()
        started = time.monotonic()
        known = snapshot is None or snapshot in self._life.snapshot_records
        if not known and snapshot not in await snapshots.refresh(self._life):
            raise InvalidRequest(f"no snapshot named {snapshot!r} in pool {self._config.pool_name}")
        anonymous = anonymous_sandbox_id(self._config.pool_name, request_id) if thread_id is None else None
        got = await acquire(self._life, lambda: anonymous or self._sandbox_id(str(thread_id)), thread_id,
                            started + self._config.capacity_timeout, snapshot, host)
        self._life.tally.acquired(got.path, time.monotonic() - started)
        if known_actor is not None and got.info.get("actor_name") == known_actor:
            return dataclasses.replace(got, actor=None)
        return got

    async def resolve(self, thread_id: str) -> str:
        """The sandbox id of ``thread_id``: the one it holds, else the one it would get."""
        await self._ready()
        return self._sandbox_id(thread_id)

    def _sandbox_id(self, thread_id: str) -> str:
        validate_thread_id(thread_id)
        return self._state.lookup(thread_id) or sandbox_id_for(self._config.pool_name, thread_id)

    # ── release, get, destroy ──────────────────────────────────────────────

    async def release(self, sandbox_id: str) -> bool:
        """Park an active sandbox in the warm pool (its container keeps running)."""
        await self._ready()
        released = self._state.release(sandbox_id)
        if released:
            self._life.tally.count("released")
        return released

    async def get(self, sandbox_id: str) -> Lease | None:
        """The lease of an active sandbox (activity refreshed), else None."""
        await self._ready()
        entry = self._state.get(sandbox_id)
        return None if entry is None else lease(entry, "hot")

    async def destroy(self, sandbox_id: str) -> bool:
        """Stop and remove a sandbox, active or warm. Idempotent: False when there was none.

        Raises:
            BackendUnavailable: its engine did not confirm the removal; the pool keeps trying
                (the sandbox shows as 'doomed' and is never handed out again).
        """
        await self._ready()
        return await destroy(self._life, sandbox_id)

    # ── hibernate and snapshot ─────────────────────────────────────────────

    async def hibernate(self, sandbox_id: str, live: bool = False) -> bool:
        """Stop a sandbox's container keeping its filesystem (``live``: its processes and memory
        too, gVisor only), and end its actor; the next acquire of its thread resumes it. True
        when it is hibernated (also already), False when unknown.

        Raises:
            NotSupported: the backend cannot stop and start a sandbox (a provisioner), or ``live``
                on a pool that cannot checkpoint (says what is missing).
            BackendUnavailable: the engine did not stop it; it serves on.
        """
        await self._ready()
        self._require(Capability.HIBERNATE)
        return await hibernate(self._life, sandbox_id, live)

    async def snapshot(self, sandbox_id: str, name: str | None = None, live: bool = False) -> dict[str, Any]:
        """Save a running sandbox's filesystem (not the thread mounts; with ``live``, its processes
        and memory too) as a snapshot; returns its record (name, image, size, engine, node,
        created; ``checkpoint`` when live).

        Raises:
            NotSupported (a provisioner; ``live`` where no checkpoint can be made), InvalidRequest
            (a bad or used name), SandboxNotFound.
        """
        await self._ready()
        self._require(Capability.SNAPSHOT)
        return await snapshots.take(self._life, sandbox_id, name, live)

    def _require(self, capability: Capability) -> None:
        backend = self._config.backend
        if capability not in backend.capabilities:
            raise NotSupported(f"the {backend.kind} backend cannot {capability.value}", feature=capability.value)

    async def snapshots(self) -> list[dict[str, Any]]:
        """The pool's snapshots, oldest first."""
        await self._ready()
        found = await snapshots.refresh(self._life)
        return sorted(found.values(), key=lambda r: float(r.get("created") or 0))

    async def remove_snapshot(self, name: str) -> bool:
        """Remove a snapshot's image everywhere; False when there was none.

        Raises:
            InvalidRequest: a sandbox started from it still exists.
        """
        await self._ready()
        return await snapshots.remove(self._life, snapshots.validate_name(name))

    async def report_dead(self, sandbox_id: str, container_id: str | None = None) -> None:
        """A SandboxActor, a client or the engine's events say this sandbox died: repair it now, or
        as soon as the operation under way on it (a start, a snapshot, ...) ends."""
        entry = self._state.entry(sandbox_id)
        if entry is not None and container_id and entry.container_id and container_id != entry.container_id:
            return  # an older container of the same sandbox
        self._life.died(sandbox_id)

    # ── views ──────────────────────────────────────────────────────────────

    async def list(self) -> builtins.list[dict[str, Any]]:
        """Every sandbox the pool holds, as plain dicts (for tables and JSON)."""
        await self._ready()
        return await reports.rows(self._life, self._state)

    async def stats(self) -> dict[str, Any]:
        """Totals per state, counters since the pool (re)started, and its isolation."""
        await self._ready()
        return reports.stats(self._config, self._life, self._state)

    async def history(self, sandbox_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Each change of a sandbox's state or actor this pool saw (of one sandbox, when given),
        oldest first, with the wall-clock time: what a failure is read against."""
        await self._ready()
        return self._state.history(sandbox_id)

    async def reconcile(self) -> dict[str, int]:
        """Run a reconcile pass now; returns what it did (counts per action)."""
        await self._ready()
        return await self._reconciler.run()

    # ── shutdown ───────────────────────────────────────────────────────────

    async def shutdown(self) -> dict[str, int]:
        """Destroy every sandbox of the pool and stop its loops. Idempotent and safe concurrently."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._shutdown_all())
        return await asyncio.shield(self._shutdown)

    async def _shutdown_all(self) -> dict[str, int]:
        return await startstop.shut_down(self._config, self._life, self._state, self._reconciler, self._loops)


class PoolActor(SandboxPool):
    """The SandboxPool as Ray runs it: logging set up, and started as soon as it exists (also when
    Ray restarts it and nobody calls it yet), with its metrics exported."""

    def __init__(self, config: SandboxConfig) -> None:
        _configure_logging()
        super().__init__(config, tally=Tally(PoolMetrics(config.pool_name)))
        with contextlib.suppress(RuntimeError):  # no running loop yet: the first call starts it
            self.start()


def _configure_logging() -> None:
    level = os.environ.get("SANDBOX_ACTORS_LOG_LEVEL", "WARNING").upper()
    for name in ("sandbox_actors", "backends"):
        logging.getLogger(name).setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
