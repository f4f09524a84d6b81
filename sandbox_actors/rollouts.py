"""The agentic-RL rollout workload, as a Ray job runs it, and the same episodes with no Ray.

An episode starts a sandbox from a prepared environment (a snapshot), makes three tool calls
(writes a program, runs it, reads where it started from) and hands the sandbox to a scoring task,
which reads the answer and destroys the sandbox. ``examples/rollouts.py`` runs it as a job;
``sandbox-actors bench`` runs it beside :func:`floor`, the same episodes driven straight through
the engine from one process (the rate the machine allows without us).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

PREPARE = "mkdir -p /usr/local/share/rollout-env && echo prepared > /usr/local/share/rollout-env/ready"
ANSWER = "/tmp/answer.txt"


def commands(index: int) -> tuple[str, ...]:
    """The tool calls of episode ``index``."""
    return (
        f"printf 'n = {index} + 10\\nprint(sum(range(n)))\\n' > /tmp/task.py",
        f"python3 /tmp/task.py > {ANSWER}",
        "cat /usr/local/share/rollout-env/ready 2>/dev/null || echo cold",
    )


def expected(index: int) -> str:
    return str(sum(range(index + 10)))


def _tasks() -> tuple[Any, Any]:
    """The episode and its scorer as Ray tasks (made on first use: importing this module needs no Ray)."""
    import ray

    import sandbox_actors

    @ray.remote(num_cpus=0)
    def rollout(pool_name: str, namespace: str, index: int, snapshot: str | None) -> dict[str, Any]:
        """One episode: a sandbox of its own, three tool calls; returns its handle for the scorer."""
        pool = sandbox_actors.connect(pool_name=pool_name, namespace=namespace)
        started = time.perf_counter()
        box = pool.acquire(f"rollout-{index}", snapshot=snapshot)
        acquired = time.perf_counter() - started
        calls, result = [], None
        for command in commands(index):
            began = time.perf_counter()
            result = box.exec(command)
            calls.append(time.perf_counter() - began)
            if result.exit_code != 0:
                raise RuntimeError(f"rollout {index}: {command!r} exited {result.exit_code}: {result.output}")
        env = result.output.strip() if result is not None else ""
        return {"index": index, "box": box, "acquire_s": acquired, "exec_s": calls, "env": env}

    @ray.remote(num_cpus=0)
    def score(episode: dict[str, Any]) -> dict[str, Any]:
        """Check a rollout's answer in its sandbox (the handle came from another task), then end it."""
        box = episode.pop("box")
        answer = box.read_file(ANSWER).strip()
        box.destroy()
        return {**episode, "score": 1.0 if answer == expected(episode["index"]) else 0.0}

    return rollout, score


def run(pool_name: str, namespace: str, n: int, concurrency: int, snapshot: str | None,
        progress: Callable[[int], None] = lambda done: None) -> dict[str, Any]:
    """``n`` episodes as Ray tasks, ``concurrency`` at once, on the pool ``pool_name``; returns
    their rate and latencies (see :func:`summary`) with each episode's outcome under ``episodes``."""
    import ray

    rollout, score = _tasks()
    started = time.perf_counter()
    pending: list[Any] = []
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    next_index = 0
    while next_index < n or pending:
        while next_index < n and len(pending) < concurrency:
            pending.append(score.remote(rollout.remote(pool_name, namespace, next_index, snapshot)))
            next_index += 1
        done, pending = ray.wait(pending, num_returns=1)
        try:
            results.append(ray.get(done[0]))
        except ray.exceptions.RayTaskError as exc:  # counted and shown: the rate is of scored episodes
            failures.append(str(exc).splitlines()[0])
        progress(len(results) + len(failures))
    wall = time.perf_counter() - started
    return {**summary(n, concurrency, wall, results), "failures": failures, "episodes": results}


def settle(pool: Any, timeout: float = 120.0) -> bool:
    """Until ``pool`` (a PoolClient) keeps the spare actors it has learned to, none still starting:
    after a warm-up it tops them up (a worker process each, ~0.35 s of CPU), which a steady run
    should not measure. False when that did not happen within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.stats()
        if stats["spare_actors"] >= stats["spare_target"] and not stats["spares_starting"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def summary(n: int, concurrency: int, wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rate and latencies of a run of episodes (ms; rate per second of scored episodes)."""
    acquire = sorted(r["acquire_s"] for r in results if "acquire_s" in r)
    execs = sorted(s for r in results for s in r.get("exec_s", ()))
    return {
        "concurrency": concurrency, "n": n, "ok": sum(1 for r in results if r.get("score") == 1.0),
        "wall_s": round(wall, 3), "per_s": round(len(results) / wall, 3) if wall > 0 else 0.0,
        "acquire_p50": _ms(acquire, 0.5), "acquire_p95": _ms(acquire, 0.95), "exec_p50": _ms(execs, 0.5),
    }


def _ms(ordered: list[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2) if ordered else 0.0


class Floor:
    """The same episodes with no Ray and nothing of ours: from one process, each creates the
    container the pool (``config``) would, of the prepared image, through the engine, waits
    until it answers, makes the three calls, reads the answer and removes the container.
    Prepare once (:meth:`prepare`: the environment committed as an image, as a snapshot is),
    run as often as needed, :meth:`close` removes the image, containers and network."""

    def __init__(self, image: str, pool: str, config: Any) -> None:
        from .actorconfig import ActorConfig
        from .runtime import make_backend

        self._base, self._pool = image, pool
        self._config = ActorConfig.of(config.model_copy(update={"pool_name": pool, "container_prefix": pool}))
        self._backend: Any = make_backend(self._config)  # a DockerBackend: the engine's own floor
        self._loop = asyncio.new_event_loop()
        self.image: str | None = None

    def _spec(self, image: str) -> Any:
        from .runtime import container_spec

        sandbox_id = secrets.token_hex(12)
        return container_spec(self._config, sandbox_id, f"floor-{sandbox_id}", image)

    async def _up(self, spec: Any) -> Any:
        from backends import SandboxAPI

        record = await self._backend.create(spec)
        api = SandboxAPI(record.url, record.token)
        await api.wait_ready(60, lambda: self._backend.is_running(spec.sandbox_id),
                             lambda: self._backend.logs_tail(spec.sandbox_id), interval=0.01)
        return record, api

    def prepare(self) -> str:
        """The environment every episode starts from, committed as an image; returns its name."""
        async def body() -> str:
            spec = self._spec(self._base)
            record, api = await self._up(spec)
            try:
                await api.exec(PREPARE, timeout=60)
            finally:
                await api.aclose()
            image = f"sandbox-actors-rollout-floor:{secrets.token_hex(4)}"
            try:
                await self._backend.commit(spec.sandbox_id, record.container_id, image,
                                           {"sandbox-actors.pool": self._pool})
            finally:
                await self._backend.destroy(spec.sandbox_id)
            return image

        self.image = self._loop.run_until_complete(body())
        return self.image

    def run(self, n: int, concurrency: int) -> dict[str, Any]:
        """``n`` episodes, ``concurrency`` at once; the same figures as :func:`run`."""
        assert self.image is not None, "prepare() first"
        image = self.image

        async def episode(index: int) -> dict[str, Any]:
            spec = self._spec(image)
            started = time.perf_counter()
            try:
                record, api = await self._up(spec)
                acquired = time.perf_counter() - started
                calls = []
                try:
                    for command in commands(index):
                        began = time.perf_counter()
                        result = await api.exec(command, timeout=60)
                        calls.append(time.perf_counter() - began)
                    answer = (await api.read_bytes(ANSWER)).decode().strip()
                finally:
                    await api.aclose()
            finally:
                await self._backend.destroy(spec.sandbox_id)
            del record
            return {"index": index, "acquire_s": acquired, "exec_s": calls, "env": result.output.strip(),
                    "score": 1.0 if answer == expected(index) else 0.0}

        async def body() -> dict[str, Any]:
            gate = asyncio.Semaphore(concurrency)

            async def gated(index: int) -> dict[str, Any]:
                async with gate:
                    return await episode(index)

            started = time.perf_counter()
            done = await asyncio.gather(*(gated(i) for i in range(n)), return_exceptions=True)
            wall = time.perf_counter() - started
            results = [d for d in done if isinstance(d, dict)]
            failures = [repr(d) for d in done if isinstance(d, BaseException)]
            return {**summary(n, concurrency, wall, results), "failures": failures}

        return self._loop.run_until_complete(body())

    def close(self) -> None:
        """Remove what the floor made: its containers, its network, its image."""
        async def body() -> None:
            try:
                if not await self._backend.clear(self._pool):
                    print(f"warning: the engine keeps network {self._backend.network(self._pool).name} of the "
                          "rollout floor; restart dockerd, then `sandbox-actors gc`", file=sys.stderr, flush=True)
                if self.image is not None:
                    await self._backend.remove_image(self.image)
            finally:
                await self._backend.close()

        try:
            self._loop.run_until_complete(body())
        finally:
            self._loop.close()
