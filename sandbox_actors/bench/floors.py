"""What the machine does without us: bare container starts through the engine, no Ray; and
Ray's own cost (trivial actors), which a sandbox's actor cannot go below."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class FloorEngine:
    """Bare container starts through the engine, no Ray: create + start + readiness (polled from
    10 ms on). Given the pool's ``config``, each container is the one that pool would create
    (its image, network policy, limits, user, and a new thread's directories mounted), under a
    pool name of the floor's own; else the image on an isolated network of its own (or none,
    under ``runtime``). Engine calls are shielded and kept: an interrupt cancels the caller,
    never the call in the engine's thread, and :meth:`close` waits for every one before it removes
    what exists (a create it missed, or a removal half done, would keep the network)."""

    def __init__(self, image: str, pool: str, runtime: str | None = None, config: Any = None) -> None:
        from backends import DockerBackend
        from backends.firewall import NetworkPolicy
        from sandbox_actors.actorconfig import ActorConfig
        from sandbox_actors.runtime import make_backend

        self._image, self._pool, self._runtime = image, pool, runtime
        self._loop = asyncio.new_event_loop()
        self._config = None if config is None else ActorConfig.of(config.model_copy(
            update={"pool_name": pool, "container_prefix": pool, "image": image, "runtime": runtime or config.runtime}))
        self._backend: Any = (make_backend(self._config) if self._config is not None  # a DockerBackend
                              else DockerBackend(pool, policy=NetworkPolicy(egress="none") if runtime else None))
        self._calls: set[asyncio.Future[Any]] = set()

    def _spec(self) -> Any:
        from backends import Limits, SandboxSpec
        from sandbox_actors.runtime import container_spec

        sandbox_id = secrets.token_hex(12)
        if self._config is not None:
            return container_spec(self._config, sandbox_id, f"floor-{sandbox_id}")
        return SandboxSpec(sandbox_id=sandbox_id, pool=self._pool, image=self._image,
                           token=secrets.token_urlsafe(16), limits=Limits(), runtime=self._runtime)

    async def _engine(self, call: Awaitable[T]) -> T:
        task = asyncio.ensure_future(call)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return await asyncio.shield(task)

    async def _start(self, spec: Any, first_command: bool = False) -> float:
        """One container up and answering; with ``first_command``, also ``true`` run in it (what
        each thread of a burst does). Seconds."""
        from backends import SandboxAPI

        backend = self._backend
        started = time.perf_counter()
        record = await self._engine(backend.create(spec))
        api = SandboxAPI(record.url, record.token)
        try:
            await api.wait_ready(60, lambda: backend.is_running(spec.sandbox_id),
                                 lambda: backend.logs_tail(spec.sandbox_id), interval=0.01)
            if first_command:
                await api.exec("true", timeout=60)
        finally:
            await api.aclose()
        return time.perf_counter() - started

    def _run(self, work: Awaitable[T]) -> T:
        """Run ``work`` on this floor's loop; an interrupt cancels it (as ``asyncio.run`` does), so
        its ``finally`` clauses run, and is raised again."""
        task = asyncio.ensure_future(work, loop=self._loop)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            task.cancel()
            self._loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            raise

    def single(self) -> float:
        """One start, then its removal (not timed). Seconds."""
        spec = self._spec()

        async def body() -> float:
            try:
                return await self._start(spec)
            finally:
                # After an interrupt the create may still run in its thread: a container removed
                # while the engine starts it can leave its endpoint on the network for good.
                await asyncio.gather(*self._calls, return_exceptions=True)
                await self._engine(self._backend.destroy(spec.sandbox_id))

        return self._run(body())

    def burst(self, n: int) -> tuple[int, float]:
        """``n`` starts at once, each running ``true``, then their removal (not timed). Returns
        (how many succeeded, wall seconds)."""
        specs = [self._spec() for _ in range(n)]

        async def body() -> tuple[int, float]:
            started = time.perf_counter()
            done = await asyncio.gather(*(self._start(s, first_command=True) for s in specs), return_exceptions=True)
            wall = time.perf_counter() - started
            await asyncio.gather(*(self._engine(self._backend.destroy(s.sandbox_id)) for s in specs))
            return sum(1 for d in done if not isinstance(d, BaseException)), wall

        return self._run(body())

    def close(self) -> None:
        """Remove every container and the network of this floor (also after an interrupt)."""
        backend = self._backend

        async def body() -> None:
            try:
                await asyncio.gather(*self._calls, return_exceptions=True)
                if not await backend.clear(self._pool):
                    name = backend.network(self._pool).name
                    print(f"  warning: the engine keeps network {name} of the floor (its endpoints dropped); restart "
                          f"dockerd, then `docker network rm {name}` and `sandbox-actors gc` (README, Troubleshooting)",
                          file=sys.stderr, flush=True)
            finally:
                await backend.close()

        try:
            self._run(body())
        finally:
            try:
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
            finally:
                self._loop.close()


def trivial_actor() -> Any:
    """A remote class that imports nothing of ours (defined here, it travels by value)."""
    import ray

    @ray.remote(num_cpus=0)
    class Trivial:
        def ping(self) -> int:
            import os

            return os.getpid()

    return Trivial


def ray_exec_actor() -> Any:
    """A remote async class that does what a SandboxActor's ``exec`` does at its core, and nothing
    else: the command it is given run over the sandbox's API (the same client), its ShellResult
    returned. Ray's own share of an exec through an actor (``exec_ray_alone``)."""
    import ray

    @ray.remote(num_cpus=0)
    class Exec:
        def __init__(self, url: str, token: str) -> None:
            from backends import SandboxAPI

            self.api = SandboxAPI(url, token)

        async def exec(self, command: str) -> Any:
            return await self.api.exec(command, timeout=60)

        async def close(self) -> None:
            await self.api.aclose()

    return Exec


def wait_gone(pids: set[int], timeout: float = 30.0) -> bool:
    """Until the processes have exited (a killed actor's worker takes a moment); whether they did."""
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def cpu_ms_per_s(pids: list[int], seconds: float = 5.0) -> dict[int, float]:
    """The CPU each process uses over the same ``seconds``, in ms per second."""
    import psutil

    procs = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(seconds)
    return {p.pid: round((sum(p.cpu_times()[:2]) - b) / seconds * 1000, 2) for p, b in zip(procs, before)}


def ray_processes() -> set[int]:
    """The pids of this process's descendants (a private Ray cluster's, once started)."""
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}
