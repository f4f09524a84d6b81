"""``sandbox-actors bench``: how fast a thread gets a working sandbox, against the physical floor.

Runs on a private local Ray cluster, the local Docker engine and the minimal
image. Every figure is a distribution (p50/p95/max in ms) and times are also
shown as a ratio to the floor, a bare container start plus readiness driven
straight through the engine, since absolute times vary from run to run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .console import run_all
from .errors import SandboxError
from .demo import summarize

_CROSS_PROCESS = """
import json, sys, time, ray, sandbox_actors
ray.init(address=sys.argv[1], logging_level="ERROR")
pool = sandbox_actors.connect(pool_name=sys.argv[2], namespace=sys.argv[3])
pool.acquire(sys.argv[4])  # connected and warmed up: what follows is the steady state
samples = []
for _ in range(int(sys.argv[5])):
    started = time.perf_counter()
    pool.acquire(sys.argv[4])
    samples.append(time.perf_counter() - started)
print(json.dumps(samples))
"""

T = TypeVar("T")


class Bench:
    """One benchmark run; :meth:`run` returns the JSON-able results."""

    def __init__(
        self, samples: int, burst: int, out: Callable[[str], None] = print, scale: int = 0, rounds: int = 3,
        runtime: str | None = None,
    ) -> None:
        self.n = samples
        self.burst_n = burst
        self.rounds = rounds
        self.scale = scale
        self.runtime = runtime
        self.out = out
        self.results: dict[str, Any] = {}
        self._floor: FloorEngine | None = None  # bare starts measured beside the pool's figures

    def say(self, text: str) -> None:
        self.out(f"  {text}")

    # ── the floor: no Ray ─────────────────────────────────────────────────

    def floor(self, image: str, pool: str, runtime: str | None = None) -> None:
        """Bare starts on the same isolated network (or none) the pool's sandboxes get; with
        ``runtime``, only the single starts, under that runtime (row ``floor_<runtime>``)."""
        engine = FloorEngine(image, pool, runtime)
        try:
            engine.single()  # the engine client's own start-up is not the floor
            samples = [engine.single() for _ in range(self.n)]
            self.results[f"floor_{runtime}" if runtime else "floor"] = summarize(samples)
            if runtime:
                return
            rounds = []
            for _ in range(self.rounds):
                rounds.append(engine.burst(self.burst_n))
                self.say(f"burst round {len(rounds)}/{self.rounds}: {rounds[-1][0]}/{self.burst_n} ok "
                         f"in {rounds[-1][1]:.2f}s")
            self.results["floor_burst"] = self._burst_row(rounds)
        finally:
            engine.close()

    def _beside(self, pool: Any, measure: Callable[[], Any], floor: Callable[[], Any], first: bool,
                actors: int | None = None) -> Any:
        """``measure`` and a floor measurement right beside it (``floor`` first when ``first``),
        so that both see the machine as it is then: this machine's speed drifts by 10-20% over a
        run, more than the targets' margins. The floor waits, as ``measure`` does, for the pool's
        spare actors (``actors``, else the config's) to be there and none still starting. Returns
        what ``measure`` returns."""
        def quiet_floor() -> None:
            if self._floor is not None:
                self._wait_spares(pool, actors=pool.config.spare_actors if actors is None else actors, timeout=600)
                floor()

        if first:
            quiet_floor()
        value = measure()
        if not first:
            quiet_floor()
        return value

    def _floor_single(self, into: list[float]) -> None:
        assert self._floor is not None
        into.append(self._floor.single())

    def _floor_round(self, into: list[float]) -> None:
        assert self._floor is not None
        into.append(self._floor.burst(self.burst_n)[1])

    # ── through the pool ──────────────────────────────────────────────────

    def _wait_spares(self, pool: Any, actors: int = 0, sandboxes: int = 0, timeout: float = 120.0) -> None:
        """Until the pool has its spares (and none is still starting: a new worker process costs
        ~0.3 s of CPU, which would slow what is measured next); after ``timeout``, says so and
        lets the measurement go on."""
        deadline = time.monotonic() + timeout
        while True:
            stats = pool.stats()
            if (stats["spare_actors"] >= actors and stats["states"]["spare"] >= sandboxes
                    and not stats.get("spares_starting")):
                return
            if time.monotonic() >= deadline:
                self.say(f"note: after {timeout:.0f}s the pool has {stats['spare_actors']}/{actors} spare actors, "
                         f"{stats['states']['spare']}/{sandboxes} spare sandboxes, {stats.get('spares_starting', 0)} "
                         "starting; measuring anyway (the next figure may be slower)")
                return
            time.sleep(0.05)

    def _timed(self, call: Callable[[], Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        value = call()
        return value, time.perf_counter() - started

    def cold(self, pool: Any, key: str = "cold", beside: bool = True) -> None:
        """New threads one at a time, each after the spare actors are back; with ``beside``, a
        bare start alternately before and after each (``floor_beside``)."""
        cold: list[float] = []
        floors: list[float] = []

        def one(i: int) -> None:
            self._wait_spares(pool, actors=pool.config.spare_actors)
            box, seconds = self._timed(lambda: pool.acquire(f"cold-{i}"))
            assert box.path == "cold", box.path
            cold.append(seconds)
            pool.destroy(box)

        for i in range(self.n):
            if beside:
                self._beside(pool, lambda: one(i), lambda: self._floor_single(floors), first=i % 2 == 0)
            else:
                one(i)
        self.results[key] = {**summarize(cold), **self._floor_figure(floors)}

    @staticmethod
    def _floor_figure(floors: list[float]) -> dict[str, Any]:
        return {"floor_beside": summarize(floors)["p50"]} if floors else {}

    def under_runtime(self, pool: Any) -> None:
        """Cold start and exec of sandboxes under ``self.runtime`` (rows suffixed with its name)."""
        self.cold(pool, f"cold_{self.runtime}", beside=False)  # its floor: floor_<runtime>
        self._exec(pool.acquire("steady"), f"_{self.runtime}")

    def paths(self, pool: Any, address: str) -> None:
        config = pool.config
        self.cold(pool)

        box = pool.acquire("steady")
        self._wait_spares(pool, actors=config.spare_actors)  # measure the steady state, not a refill
        hot = [self._timed(lambda: pool.acquire("steady"))[1] for _ in range(self.n * 5)]
        warm = []
        for _ in range(self.n * 3):
            pool.release(box)
            box, seconds = self._timed(lambda: pool.acquire("steady"))
            warm.append(seconds)
        self.results["hot"], self.results["warm"] = summarize(hot), summarize(warm)

        child = subprocess.run(
            [sys.executable, "-c", _CROSS_PROCESS, address, config.pool_name, config.namespace, "steady",
             str(self.n * 5)],
            capture_output=True, text=True, timeout=300, check=True,
        )
        self.results["cross_process"] = summarize(json.loads(child.stdout.strip().splitlines()[-1]))
        self._exec(box)

    def _exec(self, box: Any, suffix: str = "") -> None:
        """``true`` through the SandboxActor and straight over HTTP to the same container, in
        alternating blocks, so both see the same machine."""
        from backends import DockerBackend, SandboxAPI

        async def direct_block(api: SandboxAPI) -> list[float]:
            samples = []
            for _ in range(self.n):
                started = time.perf_counter()
                await api.exec("true", timeout=60)
                samples.append(time.perf_counter() - started)
            return samples

        loop = asyncio.new_event_loop()
        backend = DockerBackend(box.info["container_name"].rsplit("-", 1)[0])
        try:
            record = loop.run_until_complete(backend.discover(box.sandbox_id))
            if record is None:
                raise SandboxError(f"the container of sandbox {box.sandbox_id} is gone")
            api = SandboxAPI(record.url, record.token)
            actor: list[float] = []
            direct: list[float] = []
            for _ in range(10):
                actor += [self._timed(lambda: box.exec("true"))[1] for _ in range(self.n)]
                direct += loop.run_until_complete(direct_block(api))
            loop.run_until_complete(api.aclose())
            loop.run_until_complete(backend.close())
        finally:
            loop.close()
        self.results[f"exec_actor{suffix}"] = summarize(actor)
        self.results[f"exec_direct{suffix}"] = summarize(direct)

    def prewarmed(self, pool: Any) -> None:
        samples = []
        for i in range(self.n * 2):
            self._wait_spares(pool, actors=pool.config.spare_actors, sandboxes=pool.config.prewarm)
            box, seconds = self._timed(lambda: pool.acquire(f"new-{i}"))
            assert box.path == "prewarmed", box.path
            samples.append(seconds)
            pool.destroy(box)
        self.results["prewarmed"] = summarize(samples)

    def _burst_row(self, rounds: list[tuple[int, float]]) -> dict[str, Any]:
        """A burst figure over its rounds: the median wall time, and the successes of the worst round."""
        walls = sorted(wall for _, wall in rounds)
        return {"n": self.burst_n, "ok": min(ok for ok, _ in rounds), "wall_s": round(walls[len(walls) // 2], 3),
                "rounds_wall_s": [round(wall, 3) for _, wall in rounds]}

    def _burst_round(self, pool: Any, threads: list[str]) -> tuple[int, float, list[float]]:
        """One burst: every thread acquires and runs ``true`` at once. Returns (ok, wall seconds,
        each thread's acquire + first command in seconds)."""
        def one(thread: str) -> float | None:
            started = time.perf_counter()
            return time.perf_counter() - started if _try(lambda: pool.acquire(thread).exec("true")) is True else None

        started = time.perf_counter()
        outcomes = run_all(one, threads, len(threads))
        wall = time.perf_counter() - started
        latencies = [o for o in outcomes if isinstance(o, float)]
        return len(latencies), wall, latencies

    def burst(self, pool: Any, key: str, rounds: int, wait_spares: int | None = None, keep_last: bool = True,
              ray_beside: bool = False) -> None:
        """``rounds`` bursts of new threads, each thread acquiring and running ``true``; before
        each, the spare actors are awaited (``wait_spares``, else the config's). The last round's
        sandboxes are kept with ``keep_last`` (the memory figures read them). Beside each round,
        a floor burst, alternately before and after (before a kept last round); with
        ``ray_beside``, also a round of Ray's own floor and one of both floors at once (all before)."""
        measured, per_round, floors, ray_floors, at_once = [], [], [], [], []  # type: ignore[var-annotated]

        def one(r: int) -> None:
            self._wait_spares(pool, actors=pool.config.spare_actors if wait_spares is None else wait_spares,
                              timeout=600)
            spares = pool.stats()["spare_actors"]
            ok, wall, latencies = self._burst_round(pool, [f"{key}-{r}-{i}" for i in range(self.burst_n)])
            measured.append((ok, wall))
            per_round.append({"wall_s": round(wall, 3), "ok": ok, "spare_actors": spares,
                              **{k: v for k, v in summarize(latencies).items() if k in ("p50", "p95")}})
            self.say(f"round {r + 1}/{rounds}: {ok}/{self.burst_n} ok in {wall:.2f}s (spare actors {spares}, "
                     f"per thread p50 {per_round[-1]['p50']:.0f} ms, p95 {per_round[-1]['p95']:.0f} ms)")
            if r < rounds - 1 or not keep_last:
                for row in pool.list():
                    pool.destroy(row["sandbox_id"])

        def floor() -> None:
            self._floor_round(floors)
            if ray_beside:
                ray_floors.append(self._ray_round()[1])
                at_once.append(self._at_once_round())

        for r in range(rounds):
            first = r % 2 == 0 or ray_beside or (keep_last and r == rounds - 1)
            self._beside(pool, lambda: one(r), floor, first=first, actors=wait_spares)
        self.results[key] = {**self._burst_row(measured), "spare_actors": per_round[-1]["spare_actors"],
                             "rounds": per_round, **self._floors_beside(floors, ray_floors, at_once)}

    @staticmethod
    def _floors_beside(floors: Sequence[float], ray_floors: Sequence[float] = (),
                       at_once: Sequence[float] = ()) -> dict[str, Any]:
        """The floor bursts measured beside a burst figure: their median and each round."""
        figure: dict[str, Any] = {}
        for key, walls in (("floor_beside", floors), ("ray_floor_beside", ray_floors), ("at_once_beside", at_once)):
            if walls:
                figure[f"{key}_s"] = round(sorted(walls)[len(walls) // 2], 3)
                figure[f"{key}_rounds_s"] = [round(wall, 3) for wall in walls]
        return figure

    def default_bursts(self, pool: Any) -> None:
        """On the default config: a first burst (nothing learned: ``burst_default``), then, once its
        sandboxes are gone and the pool has grown its spares to that burst, ``burst_repeat``."""
        self.burst(pool, "burst_default", 1, keep_last=False, ray_beside=True)
        self.say("waiting for the pool to grow its spare actors to the burst")
        self._wait_spares(pool, actors=self.burst_n, timeout=600)
        time.sleep(2)  # let the last spare's start-up settle: measure the steady state
        self.results["spares_idle"] = self._spares_idle(pool)
        self.burst(pool, "burst_repeat", self.rounds, wait_spares=self.burst_n)
        self.memory(pool)

    def _spares_idle(self, pool: Any) -> dict[str, Any]:
        """What the idle spare actors hold: their count, USS and CPU (measured over 5 s)."""
        import psutil
        import ray

        from .spawn import sandbox_actors

        pids = []
        for handle in sandbox_actors(pool.config).values():
            info = ray.get(handle.describe.remote(), timeout=10)
            if info.get("sandbox_id") is None:
                pids.append(info["pid"])
        procs = [psutil.Process(pid) for pid in pids]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(5)
        cpu = sum(sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)) / 5
        uss = sum(p.memory_full_info().uss for p in procs) / 2**20
        return {"n": len(procs), "uss_mb": round(uss, 1), "cpu_cores": round(cpu, 3)}

    def arrivals(self, pool: Any, phases: tuple[tuple[float, int], ...] = ((2.0, 64), (8.0, 64))) -> None:
        """New threads arriving at a steady rate (per phase: rate per second, threads), each
        acquiring and running ``true``, then destroying its sandbox. p50/p95 per phase."""
        from concurrent.futures import ThreadPoolExecutor

        self._wait_spares(pool, actors=pool.config.spare_actors)
        rows = []
        with ThreadPoolExecutor(max(n for _, n in phases)) as threads:
            for p, (rate, count) in enumerate(phases):
                def one(thread: str) -> float | None:
                    started = time.perf_counter()
                    try:
                        box = pool.acquire(thread)
                        box.exec("true")
                    except Exception:  # noqa: BLE001 - counted as a failure and reported
                        return None
                    seconds = time.perf_counter() - started
                    _try(lambda: pool.destroy(box))
                    return seconds

                begun = time.perf_counter()
                futures = []
                for i in range(count):
                    time.sleep(max(0.0, begun + i / rate - time.perf_counter()))
                    futures.append(threads.submit(one, f"arrive-{p}-{i}"))
                done = [f.result() for f in futures]
                latencies = [d for d in done if d is not None]
                row = {"rate": rate, "count": count, "ok": len(latencies), "wall_s": round(time.perf_counter() - begun, 1),
                       "spare_actors": pool.stats()["spare_actors"], **summarize(latencies)}
                rows.append(row)
                self.say(f"{rate:g}/s: {row['ok']}/{count} ok, p50 {row['p50']:.0f} ms, p95 {row['p95']:.0f} ms, "
                         f"max {row['max']:.0f} ms")
        self.results["arrivals"] = rows

    def ray_floor(self) -> None:
        """Ray's own cost here: ``burst_n`` trivial actors (num_cpus=0, nothing imported) created at
        once, until all answer; the median of ``rounds``."""
        measured = []
        for r in range(self.rounds):
            measured.append(self._ray_round())
            self.say(f"round {r + 1}/{self.rounds}: {self.burst_n} trivial actors answering in {measured[-1][1]:.2f}s")
        self.results["ray_floor_burst"] = self._burst_row(measured)

    def _ray_round(self) -> tuple[int, float]:
        """One round of Ray's floor, its processes gone after it. Returns (answered, wall seconds)."""
        import ray

        trivial = _trivial_actor()
        started = time.perf_counter()
        actors = [trivial.remote() for _ in range(self.burst_n)]
        answered = ray.get([a.ping.remote() for a in actors], timeout=600)
        wall = time.perf_counter() - started
        for actor in actors:
            ray.kill(actor)
        _wait_gone(set(answered))
        return len(answered), wall

    def _at_once_round(self) -> float:
        """Both floors of a first burst at once: ``burst_n`` trivial actors created while a floor
        burst of ``burst_n`` bare containers runs, until all answer. What a first burst asks of the
        machine (a new worker process and a container per thread) without any of our code: each
        floor measured alone leaves out what running them together costs. Wall seconds."""
        import ray

        assert self._floor is not None
        trivial = _trivial_actor()
        answered: list[int] = []
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            started = time.perf_counter()
            actors = [trivial.remote() for _ in range(self.burst_n)]
            pings = executor.submit(ray.get, [a.ping.remote() for a in actors], timeout=600)
            try:
                self._floor.burst(self.burst_n)
                answered = pings.result()
                wall = time.perf_counter() - started
            finally:
                for actor in actors:
                    ray.kill(actor)
        _wait_gone(set(answered))
        return wall

    def memory(self, pool: Any) -> None:
        import psutil
        import ray

        from backends import DockerBackend

        rows = pool.list()
        uss, container = [], []

        async def usage(prefix: str, ids: list[str]) -> list[int | None]:
            backend = DockerBackend(prefix)
            try:
                return [await backend.memory_usage(i) for i in ids]
            finally:
                await backend.close()

        for row in rows:
            box = pool.get(row["sandbox_id"])
            if box is None:
                continue
            pid = ray.get(box.actor.describe.remote())["pid"]
            uss.append(psutil.Process(pid).memory_full_info().uss / 2**20)
        container = [u / 2**20 for u in asyncio.run(usage(pool.config.container_prefix, [r["sandbox_id"] for r in rows]))
                     if u is not None]
        stats = pool.stats()
        self.results["actor_uss_mb"] = round(sorted(uss)[len(uss) // 2], 1) if uss else None
        self.results["actor_uss_mb_max"] = round(max(uss), 1) if uss else None
        self.results["container_mb"] = round(sorted(container)[len(container) // 2], 1) if container else None
        self.results["pool_uss_mb"] = round(psutil.Process(stats["pid"]).memory_full_info().uss / 2**20, 1)
        self.results["pool_sandboxes"] = stats["total"]

    def lifecycle(self, pool: Any) -> None:
        """Hibernate and resume (and what hibernation frees), and snapshots."""
        import psutil
        import ray

        from backends import DockerBackend

        async def container_mb(sandbox_id: str) -> float | None:
            backend = DockerBackend(pool.config.container_prefix)
            try:
                used = await backend.memory_usage(sandbox_id)
                return None if used is None else used / 2**20
            finally:
                await backend.close()

        sleep, wake, freed, gone, floors = [], [], [], [], []  # type: ignore[var-annotated]

        def actor_mb(pid: int) -> float:
            try:
                return psutil.Process(pid).memory_full_info().uss / 2**20
            except psutil.NoSuchProcess:
                return 0.0  # ended: all of it came back

        def resume(i: int) -> None:
            self._wait_spares(pool, actors=pool.config.spare_actors)
            again, seconds = self._timed(lambda: pool.acquire(f"sleeper-{i}"))
            assert again.path == "resumed" and again.read_file("/tmp/kept.txt").strip() == "kept", again.path
            wake.append(seconds)
            pool.destroy(again)

        for i in range(self.n):
            box = pool.acquire(f"sleeper-{i}")
            box.exec("echo kept > /tmp/kept.txt")
            pid = ray.get(box.actor.describe.remote())["pid"]
            held = actor_mb(pid) + (asyncio.run(container_mb(box.sandbox_id)) or 0.0)
            sleep.append(self._timed(lambda: pool.hibernate(box))[1])
            # Measured again once hibernated: what the actor's process and the container still hold.
            gone.append(_until(lambda: not psutil.pid_exists(pid), 10))
            freed.append(held - actor_mb(pid) - (asyncio.run(container_mb(box.sandbox_id)) or 0.0))
            self._beside(pool, lambda: resume(i), lambda: self._floor_single(floors), first=i % 2 == 0)
        self.results["hibernate"] = summarize(sleep)
        self.results["resume"] = {**summarize(wake), **self._floor_figure(floors)}
        self.results["hibernate_frees_mb"] = round(sorted(freed)[len(freed) // 2], 1)
        self.results["hibernate_actor_ended"] = sum(gone) / len(gone)  # share of hibernations whose actor ended

        source = pool.acquire("snapshot-source")
        source.exec("echo prepared > /tmp/env.txt")
        snaps = [self._timed(lambda: source.snapshot(f"bench-{i}")) for i in range(self.n)]
        self.results["snapshot"] = summarize([seconds for _, seconds in snaps])
        self.results["snapshot_image_mb"] = round((snaps[0][0].size or 0) / 1e6, 1)

    def fork_burst(self, pool: Any) -> None:
        """Bursts of new threads started from one snapshot (``fork``), each running ``true`` as its
        handle comes, on a thread of its own (as every thread of ``burst`` and every container of
        the floor's burst runs it: one after another, the commands queued behind each other on
        the busy machine, 40-90 ms each, and the handles behind them)."""
        from concurrent.futures import ThreadPoolExecutor

        source = pool.acquire("fork-source")
        source.exec("echo prepared > /tmp/env.txt")
        snap = source.snapshot("bench-fork")
        pool.destroy(source)
        measured, floors = [], []  # type: ignore[var-annotated]

        def one(r: int) -> None:
            self._wait_spares(pool, actors=pool.config.spare_actors, timeout=600)
            threads = [f"fork-{r}-{i}" for i in range(self.burst_n)]
            started = time.perf_counter()
            with ThreadPoolExecutor(len(threads)) as commands:
                runs = [commands.submit(_try, functools.partial(box.exec, "true")) for box in pool.fork(snap, threads)]
                outcomes = [run.result() for run in runs]
            measured.append((sum(1 for o in outcomes if o is True), time.perf_counter() - started))
            self.say(f"fork round {r + 1}/{self.rounds}: {measured[-1][0]}/{self.burst_n} ok in {measured[-1][1]:.2f}s")
            for row in pool.list():
                pool.destroy(row["sandbox_id"])

        for r in range(self.rounds):
            self._beside(pool, lambda: one(r), lambda: self._floor_round(floors), first=r % 2 == 0)
        self.results["fork_burst"] = {**self._burst_row(measured), "spare_actors": pool.config.spare_actors,
                                      **self._floors_beside(floors)}

    def scale_run(self, pool: Any) -> None:
        started = time.perf_counter()
        outcomes = run_all(lambda i: _try(lambda: pool.acquire(f"scale-{i}").exec("true")), range(self.scale), 8)
        ok = sum(1 for o in outcomes if o is True)
        held = [_try(lambda: pool.acquire(f"scale-{i}").exec("echo still").output.strip() == "still")
                for i in range(self.scale)]
        self.results["scale"] = {"n": self.scale, "ok": ok, "still_ok": sum(1 for h in held if h is True),
                                 "wall_s": round(time.perf_counter() - started, 1)}
        self.memory(pool)

    # ── the run ───────────────────────────────────────────────────────────

    def run(self) -> dict[str, Any]:
        import ray

        from sandbox_actors.config import SandboxConfig
        from sandbox_actors.image import build_image

        image = build_image(progress=lambda line: None).tag
        self.out(f"sandbox-actors bench: {self.n} samples per figure, burst of {self.burst_n}"
                 + (f", scale {self.scale}" if self.scale else ""))
        with tempfile.TemporaryDirectory(prefix="sandbox-actors-bench-") as base_dir:
            def config(name: str, **extra: Any) -> SandboxConfig:
                values: dict[str, Any] = dict(
                    pool_name=name, namespace="sandbox_actors_bench", container_prefix=name, image=image,
                    base_dir=base_dir, replicas=max(8, self.burst_n, self.scale) + 4, idle_timeout=0)
                values.update(extra)
                return SandboxConfig(**values)

            self.out("floor: bare container + readiness through the engine, no Ray")
            self.floor(image, "bench-floor")
            if self.runtime:
                self.out(f"floor under runtime {self.runtime}")
                self.floor(image, "bench-floor-rt", runtime=self.runtime)
            ray.init(address="local", logging_level=logging.ERROR, include_dashboard=False)
            try:
                address = ray.get_runtime_context().gcs_address
                self.out(f"Ray's own floor: {self.burst_n} trivial actors at once, {self.rounds} rounds")
                self.ray_floor()
                self._run_stages(image, self._stages(config, address))
            finally:
                ray.shutdown()
        return self.results

    def _stages(self, config: Callable[..., Any], address: str) -> list[tuple[str, Any, Callable[[Any], None]]]:
        """Each stage: its title, its pool's config, and what it measures on that pool."""
        n, rounds = self.burst_n, self.rounds
        stages: list[tuple[str, Any, Callable[[Any], None]]] = [
            ("acquire paths, exec", config("bench-paths"), lambda p: self.paths(p, address)),
            ("pre-warmed new threads", config("bench-prewarm", prewarm=2, thread_mounts=False), self.prewarmed),
            (f"burst of {n} new threads, {n} spare actors, {rounds} rounds",
             config("bench-burst", spare_actors=n), lambda p: self.burst(p, "burst", rounds)),
            (f"burst of {n} new threads on the default config, then {rounds} more once the pool has learned it",
             config("bench-burst2"), self.default_bursts),
            (f"new threads arriving at 2/s, then 8/s ({n * 2} each), default config",
             config("bench-arrive"), lambda p: self.arrivals(p, ((2.0, n * 2), (8.0, n * 2)))),
            ("hibernate and resume, snapshot (default spare actors)",
             config("bench-life", idle_action="hibernate"), self.lifecycle),
            (f"{rounds} bursts of {n} forks from one snapshot, {n} spare actors",
             config("bench-fork", spare_actors=n), self.fork_burst),
        ]
        if self.scale:
            stages.append((f"{self.scale} sandboxes held at once", config("bench-scale"), self.scale_run))
        if self.runtime:
            # As the bootstrap registers gVisor here: no network of its own (see README).
            stages.append((f"cold start and exec under runtime {self.runtime} (no network)",
                           config("bench-runtime", runtime=self.runtime, network={"egress": "none"}),
                           self.under_runtime))
        return stages

    def _run_stages(self, image: str, stages: list[tuple[str, Any, Callable[[Any], None]]]) -> None:
        """Each stage on a pool of its own, shut down after it; bare starts run beside the pool's
        figures on a network of their own (see _beside)."""
        import sandbox_actors

        self._floor = FloorEngine(image, "bench-beside")
        try:
            self._floor.single()  # its engine client's own start-up
            for title, cfg, stage in stages:
                self.out(title)
                pool = sandbox_actors.connect(cfg)
                try:
                    stage(pool)
                finally:
                    pool.shutdown()
        finally:
            floor, self._floor = self._floor, None
            floor.close()


class FloorEngine:
    """Bare container starts through the engine, no Ray: create + start + readiness (polled from
    10 ms on) of the image on an isolated network of its own (or none, under ``runtime``), as
    the pool's sandboxes get. Engine calls are shielded and kept: an interrupt cancels the caller,
    never the call in the engine's thread, and :meth:`close` waits for every one before it removes
    what exists (a create it missed, or a removal half done, would keep the network)."""

    def __init__(self, image: str, pool: str, runtime: str | None = None) -> None:
        from backends import DockerBackend
        from backends.firewall import NetworkPolicy

        self._image, self._pool, self._runtime = image, pool, runtime
        self._loop = asyncio.new_event_loop()
        self._backend = DockerBackend(pool, policy=NetworkPolicy(egress="none") if runtime else None)
        self._calls: set[asyncio.Future[Any]] = set()

    def _spec(self) -> Any:
        from backends import Limits, SandboxSpec

        return SandboxSpec(sandbox_id=secrets.token_hex(12), pool=self._pool, image=self._image,
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
            network = backend.network(self._pool)

            async def gone() -> bool:
                for record in await backend.list(self._pool):
                    await backend.destroy(record.sandbox_id)
                await backend.teardown(self._pool)
                return not network.policy.networked or not await asyncio.to_thread(network.exists)

            try:
                await asyncio.gather(*self._calls, return_exceptions=True)
                # The engine may still count a container just removed as on the network ("active
                # endpoints") for a moment: ask again until the network is gone, then make the
                # engine drop the endpoints it still lists.
                deadline = time.monotonic() + 15
                while not (cleared := await gone()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                if not cleared:
                    dropped = await asyncio.to_thread(network.drop_stale_endpoints)
                    if not await gone():
                        print(f"  warning: the engine keeps network {network.name} of the floor "
                              f"(endpoints dropped: {', '.join(dropped) or 'none listed'}); restart dockerd, then "
                              f"`docker network rm {network.name}` and `sandbox-actors gc` (README, Troubleshooting)",
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


def _trivial_actor() -> Any:
    """A remote class that imports nothing of ours (defined here, it travels by value)."""
    import ray

    @ray.remote(num_cpus=0)
    class Trivial:
        def ping(self) -> int:
            import os

            return os.getpid()

    return Trivial


def _wait_gone(pids: set[int], timeout: float = 30.0) -> None:
    """Until the processes have exited (a killed actor's worker takes a moment)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in pids):
        time.sleep(0.1)


def _try(call: Callable[[], Any]) -> Any:

    try:
        call()
        return True
    except SandboxError as exc:
        return exc


TIME_KEYS = ["floor", "cold", "warm", "hot", "prewarmed", "cross_process", "exec_actor", "exec_direct", "hibernate",
             "resume", "snapshot"]


def _until(done: Callable[[], bool], seconds: float) -> bool:
    """Whether ``done()`` came true within ``seconds`` (asked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def table(results: dict[str, Any]) -> str:
    """The figures as a table: timings, then bursts, then arrivals, memory and scale."""
    return "\n".join(_time_lines(results) + _burst_lines(results) + _other_lines(results))


def _time_lines(results: dict[str, Any]) -> list[str]:
    floor = results.get("floor", {}).get("p50") or 0
    lines = [f"{'figure':<16}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'p50/floor':>11}{'p50/beside':>12}"]
    runtimes = sorted(key.removeprefix("floor_") for key in results if key.startswith("floor_") and key != "floor_burst")
    keys = TIME_KEYS + [f"{key}_{runtime}" for runtime in runtimes for key in ("floor", "cold", "exec_actor",
                                                                              "exec_direct")]
    for key in keys:
        row = results.get(key)
        if not row:
            continue
        ratio = f"{row['p50'] / floor:.2f}x" if floor else "-"
        beside = f"{row['p50'] / row['floor_beside']:.2f}x" if row.get("floor_beside") else ""
        lines.append(f"{key:<16}{row['n']:>5}{row['p50']:>10.1f}{row['p95']:>10.1f}{row['max']:>10.1f}{ratio:>11}"
                     f"{beside:>12}".rstrip())
    return lines


def _burst_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    floor_burst = results.get("floor_burst", {}).get("wall_s")
    ray_floor = results.get("ray_floor_burst", {}).get("wall_s")
    for key in ("floor_burst", "ray_floor_burst", "burst", "burst_default", "burst_repeat", "fork_burst"):
        row = results.get(key)
        if not row:
            continue
        if key == "burst_default" and floor_burst and ray_floor:
            ratio = f"{row['wall_s'] / (floor_burst + ray_floor):.2f}x of floor_burst + ray_floor_burst"
        else:
            ratio = f"{row['wall_s'] / floor_burst:.2f}x of floor burst" if floor_burst else "-"
        spares = f", spare actors {row['spare_actors']}" if "spare_actors" in row else ""
        walls = row.get("rounds_wall_s", [])
        over = f"median of {' '.join(f'{w:.2f}' for w in walls)}" if len(walls) > 1 else "1 round"
        lines.append(f"{key:<16}{row['n']:>5}  ok {row['ok']}/{row['n']}  wall {row['wall_s']:.2f}s  {ratio} "
                     f"({over}{spares})")
        lines += _beside_lines(row)
        for r, each in enumerate(row.get("rounds", [])):
            lines.append(f"{'':<16}{'':>5}  round {r + 1}: {each['ok']}/{row['n']} ok in {each['wall_s']:.2f}s, "
                         f"per thread p50 {each['p50']:.0f} ms, p95 {each['p95']:.0f} ms, "
                         f"spare actors {each['spare_actors']}")
    return lines


def _beside_lines(row: dict[str, Any]) -> list[str]:
    """A burst's ratios to the floors measured beside it, when they were."""
    lines = []
    if row.get("floor_beside_s"):
        beside = row["floor_beside_s"] + row.get("ray_floor_beside_s", 0)
        what = "floor + Ray floor bursts" if row.get("ray_floor_beside_s") else "floor burst"
        walls = " ".join(f"{w:.2f}" for w in row["floor_beside_rounds_s"])
        ray_walls = " ".join(f"{w:.2f}" for w in row.get("ray_floor_beside_rounds_s", []))
        lines.append(f"{'':<16}{'':>5}  beside: {row['wall_s'] / beside:.2f}x of the {what} measured beside it "
                     f"(floor {walls}" + (f", Ray floor {ray_walls}" if ray_walls else "") + ")")
    if row.get("at_once_beside_s"):
        walls = " ".join(f"{w:.2f}" for w in row["at_once_beside_rounds_s"])
        lines.append(f"{'':<16}{'':>5}  beside: {row['wall_s'] / row['at_once_beside_s']:.2f}x of both floors "
                     f"at once ({walls})")
    return lines


def _other_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    floor = results.get("floor", {}).get("p50") or 0
    for row in results.get("arrivals", []):
        ratio = f"p95 {row['p95'] / floor:.2f}x floor p50" if floor else ""
        lines.append(f"{'arrivals ' + format(row['rate'], 'g') + '/s':<16}{row['count']:>5}  ok {row['ok']}/{row['count']}  "
                     f"p50 {row['p50']:.0f} ms  p95 {row['p95']:.0f} ms  max {row['max']:.0f} ms  {ratio} "
                     f"({row['wall_s']}s, spare actors {row['spare_actors']} at the end)")
    idle = results.get("spares_idle")
    if idle:
        lines.append(f"learned spares while idle: {idle['n']} actors, {idle['uss_mb']} MB USS in all, "
                     f"{idle['cpu_cores']} of a core")
    memory = [f"{k} {results[k]}" for k in ("actor_uss_mb", "actor_uss_mb_max", "container_mb", "pool_uss_mb",
                                            "pool_sandboxes", "hibernate_frees_mb", "snapshot_image_mb")
              if results.get(k) is not None]
    if memory:
        lines.append("memory (MB): " + ", ".join(memory))
    if results.get("scale"):
        s = results["scale"]
        lines.append(f"scale: {s['ok']}/{s['n']} sandboxes started, {s['still_ok']}/{s['n']} answering "
                     f"while all held, {s['wall_s']}s")
    return lines
