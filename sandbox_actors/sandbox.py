"""SandboxActor: the Ray actor that owns one sandbox's container.

Thin on purpose: it receives calls and hands them to a
:class:`~sandbox_actors.runtime.SandboxRuntime`. An actor can be started
ahead of need ("spare"): it has a name of its own and learns which sandbox it
serves from :meth:`start`, so the pool can hide actor start-up from a new
thread's first acquire. Its constructor never raises and never touches the
engine. When an operation finds the container dead, it tells the pool before
the caller hears of it, so the caller's next acquire gets a new sandbox.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from backends.base import Mount
from backends.sandbox_api import warm_http_stack

from . import api, checkpoints, raycalls
from .actorconfig import ActorConfig
from .errors import (
    ImageNotFound,
    InvalidRequest,
    SandboxDied,
    SandboxError,
    SandboxNotFound,
)
from .metrics import SandboxMetrics
from .procfs import process_start
from .raycalls import ActorGone
from .runtime import SandboxRuntime, make_backend

logger = logging.getLogger(__name__)


def _ray_without_pydantic() -> None:
    """In a SandboxActor's own process: let Ray's optional pydantic support find no pydantic.

    Ray imports pydantic in every worker the first time it deserializes arguments, only to
    register serializers for pydantic v1's ModelField. A SandboxActor gets no pydantic objects
    (its config is an :class:`ActorConfig`), and pydantic costs its process ~60 ms of CPU and
    ~6 MB of memory: a burst's new actors pay that each. Ray's module is loaded once with
    pydantic hidden and remembers that; pydantic itself stays importable for anyone who asks.
    Other processes (the pool, a user's task that imports this module) are left as they are.
    """
    if "pydantic" in sys.modules or os.path.basename(sys.argv[0]) != "default_worker.py":
        return
    import ray

    function = getattr(ray.get_runtime_context(), "get_task_function_name", lambda: None)()
    if function != f"{__name__}.SandboxActor.__init__":
        return
    sys.modules["pydantic"] = None  # type: ignore[assignment]  # (an import of it fails meanwhile)
    try:
        importlib.import_module("ray._common.pydantic_compat")
    except ImportError:  # a Ray without that module: it imports pydantic as it likes
        logger.debug("Ray's pydantic support is not where it was: left alone")
    finally:
        del sys.modules["pydantic"]


_ray_without_pydantic()

LABEL_RAY_NODE = "sandbox-actors.ray-node"
_REPORT_TIMEOUT = 5.0
_IMAGE_TIMEOUT = 600.0


def served(op: api.Operation[..., Any]) -> Callable[..., Any]:
    """An operation as a SandboxActor method: ``(sandbox_id, *its arguments)``, run by the runtime
    of that sandbox (refused when this actor does not serve it), a death told to the pool before
    the caller hears of it, its time counted in the metrics."""
    if op.stream:
        async def streamed(self: SandboxActor, sandbox_id: str, *args: Any) -> AsyncIterator[Any]:
            async for item in self._streamed(op.name, getattr(self._serving(sandbox_id), op.name)(*args)):
                yield item

        method: Callable[..., Any] = streamed
    else:
        async def answered(self: SandboxActor, sandbox_id: str, *args: Any) -> Any:
            started = time.monotonic()
            try:
                return await self._guard(getattr(self._serving(sandbox_id), op.name)(*args))
            finally:
                self._metrics.executed(op.name, time.monotonic() - started)

        method = answered
    method.__name__ = method.__qualname__ = op.name
    method.__doc__ = op.doc
    return method


class SandboxActor:
    """One sandbox. Created by the pool's fleet through :func:`sandbox_actors.spawn.sandbox_actor`."""

    def __init__(self, config: ActorConfig, name: str) -> None:
        self._config = config
        self._name = name
        self._node_id = raycalls.current_node_id()
        self._started = process_start(os.getpid())  # with the pid, tells this process from a later one
        self._resources = raycalls.assigned_resources()
        self._backend = make_backend(config, cluster=raycalls.session_name())  # connects on first use
        self._runtime: SandboxRuntime | None = None
        self._reported_dead = False
        self._fetched: dict[str, Any] | None = None  # a snapshot image this actor brought to its node
        self._metrics = SandboxMetrics(config.pool_name)
        self._usage_task: asyncio.Task[None] | None = None
        self.usage_looks, self.usage_cpu_seconds = 0, 0.0  # what the periodic looks cost this process

    async def ping(self) -> str:
        """Answers once the actor is scheduled and running; returns its node id."""
        return self._node_id

    async def warm_up(self) -> str:
        """Connect to the engine and look up the pool's image and network there, ahead of need (a
        spare does this while it waits); returns the engine id. When the image answers over TCP,
        also load httpx (its client there): on a unix socket the lean client needs no import."""
        engine = await self._backend.warm(self._config.pool_name, self._config.image)
        if await self._backend.reached_over_tcp(self._config.image):
            await warm_http_stack()
        return engine

    async def start(self, sandbox_id: str, thread_id: str | None, resume: bool = False, image: str | None = None,
                    image_from: str | None = None, container_id: str | None = None,
                    mounts: tuple[Mount, ...] = (), checkpoint: str | None = None,
                    restore_from: str | None = None) -> dict[str, Any]:
        """Serve ``sandbox_id``: adopt its running container, resume its stopped one (``resume``; by
        its ``container_id`` when the pool knows it), or create one (of ``image``, a snapshot's,
        when given; mounting ``mounts``, this node's directories, instead of the pool's thread
        directories when given), and wait until it answers. A snapshot image this node's engine
        lacks is fetched from the reaper named ``image_from`` (once per node). A resume with
        ``checkpoint`` brings the container's processes and memory back from that live checkpoint;
        a new container of a live snapshot's ``image`` goes on from the checkpoint in ``restore_from``.

        Idempotent for the same sandbox. Says what it found (``outcome``: created, adopted,
        resumed); when another live actor owns the container, serves nothing and answers
        ``outcome`` owned with that ``owner``'s name, for the pool to decide. Raises the start
        errors of a new container.
        """
        if self._runtime is None:
            self._runtime = SandboxRuntime(
                self._config,
                sandbox_id,
                thread_id,
                self._backend,
                extra_labels={LABEL_RAY_NODE: self._node_id},
                owner=self._name,
                owner_alive=lambda name: self._still_serves(name, sandbox_id),
                mounts=mounts,
            )
        elif self._runtime.sandbox_id != sandbox_id:
            raise InvalidRequest(f"actor {self._name} already serves sandbox {self._runtime.sandbox_id}")
        if restore_from and image_from and not os.path.isdir(restore_from):
            await self._fetch_checkpoint(restore_from, image_from)
        try:
            started = await self._runtime.start(resume=resume, image=image, container_id=container_id,
                                                checkpoint=checkpoint, restore_from=restore_from)
        except ImageNotFound:
            if image is None or image_from is None:
                raise
            await self._fetch_image(image, image_from)
            started = await self._runtime.start(resume=resume, image=image, restore_from=restore_from)
        if not started.get("started"):
            return started  # owned by another live actor: nothing served here
        self._watch_usage()
        return {**await self.describe(), "outcome": started.get("outcome"), "start_seconds": started.get("start_seconds")}

    async def _fetch_image(self, image: str, source_name: str) -> None:
        began = time.monotonic()
        source = await asyncio.to_thread(raycalls.get_actor, source_name, self._config.namespace)
        if source is None:
            raise ImageNotFound(f"image {image} is not on this node's engine, and the reaper of the node that has it "
                                f"({source_name}) is gone; take a new snapshot")
        archive = await raycalls.call(source.export_image.remote(image), _IMAGE_TIMEOUT, f"export {image}")
        await self._backend.import_image(archive)
        self._fetched = {**(self._fetched or {}), "image": image, "bytes": len(archive),
                         "seconds": round(time.monotonic() - began, 3)}
        logger.info("image %s fetched from another node's engine: %d bytes in %.1fs", image, len(archive),
                    time.monotonic() - began)

    async def _fetch_checkpoint(self, path: str, source_name: str) -> None:
        """Bring a live snapshot's checkpoint to ``path`` on this node from the reaper named
        ``source_name`` (on the node that took it). When it cannot be had, the fork starts with the
        snapshot's files only (logged by the runtime, which finds no checkpoint)."""
        began = time.monotonic()
        try:
            source = await asyncio.to_thread(raycalls.get_actor, source_name, self._config.namespace)
            if source is None:
                raise ActorGone(f"the reaper of the node that took it ({source_name}) is gone")
            archive = await raycalls.call(source.export_checkpoint.remote(os.path.basename(path)), _IMAGE_TIMEOUT,
                                          f"export checkpoint {path}")
            written = await asyncio.to_thread(checkpoints.unpack, archive, path)
        except (SandboxError, OSError) as exc:
            logger.warning("checkpoint %s could not be fetched from another node: %s", path,
                           getattr(exc, "message", None) or exc)
            return
        if written:
            logger.info("checkpoint %s fetched from another node: %d bytes in %.1fs", path, written,
                        time.monotonic() - began)
            self._fetched = {**(self._fetched or {}), "checkpoint": path, "checkpoint_bytes": written}

    def _watch_usage(self) -> None:
        """Look at the sandbox's use every ``usage_interval`` seconds for its metrics (once per
        sandbox served)."""
        if self._config.usage_interval > 0 and (self._usage_task is None or self._usage_task.done()):
            self._usage_task = asyncio.get_running_loop().create_task(self._look_at_usage(self._runtime_or_raise()))

    async def _look_at_usage(self, runtime: SandboxRuntime) -> None:
        try:
            while self._runtime is runtime and runtime.dead_reason is None:
                await asyncio.sleep(self._config.usage_interval)
                began = time.process_time()
                try:
                    used = await runtime.measure(disk=False)
                except SandboxDied:
                    return  # stopped, hibernated or dead: nothing to look at any more
                except SandboxError as exc:  # the engine busy: the next look tells
                    logger.debug("sandbox %s: no usage look (%s)", runtime.sandbox_id, exc.message)
                    continue
                self._metrics.used(runtime.thread_id, runtime.sandbox_id, used)
                self.usage_looks += 1
                self.usage_cpu_seconds += time.process_time() - began
        finally:
            self._metrics.used(runtime.thread_id, runtime.sandbox_id, None)

    def _stop_watching_usage(self) -> None:
        if self._usage_task is not None:
            self._usage_task.cancel()
            self._usage_task = None

    async def hibernate(self, live: bool = False) -> dict[str, Any]:
        """Stop the container, keeping its filesystem (with ``live``, its processes and memory
        too, in a checkpoint); the pool then ends this actor."""
        return await self._runtime_or_raise().hibernate(live)

    async def snapshot(self, image: str, labels: Mapping[str, str], keep_checkpoint_in: str | None = None
                       ) -> dict[str, Any]:
        """Save the container's filesystem as ``image`` (a snapshot); returns its id and size.
        With ``keep_checkpoint_in``, its processes and memory too (a live snapshot)."""
        return await self._guard(self._runtime_or_raise().snapshot(image, labels, keep_checkpoint_in))

    async def claim(self, thread_id: str) -> dict[str, Any]:
        """Hand this pre-warmed sandbox to ``thread_id``."""
        await self._runtime_or_raise().claim(thread_id)
        return await self.describe()

    async def describe(self) -> dict[str, Any]:
        base = {"actor_name": self._name, "node_id": self._node_id, "pid": os.getpid(), "pid_started": self._started,
                "resources": self._resources,
                "image_fetched": self._fetched,
                "usage_looks": {"count": self.usage_looks, "cpu_seconds": round(self.usage_cpu_seconds, 6)}}
        if self._runtime is None:
            return {**base, "sandbox_id": None, "started": False}
        return {**self._runtime.describe(), **base}

    async def activity(self) -> tuple[float, int, str | None]:
        """(seconds since the last operation, operations in flight, why it is dead or None)."""
        runtime = self._runtime_or_raise()
        return runtime.idle_for(), runtime.inflight, runtime.dead_reason

    async def watched(self, seconds: float) -> None:
        """Returns after ``seconds``. The pool keeps one such call outstanding on every actor that
        serves a sandbox: Ray fails it the moment this actor's process dies, so the pool hears of
        the death then, not at its next reconcile pass."""
        await asyncio.sleep(seconds)

    async def alive(self) -> bool:
        """A cheap check that the sandbox can serve (the pool asks before reclaiming a warm one)."""
        return self._runtime is not None and await self._runtime.alive()

    async def record_egress(self, sandbox_id: str, entry: dict[str, Any]) -> None:
        """An egress attempt of its sandbox, from the node's egress proxy, into the audit trail it
        keeps (a sandbox whose trail has no file: an anonymous one). Dropped when this actor
        serves another sandbox by now."""
        runtime = self._runtime
        if runtime is not None and runtime.sandbox_id == sandbox_id:
            runtime.audit_log.add(entry, command=False)

    async def begin_stop(self, if_idle_for: float) -> bool:
        """Stop serving if idle that long with nothing in flight; False: busy. The pool then
        calls :meth:`stop` or :meth:`cancel_stop`."""
        return self._runtime is None or await self._runtime.begin_stop(if_idle_for)

    async def cancel_stop(self) -> None:
        if self._runtime is not None:
            self._runtime.cancel_stop()

    async def stop(self, sandbox_id: str | None = None, recycle: bool = False) -> bool | None:
        """Remove the container (of ``sandbox_id``, when given). The pool then ends the actor, or,
        with ``recycle``, keeps it as a spare for another sandbox: its process, engine connection
        and loaded modules are reused, nothing of the removed sandbox is kept, and calls naming the
        removed sandbox are refused from now on.

        Returns True (removed, or it served nothing), or None: it serves another sandbox now
        (``sandbox_id``'s container went when it was kept for that one); nothing was done, and the
        actor must not be ended.

        Raises:
            BackendUnavailable: the engine did not answer; nothing was removed.
        """
        runtime = self._runtime
        if runtime is None:
            return True
        if sandbox_id is not None and runtime.sandbox_id != sandbox_id:
            return None
        self._stop_watching_usage()
        await runtime.stop()
        if recycle:
            self._runtime, self._reported_dead, self._fetched = None, False, None
            logger.info("actor %s: sandbox %s removed; waiting for another", self._name, runtime.sandbox_id)
        else:
            await runtime.close()
        return True

    def _runtime_or_raise(self) -> SandboxRuntime:
        if self._runtime is None:
            raise SandboxNotFound(f"actor {self._name} serves no sandbox yet")
        return self._runtime

    def _serving(self, sandbox_id: str) -> SandboxRuntime:
        """The runtime of ``sandbox_id``, which a caller names: an actor serves one sandbox at a
        time but may serve another after it (see :meth:`stop`), and a handle kept from before must
        never reach the new one.

        Raises:
            SandboxDied: this actor does not serve ``sandbox_id`` (it was destroyed).
        """
        runtime = self._runtime
        if runtime is None or runtime.sandbox_id != sandbox_id:
            raise SandboxDied(f"sandbox {sandbox_id} is gone (destroyed); acquire the thread again")
        return runtime

    async def _still_serves(self, name: str, sandbox_id: str) -> bool:
        """Whether the actor ``name`` (named in a container of ``sandbox_id`` as its maker or owner)
        lives and still serves that sandbox: an actor whose sandbox was destroyed may have been
        kept for another since, and owns nothing of the old one."""
        handle = await asyncio.to_thread(raycalls.get_actor, name, self._config.namespace)
        if handle is None:
            return False
        try:
            info = await raycalls.call(handle.describe.remote(), _REPORT_TIMEOUT, f"describe {name}")
        except SandboxError:
            return False
        return bool(info.get("sandbox_id") == sandbox_id)

    # ── operations: one line each, derived from their declaration (sandbox_actors.api) ──

    exec = served(api.exec)
    bash = served(api.bash)
    stream = served(api.stream)
    bash_stream = served(api.bash_stream)
    start_command = served(api.start_command)
    view_command = served(api.view_command)
    wait_command = served(api.wait_command)
    kill_command = served(api.kill_command)
    upload_chunk = served(api.upload_chunk)
    download_chunk = served(api.download_chunk)
    read_file = served(api.read_file)
    read_bytes = served(api.read_bytes)
    write_file = served(api.write_file)
    list_files = served(api.list_files)
    usage = served(api.usage)
    audit = served(api.audit)
    expose = served(api.expose)
    unexpose = served(api.unexpose)
    pty_open = served(api.pty_open)
    pty_write = served(api.pty_write)
    pty_resize = served(api.pty_resize)
    pty_output = served(api.pty_output)
    pty_close = served(api.pty_close)

    async def _streamed(self, op: str, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        started, runtime = time.monotonic(), self._runtime
        try:
            async for item in items:
                yield item
        except SandboxDied:
            if runtime is not None and runtime is self._runtime:  # as in :meth:`_guard`
                await self._tell_pool_of_death()
            raise
        finally:
            await items.aclose()  # type: ignore[attr-defined]  # an early end hangs up: the command is killed
            self._metrics.executed(op, time.monotonic() - started)

    async def _guard(self, operation: Any) -> Any:
        runtime = self._runtime  # the sandbox ``operation`` is for (this actor may serve another after it)
        try:
            return await operation
        except SandboxDied:
            if runtime is not None and runtime is self._runtime:  # not a sandbox stopped on purpose meanwhile
                await self._tell_pool_of_death()
            raise

    async def _tell_pool_of_death(self) -> None:
        # Before the caller hears of it, so the caller's next acquire already finds the
        # repair under way (and gets a new sandbox).
        if not self._reported_dead:
            self._reported_dead = True
            await self._report_dead()

    async def _report_dead(self) -> None:
        config, sandbox_id = self._config, self._runtime_or_raise().sandbox_id
        pool = await asyncio.to_thread(raycalls.get_actor, config.pool_name, config.namespace)
        if pool is None:
            logger.warning("sandbox %s died and pool %s is not running to hear of it", sandbox_id, config.pool_name)
            return
        container_id = self._runtime_or_raise().describe().get("container_id")
        try:
            await raycalls.call(pool.report_dead.remote(sandbox_id, container_id), _REPORT_TIMEOUT,
                                "report a dead sandbox")
        except SandboxError as exc:
            logger.warning("sandbox %s died; could not tell pool %s: %s", sandbox_id, config.pool_name, exc)
