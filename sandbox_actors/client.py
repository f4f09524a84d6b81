"""The client API: connect to a pool, acquire sandboxes, use them.

    import sandbox_actors
    pool = sandbox_actors.connect()            # attaches to Ray (or starts it)
    box = pool.acquire("thread-1")             # same sandbox from any process
    print(box.exec("echo hi").output)
    pool.release(box)

Every method is synchronous; in async code use ``pool.aio`` and ``box.aio``
(the same methods, awaitable, except ``shutdown``; they do not retry while a
pool restarts), or call the actor directly: ``await box.actor.exec.remote("ls")``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import ray
import ray.exceptions

from . import actors
from .config import SandboxConfig, load_config
from .errors import ConfigError, IsolationUnavailable, NotSupported, PoolShutDown, PoolUnavailable, SandboxDied
from .pool import Lease
from .threads import validate_thread_id

logger = logging.getLogger(__name__)

_POOL_RETRY_SECONDS = 60.0


def ensure_ray(address: str | None = None) -> None:
    """Attach to Ray: an initialized session as is, else ``address`` or RAY_ADDRESS, else the
    cluster ``sandbox-actors up`` started or this machine runs, else a new local one (which ends
    with this process)."""
    from .localray import attach

    attach(address, fallback="local")


def _value(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise actors.unwrap(exc) from None


async def _avalue(ref: Any) -> Any:
    try:
        return await ref
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise actors.unwrap(exc) from None


class _Aio:
    """``obj.aio.method(...)`` awaits what ``obj.method(...)`` returns synchronously."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # incl. pickle's probes before __dict__ is restored
            raise AttributeError(name)
        make_ref = getattr(self._owner, f"_ref_{name}", None)
        if make_ref is None:
            raise AttributeError(name)
        finish = getattr(self._owner, f"_finish_{name}", lambda value: value)

        async def method(*args: Any, **kwargs: Any) -> Any:
            return finish(await self._owner._await(make_ref(*args, **kwargs)))

        return method


class SandboxHandle:
    """One acquired sandbox. Operations go straight to its SandboxActor.

    Attributes:
        sandbox_id: the sandbox's id (same for a thread in every process).
        thread_id: the thread it serves (None when anonymous).
        actor: the SandboxActor handle, for ``actor.exec.remote(...)`` style calls.
        path: how the acquire got it: 'hot', 'warm', 'prewarmed', 'cold' or 'adopted'.
    """

    def __init__(self, lease: Lease, pool: PoolClient | None = None) -> None:
        self.sandbox_id = lease.sandbox_id
        self.thread_id = lease.thread_id
        self.actor = lease.actor
        self.path = lease.path
        self.info = lease.info
        self._pool = pool
        self.aio = _Aio(self)

    def __repr__(self) -> str:
        return f"SandboxHandle(sandbox_id={self.sandbox_id!r}, thread_id={self.thread_id!r}, path={self.path!r})"

    # Each operation is a ref builder; the sync method and ``aio`` share it.
    def _ref_exec(self, command: str, timeout: float | None = None, exec_dir: str | None = None) -> Any:
        return self.actor.exec.remote(command, timeout, exec_dir)

    def _ref_bash(
        self, command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> Any:
        return self.actor.bash.remote(command, dict(env) if env else None, timeout, exec_dir)

    def _ref_read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> Any:
        return self.actor.read_file.remote(path, start_line, end_line)

    def _ref_read_bytes(self, path: str) -> Any:
        return self.actor.read_bytes.remote(path)

    def _ref_write_file(self, path: str, content: str | bytes, append: bool = False) -> Any:
        return self.actor.write_file.remote(path, content, append)

    def _ref_list_files(self, path: str, recursive: bool = False, show_hidden: bool = False) -> Any:
        return self.actor.list_files.remote(path, recursive, show_hidden)

    def exec(self, command: str, timeout: float | None = None, exec_dir: str | None = None) -> Any:
        """Run ``command`` in the persistent shell. Returns a ShellResult (output, exit_code).

        Raises:
            CommandTimeout: it ran past ``timeout`` (default: config exec_timeout) and was killed.
            SandboxDied: the sandbox is gone; acquire the thread again.
            BackendUnavailable: the engine did not answer (nothing was destroyed).
        """
        return self._wait(self._ref_exec(command, timeout, exec_dir))

    def bash(
        self, command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> Any:
        """Run ``command`` in a fresh session with extra ``env``. Returns a BashResult (stdout, stderr, exit_code)."""
        return self._wait(self._ref_bash(command, env, timeout, exec_dir))

    def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        """A text file's content (invalid UTF-8 replaced). Raises SandboxFileNotFound."""
        return self._wait(self._ref_read_file(path, start_line, end_line))

    def read_bytes(self, path: str) -> bytes:
        """A file's exact bytes."""
        return self._wait(self._ref_read_bytes(path))

    def write_file(self, path: str, content: str | bytes, append: bool = False) -> int:
        """Write text or bytes (parents created). Returns bytes written."""
        return self._wait(self._ref_write_file(path, content, append))

    def list_files(self, path: str, recursive: bool = False, show_hidden: bool = False) -> list[Any]:
        """Entries of a directory as FileInfo (name, path, is_directory, size)."""
        return self._wait(self._ref_list_files(path, recursive, show_hidden))

    def _ref_release(self) -> Any:
        return self._require_pool()._ref_release(self)

    def _ref_destroy(self) -> Any:
        return self._require_pool()._ref_destroy(self)

    def release(self) -> bool:
        """Give the sandbox back to the pool's warm pool."""
        return self._require_pool().release(self)

    def destroy(self) -> bool:
        """Destroy the sandbox (container and actor)."""
        return self._require_pool().destroy(self)

    def _require_pool(self) -> PoolClient:
        if self._pool is None:
            raise PoolUnavailable("this handle was not obtained through a PoolClient")
        return self._pool

    def _died(self, exc: BaseException) -> BaseException:
        if isinstance(exc, actors.ActorGone):
            if self._pool is not None:
                self._pool._report_dead(self.sandbox_id)
            died = SandboxDied(f"sandbox {self.sandbox_id}'s actor is gone; acquire the thread again")
            died.__cause__ = exc
            return died
        return exc

    def _wait(self, ref: Any) -> Any:
        try:
            return _value(ref)
        except actors.ActorGone as exc:
            raise self._died(exc) from None

    async def _await(self, ref: Any) -> Any:
        try:
            return await _avalue(ref)
        except actors.ActorGone as exc:
            raise self._died(exc) from None


class PoolClient:
    """A connection to one SandboxPool. Safe to use from many threads; cheap to create.

    Pool calls survive a pool restart: a call that meets a restarting or dead
    pool is retried (a dead pool is re-created) for up to 60 s. A pool shut
    down on purpose (``shutdown()``, ``sandbox-actors down``) stays down: calls
    raise PoolShutDown until someone calls ``connect()`` again.
    """

    def __init__(self, config: SandboxConfig, pool: Any) -> None:
        self.config = config
        self.pool = pool
        self._closed = False
        self.aio = _Aio(self)

    # ── plumbing ───────────────────────────────────────────────────────────

    def _method_ref(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise PoolShutDown(f"pool {self.config.pool_name} was shut down by this client; connect again")
        return getattr(self.pool, method).remote(*args)

    def _retrying(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + _POOL_RETRY_SECONDS
        while True:
            try:
                return _value(self._method_ref(method, *args))
            except actors.ActorGone as exc:
                if actors.was_shut_down(self.config):
                    raise PoolShutDown(
                        f"pool {self.config.pool_name} was shut down (by `sandbox-actors down` or a shutdown() "
                        "call); connect() again to start a new one"
                    ) from exc
                if time.monotonic() > deadline:
                    raise PoolUnavailable(f"pool {self.config.pool_name} unreachable for {_POOL_RETRY_SECONDS:.0f}s") from exc
                logger.info("pool %s is gone or restarting; reconnecting", self.config.pool_name)
                time.sleep(0.5)
                self.pool = actors.pool_actor(self.config)

    async def _await(self, ref: Any) -> Any:
        return await _avalue(ref)

    def _report_dead(self, sandbox_id: str) -> None:
        if not self._closed:
            self.pool.report_dead.remote(sandbox_id)

    def _id(self, handle_or_id: SandboxHandle | str) -> str:
        return handle_or_id.sandbox_id if isinstance(handle_or_id, SandboxHandle) else handle_or_id

    # ── API ────────────────────────────────────────────────────────────────

    def sandbox_id(self, thread_id: str) -> str:
        """The sandbox id of ``thread_id`` in this pool: the one it holds, else the one it would get."""
        validate_thread_id(thread_id)
        return self._retrying("resolve", thread_id)

    def _ref_acquire(self, thread_id: str | None = None) -> Any:
        return self._method_ref("acquire", thread_id)

    def _finish_acquire(self, lease: Lease) -> SandboxHandle:
        return SandboxHandle(lease, self)

    def acquire(self, thread_id: str | None = None) -> SandboxHandle:
        """The thread's sandbox (None: a new anonymous one). Same sandbox from every process.

        Raises:
            InvalidThreadId: empty, too long or non-text thread id.
            PoolExhausted: no capacity within ``capacity_timeout`` (retryable).
            ImageNotFound, ReadinessTimeout, SandboxStartError: a new sandbox could not start.
        """
        if thread_id is not None:
            validate_thread_id(thread_id)  # here, before a round trip
        return self._finish_acquire(self._retrying("acquire", thread_id))

    def _ref_get(self, sandbox_id: str) -> Any:
        return self._method_ref("get", sandbox_id)

    def _finish_get(self, lease: Lease | None) -> SandboxHandle | None:
        return None if lease is None else SandboxHandle(lease, self)

    def get(self, sandbox_id: str) -> SandboxHandle | None:
        """The handle of an active sandbox, else None."""
        return self._finish_get(self._retrying("get", sandbox_id))

    def _ref_release(self, handle_or_id: SandboxHandle | str) -> Any:
        return self._method_ref("release", self._id(handle_or_id))

    def release(self, handle_or_id: SandboxHandle | str) -> bool:
        """Park the sandbox warm (container keeps running). False if it was not active."""
        return self._retrying("release", self._id(handle_or_id))

    def _ref_destroy(self, handle_or_id: SandboxHandle | str) -> Any:
        return self._method_ref("destroy", self._id(handle_or_id))

    def destroy(self, handle_or_id: SandboxHandle | str) -> bool:
        """Stop and remove the sandbox, active or warm. Idempotent (False: nothing to destroy)."""
        return self._retrying("destroy", self._id(handle_or_id))

    def destroy_thread(self, thread_id: str) -> bool:
        """Destroy the sandbox of ``thread_id``."""
        return self.destroy(self.sandbox_id(thread_id))

    def _ref_sandbox_id(self, thread_id: str) -> Any:
        validate_thread_id(thread_id)
        return self._method_ref("resolve", thread_id)

    def _ref_list(self) -> Any:
        return self._method_ref("list")

    def _ref_stats(self) -> Any:
        return self._method_ref("stats")

    def _ref_reconcile(self) -> Any:
        return self._method_ref("reconcile")

    def list(self) -> list[dict[str, Any]]:
        """Every sandbox of the pool (id, thread, state, node, age, idle, in-flight)."""
        return self._retrying("list")

    def stats(self) -> dict[str, Any]:
        """Totals per state and event counters."""
        return self._retrying("stats")

    def reconcile(self) -> dict[str, int]:
        """Run a reconcile pass now (adopt, re-adopt, remove orphans); returns counts."""
        return self._retrying("reconcile")

    def shutdown(self) -> dict[str, int]:
        """Destroy every sandbox, end the pool actor. Idempotent."""
        if self._closed:
            return {}
        try:
            result = _value(self.pool.shutdown.remote())
        except actors.ActorGone:
            result = {}
        actors.kill(self.pool)
        self._closed = True
        return result


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
        ConfigError: bad config, or a pool of that name already runs with a
            different config.
    """
    explicit = config is not None
    cfg = load_config(config)
    overrides = {k: v for k, v in (("pool_name", pool_name), ("namespace", namespace)) if v is not None}
    if overrides:
        cfg = load_config({**cfg.model_dump(), **overrides})
    ensure_ray(address)
    actors.clear_shut_down(cfg)  # asking for the pool is asking for it to run again
    pool = actors.pool_actor(cfg)
    running = _value(pool.config.remote())
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
        _value(pool.ping.remote())
    except (IsolationUnavailable, NotSupported):
        # The pool refused to start (a node cannot isolate sandboxes as configured) and removed
        # what it had made; end it so that fixing the cause and connecting again starts afresh.
        actors.kill(pool)
        raise
    return client
