"""The client API: connect to a pool, acquire sandboxes, use them.

    import sandbox_actors
    pool = sandbox_actors.connect()            # attaches to Ray (or starts it)
    box = pool.acquire("thread-1")             # same sandbox from any process
    print(box.exec("echo hi").output)
    pool.release(box)

Every method is synchronous; in async code use ``pool.aio`` and ``box.aio``
(the same methods, awaitable, except ``shutdown``; they do not retry while a
pool restarts), or call the actor directly, naming the sandbox:
``await box.actor.exec.remote(box.sandbox_id, "ls")``.
"""

from __future__ import annotations

import builtins

import asyncio
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from backends.base import Mount

from . import raycalls
from .config import MountConfig, SandboxConfig, load_config
from .errors import (
    ConfigError,
    InvalidRequest,
    IsolationUnavailable,
    NotSupported,
    PoolShutDown,
    PoolUnavailable,
)
from .options import pool_options
from .raycalls import ActorGone
from .records import PoolRecords
from .handle import FILE_CHUNK, AsyncSandboxHandle, BackgroundCommand, SandboxHandle
from .threads import validate_thread_id
from .views import HostDirs, Lease, Snapshot

logger = logging.getLogger(__name__)

_POOL_RETRY_SECONDS = 60.0


def ensure_ray(address: str | None = None) -> None:
    """Attach to Ray: an initialized session as is, else ``address`` or RAY_ADDRESS, else the
    cluster ``sandbox-actors up`` started or this machine runs, else a new local one (which ends
    with this process)."""
    from .localray import attach

    attach(address, fallback="local")


def pool_actor(config: SandboxConfig) -> Any:
    """Get or create the pool named in ``config`` (any process may call this)."""
    from .pool import PoolActor

    return raycalls.remote_class(PoolActor).options(**pool_options(config)).remote(config)


def _id(handle_or_id: SandboxHandle | str) -> str:
    return handle_or_id.sandbox_id if isinstance(handle_or_id, SandboxHandle) else handle_or_id


def _snap(snapshot: Snapshot | str | None) -> str | None:
    return snapshot.name if isinstance(snapshot, Snapshot) else snapshot


MountLike = Mount | Mapping[str, Any]


def host_dirs(mounts: Iterable[MountLike] | None, node_id: str | None) -> HostDirs | None:
    """What an acquire with ``mounts`` (host directories) or ``node_id`` asks of a new sandbox:
    its node (default: the caller's, where the directories are), and the mounts, checked here.

    Raises:
        InvalidRequest: a mount that is not absolute, holds '..', or takes a container path twice;
            a node id that names no live node.
    """
    if mounts is None and node_id is None:
        return None
    checked: list[Mount] = []
    for mount in mounts or ():
        if isinstance(mount, Mapping):
            try:
                given = MountConfig.model_validate(dict(mount))
            except ValidationError as exc:
                raise InvalidRequest(f"bad mount {dict(mount)!r}: {exc.errors()[0]['msg']}") from None
            mount = Mount(given.host_path, given.container_path, given.read_only)
        if not isinstance(mount, Mount):
            raise InvalidRequest(f"a mount is a backends.Mount or a mapping, not {type(mount).__name__}")
        for path in (mount.host_path, mount.container_path):
            if not path.startswith("/") or ".." in path.split("/"):
                raise InvalidRequest(f"mount paths must be absolute, without '..': {path!r}")
        if any(m.container_path.rstrip("/") == mount.container_path.rstrip("/") for m in checked):
            raise InvalidRequest(f"two mounts at {mount.container_path!r}")
        checked.append(mount)
    if node_id is None:
        node_id = raycalls.current_node_id()
    elif node_id not in raycalls.alive_nodes():
        raise InvalidRequest(f"node {node_id!r} is not a live node of this Ray cluster")
    return HostDirs(node_id, tuple(checked))


def _acquire_args(thread_id: str | None, request_id: str | None) -> tuple[str | None, str | None]:
    """Checked here, before a round trip; an anonymous acquire gets one request id per call (the
    same for every retry of it)."""
    if thread_id is not None:
        validate_thread_id(thread_id)
    elif request_id is None:
        request_id = uuid.uuid4().hex
    return thread_id, request_id


KNOWN_ACTORS = 4096  # threads whose actor handle a client keeps (then the oldest is forgotten)


class _KnownActors:
    """The actor handle this client last got for each thread. An acquire names that actor, and
    the pool leaves the handle out of its answer when it still serves the thread: receiving a
    handle costs ~2 ms, most of a hot acquire otherwise."""

    def __init__(self, size: int = KNOWN_ACTORS) -> None:
        self._handles: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # thread -> (actor name, handle)
        self._size = size
        self._lock = threading.Lock()  # a client is used from many threads

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self._size}  # a client that travels (in a handle, to a task) starts with none

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._handles, self._size, self._lock = OrderedDict(), state["size"], threading.Lock()

    def get(self, thread_id: str | None) -> tuple[str, Any] | None:
        if thread_id is None:
            return None
        with self._lock:
            return self._handles.get(thread_id)

    def complete(self, thread_id: str | None, lease: Lease, known: tuple[str, Any] | None) -> Lease:
        """The lease with its handle: ``known``'s when the pool left it out, else keep the new one."""
        if lease.actor is None and known is not None:
            return dataclasses.replace(lease, actor=known[1])
        name = lease.info.get("actor_name")
        if thread_id is not None and name and lease.actor is not None:
            with self._lock:
                self._handles[thread_id] = (name, lease.actor)
                self._handles.move_to_end(thread_id)
                while len(self._handles) > self._size:
                    self._handles.popitem(last=False)
        return lease


class PoolClient:
    """A connection to one SandboxPool. Safe to use from many threads; cheap to create.

    One rule names sandboxes: ``acquire`` takes a thread id; every call on a sandbox that exists
    (``get``, ``release``, ``destroy``, ``hibernate``, ``snapshot``) takes its handle or its
    sandbox id; ``sandbox_id(thread)`` turns one into the other.

    Pool calls survive a pool restart: a call that meets a restarting or dead
    pool is retried (a dead pool is re-created) for up to 60 s. A pool shut
    down on purpose (``shutdown()``, ``sandbox-actors down``) stays down: calls
    raise PoolShutDown until someone calls ``connect()`` again.
    """

    def __init__(self, config: SandboxConfig, pool: Any) -> None:
        self.config = config
        self.pool = pool
        self._closed = False
        self._known = _KnownActors()
        self.aio = AsyncPoolClient(self)

    def _method(self, method: str) -> Any:
        if self._closed:
            raise PoolShutDown(f"pool {self.config.pool_name} was shut down by this client; connect again")
        return getattr(self.pool, method)

    def _retrying(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + _POOL_RETRY_SECONDS
        while True:
            try:
                return raycalls.value(self._method(method).remote(*args))
            except ActorGone as exc:
                if PoolRecords.for_config(self.config).was_shut_down():
                    raise PoolShutDown(
                        f"pool {self.config.pool_name} was shut down (by `sandbox-actors down` or a shutdown() "
                        "call); connect() again to start a new one"
                    ) from exc
                if time.monotonic() > deadline:
                    raise PoolUnavailable(f"pool {self.config.pool_name} unreachable for {_POOL_RETRY_SECONDS:.0f}s") from exc
                logger.info("pool %s is gone or restarting; reconnecting", self.config.pool_name)
                time.sleep(0.5)
                self.pool = pool_actor(self.config)

    def _report_dead(self, sandbox_id: str) -> None:
        if not self._closed:
            self.pool.report_dead.remote(sandbox_id)

    def sandbox_id(self, thread_id: str) -> str:
        """The sandbox id of ``thread_id`` in this pool: the one it holds, else the one it would get."""
        validate_thread_id(thread_id)
        return self._retrying("resolve", thread_id)

    def acquire(self, thread_id: str | None = None, *, request_id: str | None = None,
                snapshot: Snapshot | str | None = None, mounts: Iterable[MountLike] | None = None,
                node_id: str | None = None) -> SandboxHandle:
        """The thread's sandbox; same sandbox from every process. None: a new anonymous one (retries
        of one call, and calls with the same ``request_id``, get the same one). A hibernated
        sandbox is resumed. With ``snapshot``: a new sandbox started from it.

        ``mounts`` (``Mount`` or ``{host_path, container_path, read_only}``) are directories of the
        caller's node (or of ``node_id``) that a *new* sandbox mounts in place of the pool's own
        thread directories; it then starts on that node. ``node_id`` alone pins a new sandbox to a
        node. A sandbox the thread has already is returned as it is.

        Raises:
            InvalidThreadId: empty, too long or non-text thread id.
            PoolExhausted: no capacity within ``capacity_timeout`` (retryable).
            InvalidRequest: no such snapshot, the thread has a sandbox already (with a snapshot),
                a bad mount, or a node that does not live.
            ImageNotFound, ReadinessTimeout, SandboxStartError: a new sandbox could not start.
        """
        thread_id, request_id = _acquire_args(thread_id, request_id)
        host = host_dirs(mounts, node_id)
        known = self._known.get(thread_id)
        lease = self._retrying("acquire", thread_id, request_id, _snap(snapshot), known and known[0], host)
        return SandboxHandle(self._known.complete(thread_id, lease, known), self)

    def fork(self, snapshot: Snapshot | str, threads: Iterable[str]) -> Iterator[SandboxHandle]:
        """Start a sandbox from ``snapshot`` for each thread, all at once; yields each handle as it
        becomes ready. The first failure is raised when it comes (the other sandboxes start
        anyway: ``acquire(thread)`` gets them)."""
        threads = list(threads)
        for thread in threads:
            validate_thread_id(thread)
        pending = {self._method("acquire").remote(t, None, _snap(snapshot)): t for t in threads}
        while pending:
            ready, _ = raycalls.wait_first(list(pending))
            pending.pop(ready)
            yield SandboxHandle(raycalls.value(ready), self)

    def hibernate(self, handle_or_id: SandboxHandle | str, *, live: bool = False) -> bool:
        """Hibernate a sandbox (its handle or its sandbox id): its container stops with its
        filesystem kept, its actor ends; the next acquire of the thread resumes it. With
        ``live`` (gVisor pools: ``runtime: runsc``), its processes and memory are kept too: its
        background commands, servers and shell go on after the resume. False when there is no
        such running sandbox.

        Raises:
            NotSupported: a provisioner's sandboxes cannot hibernate; ``live`` on a pool that
                cannot checkpoint says what is missing.
            BackendUnavailable, SandboxStartError: the engine did not stop it, or could not
                checkpoint it (it serves on).
        """
        return self._retrying("hibernate", _id(handle_or_id), live)

    def snapshot(self, handle_or_id: SandboxHandle | str, name: str | None = None, *, live: bool = False
                 ) -> Snapshot:
        """Snapshot a running sandbox (see :meth:`SandboxHandle.snapshot`); ``name`` defaults to
        the thread and the time. ``live`` (gVisor pools) keeps its processes and memory too: each
        sandbox started from it goes on from them (``box.info["forked_live"]``).

        Raises:
            NotSupported: ``live`` on a pool that cannot checkpoint (says what is missing).
        """
        return Snapshot.from_record(self._retrying("snapshot", _id(handle_or_id), name, live))

    def snapshots(self) -> list[Snapshot]:
        """The pool's snapshots, oldest first."""
        return [Snapshot.from_record(r) for r in self._retrying("snapshots")]

    def remove_snapshot(self, snapshot: Snapshot | str) -> bool:
        """Remove a snapshot's image everywhere. False when there was none.

        Raises:
            InvalidRequest: a sandbox started from it still exists.
        """
        return self._retrying("remove_snapshot", _snap(snapshot))

    def get(self, sandbox_id: str) -> SandboxHandle | None:
        """The handle of an active sandbox, else None."""
        lease = self._retrying("get", sandbox_id)
        return None if lease is None else SandboxHandle(lease, self)

    def release(self, handle_or_id: SandboxHandle | str) -> bool:
        """Park the sandbox warm (container keeps running). False if it was not active."""
        return self._retrying("release", _id(handle_or_id))

    def destroy(self, handle_or_id: SandboxHandle | str) -> bool:
        """Stop and remove the sandbox, active or warm. Idempotent (False: nothing to destroy).

        Raises:
            BackendUnavailable: its engine did not confirm the removal (the pool keeps trying).
        """
        return self._retrying("destroy", _id(handle_or_id))

    def destroy_thread(self, thread_id: str) -> bool:
        """Destroy the sandbox of ``thread_id``."""
        return self.destroy(self.sandbox_id(thread_id))

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every sandbox of the pool (id, thread, state, node, age, idle, in-flight)."""
        return self._retrying("list")

    def stats(self) -> dict[str, Any]:
        """Totals per state, event counters and the pool's isolation."""
        return self._retrying("stats")

    def reconcile(self) -> dict[str, int]:
        """Run a reconcile pass now (adopt, re-adopt, remove orphans); returns counts."""
        return self._retrying("reconcile")

    def history(self, handle_or_id: SandboxHandle | str | None = None) -> builtins.list[dict[str, Any]]:
        """Each change of state or serving actor the pool saw, of one sandbox or of all, oldest
        first: ``{at (unix time), sandbox_id, state, actor, thread_id}`` (since the pool started)."""
        return self._retrying("history", None if handle_or_id is None else _id(handle_or_id))

    def shutdown(self) -> dict[str, int]:
        """Destroy every sandbox, end the pool actor. Idempotent."""
        if self._closed:
            return {}
        try:
            result = raycalls.value(self.pool.shutdown.remote())
        except ActorGone:
            result = {}
        raycalls.kill(self.pool)
        self._closed = True
        return result


class AsyncPoolClient:
    """``pool.aio``: the pool's calls, awaitable (no retry while the pool restarts; no shutdown)."""

    def __init__(self, client: PoolClient) -> None:
        self._client = client

    async def _call(self, method: str, *args: Any) -> Any:
        return await raycalls.call(self._client._method(method).remote(*args))

    async def acquire(self, thread_id: str | None = None, *, request_id: str | None = None,
                      snapshot: Snapshot | str | None = None, mounts: Iterable[MountLike] | None = None,
                      node_id: str | None = None) -> SandboxHandle:
        thread_id, request_id = _acquire_args(thread_id, request_id)
        host = host_dirs(mounts, node_id)
        known = self._client._known.get(thread_id)
        lease = await self._call("acquire", thread_id, request_id, _snap(snapshot), known and known[0], host)
        return SandboxHandle(self._client._known.complete(thread_id, lease, known), self._client)

    async def fork(self, snapshot: Snapshot | str, threads: Iterable[str]) -> AsyncIterator[SandboxHandle]:
        """See :meth:`PoolClient.fork`: each handle as it becomes ready."""
        threads = list(threads)
        for thread in threads:
            validate_thread_id(thread)
        for ready in asyncio.as_completed([self._call("acquire", t, None, _snap(snapshot)) for t in threads]):
            yield SandboxHandle(await ready, self._client)

    async def hibernate(self, handle_or_id: SandboxHandle | str, *, live: bool = False) -> bool:
        return await self._call("hibernate", _id(handle_or_id), live)

    async def snapshot(self, handle_or_id: SandboxHandle | str, name: str | None = None, *, live: bool = False
                       ) -> Snapshot:
        return Snapshot.from_record(await self._call("snapshot", _id(handle_or_id), name, live))

    async def snapshots(self) -> list[Snapshot]:
        return [Snapshot.from_record(r) for r in await self._call("snapshots")]

    async def remove_snapshot(self, snapshot: Snapshot | str) -> bool:
        return await self._call("remove_snapshot", _snap(snapshot))

    async def get(self, sandbox_id: str) -> SandboxHandle | None:
        lease = await self._call("get", sandbox_id)
        return None if lease is None else SandboxHandle(lease, self._client)

    async def release(self, handle_or_id: SandboxHandle | str) -> bool:
        return await self._call("release", _id(handle_or_id))

    async def destroy(self, handle_or_id: SandboxHandle | str) -> bool:
        return await self._call("destroy", _id(handle_or_id))

    async def sandbox_id(self, thread_id: str) -> str:
        validate_thread_id(thread_id)
        return await self._call("resolve", thread_id)

    async def list(self) -> builtins.list[dict[str, Any]]:
        return await self._call("list")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def reconcile(self) -> dict[str, int]:
        return await self._call("reconcile")

    async def history(self, handle_or_id: SandboxHandle | str | None = None) -> builtins.list[dict[str, Any]]:
        return await self._call("history", None if handle_or_id is None else _id(handle_or_id))


def connect(
    config: SandboxConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    address: str | None = None,
    pool_name: str | None = None,
    namespace: str | None = None,
) -> PoolClient:
    """Attach to Ray and get (or create) a pool.

    Args:
        config: a SandboxConfig, a mapping, a YAML path, or None. None attaches
            to the running pool (``pool_name`` in ``namespace``, defaults
            'sandbox-pool' in 'sandbox_actors') with that pool's own config,
            or creates one with defaults when none runs.
        address: Ray address; default RAY_ADDRESS, else this machine's cluster,
            else a new local Ray.
        pool_name, namespace: override the config's.

    Raises:
        ConfigError: bad config, a pool of that name already runs with a
            different config, or another running pool uses its base_dir.
        IsolationUnavailable, NotSupported: a node cannot isolate sandboxes as
            configured (the pool did not start and left nothing behind).
    """
    explicit = config is not None
    if not explicit:
        ensure_ray(address)
        attached = _ATTACHED.get((raycalls.session_name(), pool_name, namespace))
        # The same pool again in this process (e.g. one connect per task of a job): its client,
        # unless it was shut down since (then this connect is what brings the pool back).
        if attached is not None and not attached._closed and not PoolRecords.for_config(attached.config).was_shut_down():
            return attached
    cfg = load_config(config)
    overrides = {k: v for k, v in (("pool_name", pool_name), ("namespace", namespace)) if v is not None}
    if overrides:
        cfg = load_config({**cfg.model_dump(), **overrides})
    ensure_ray(address)
    PoolRecords.for_config(cfg).clear_shut_down()  # asking for the pool is asking for it to run again
    pool = pool_actor(cfg)
    running = raycalls.value(pool.config.remote())
    if running != cfg:
        if explicit:
            differs = sorted(k for k in SandboxConfig.model_fields if getattr(running, k) != getattr(cfg, k))
            raise ConfigError(
                f"pool {cfg.pool_name!r} already runs with a different config ({', '.join(differs)}); "
                "shut it down first (`sandbox-actors down`) or use another pool_name"
            )
        cfg = running
    client = PoolClient(cfg, pool)
    try:
        raycalls.value(pool.ping.remote())
    except (IsolationUnavailable, NotSupported, ConfigError):
        # The pool refused to start and removed what it had made; end it, so that fixing the
        # cause and connecting again starts afresh.
        raycalls.kill(pool)
        raise
    if not explicit:
        _ATTACHED[(raycalls.session_name(), pool_name, namespace)] = client
    return client


# A connect() without a config, per Ray cluster and (pool_name, namespace) as given: its client.
_ATTACHED: dict[tuple[str, str | None, str | None], PoolClient] = {}


__all__ = ["FILE_CHUNK", "AsyncPoolClient", "AsyncSandboxHandle", "BackgroundCommand", "PoolClient", "SandboxHandle",
           "connect", "ensure_ray", "pool_actor"]
