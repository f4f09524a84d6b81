"""One bench run: each stage in a private local Ray cluster of its own, between clean floors.

A clean floor is measured while nothing of ours runs (no Ray, no pool, no spare actors): bare
container starts, bursts of them, or rollout episodes, driven straight through the engine. Each
stage measures its floors just before its cluster starts and just after it is gone; a targeted
figure's ``clean_ratio`` is to their median (see :mod:`sandbox_actors.bench.report`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import rollouts
from ..console import run_all
from ..demo import summarize
from ..errors import InvalidRequest, SandboxError
from .floors import FloorEngine, cpu_ms_per_s, ray_exec_actor, ray_processes, trivial_actor, wait_gone
from .report import judge

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
NAMESPACE = "sandbox_actors_bench"

# A Python process holding 200 MB of data in a dict (random bytes: a checkpoint cannot squeeze
# them) and a counter; it writes "count entries digest" to /tmp/state every 50 ms, the digest
# taken over the whole dict every 40 counts. The live stage and tests/test_live_checkpoint.py.
LIVE_HOLDER = """
import hashlib, os, random, time
random.seed(7)
held = {i: random.randbytes(1000) for i in range(200_000)}
def digest():
    return hashlib.sha256(b"".join(held[i][:8] for i in range(len(held)))).hexdigest()[:16]
count, seen = 0, digest()
while True:
    count += 1
    if count % 40 == 0:
        seen = digest()
    open("/tmp/state.new", "w").write(f"{count} {len(held)} {seen}")
    os.replace("/tmp/state.new", "/tmp/state")
    time.sleep(0.05)
"""


# The usage stage's actors look this often (the default is 15 s): no oftener than a look's CPU
# window (USAGE_CPU_WINDOW), which a look waits out when the last one is younger.
USAGE_LOOK_EVERY = 1.0


@dataclass(frozen=True)
class Stage:
    """A pool of its own (``config``), what is measured on it (``measure(pool, address)``), and
    the clean floors measured around it (``floors``: 'single', 'burst', 'rollout'). With
    ``ray_alone``, Ray's own share of its figure is measured in its cluster before the pool starts
    (see :meth:`Bench.ray_alone`)."""

    key: str
    title: str
    config: Any
    measure: Callable[[Any, str], None]
    floors: tuple[str, ...] = ()
    ray_alone: bool = False


class Bench:
    """One benchmark run; :meth:`run` returns the JSON-able results."""

    def __init__(
        self, samples: int, burst: int, out: Callable[[str], None] = print, scale: int = 0, rounds: int = 3,
        runtime: str | None = None, episodes: int = 64, concurrency: tuple[int, ...] = (8, 16),
        only: tuple[str, ...] = (),
    ) -> None:
        self.n = samples
        self.burst_n = burst
        self.rounds = rounds
        self.scale = scale
        self.runtime = runtime
        self.episodes = episodes
        self.concurrency = concurrency
        self.only = only  # stage keys to run (all when empty)
        self.out = out
        self.results: dict[str, Any] = {"failures": [], "clean_floors": {}}
        self._image = ""
        self._default: Any = None  # the default config (the whole run's floor starts its containers)
        self._rollout_floor: rollouts.Floor | None = None

    def say(self, text: str) -> None:
        self.out(f"  {text}")

    def fail(self, what: str) -> None:
        """A failed thread or a wait that timed out: in the JSON and the table, and the exit code."""
        self.results["failures"].append(what)
        self.say(f"FAILED: {what}")

    # ── the run ───────────────────────────────────────────────────────────

    def run(self) -> dict[str, Any]:
        from sandbox_actors.config import SandboxConfig
        from sandbox_actors.image import build_image

        self._image = build_image(progress=lambda line: None).tag
        self.out(f"sandbox-actors bench: {self.n} samples per figure, burst of {self.burst_n}, {self.rounds} "
                 f"rounds, {self.episodes} rollouts at concurrency {', '.join(map(str, self.concurrency))}"
                 + (f", scale {self.scale}" if self.scale else ""))
        with tempfile.TemporaryDirectory(prefix="sandbox-actors-bench-") as base_dir:
            def config(name: str, **extra: Any) -> SandboxConfig:
                values: dict[str, Any] = dict(
                    pool_name=name, namespace=NAMESPACE, container_prefix=name, image=self._image,
                    base_dir=base_dir, replicas=max(8, self.burst_n, self.scale) + 4, idle_timeout=0)
                values.update(extra)
                return SandboxConfig(**values)

            self._default = config("bench-floor")
            stages = self._stages(config)
            unknown = set(self.only) - {stage.key for stage in stages}
            if unknown:
                raise InvalidRequest(f"bench: no stage {', '.join(sorted(unknown))}; the stages are "
                                     f"{', '.join(stage.key for stage in stages)}")
            self.out("floor: bare container + readiness through the engine, nothing of ours running")
            self.floor()
            try:
                for stage in stages:
                    if not self.only or stage.key in self.only:
                        self._stage(stage)
            finally:
                if self._rollout_floor is not None:
                    self._rollout_floor.close()
        self.results["targets"] = judge(self.results)
        return self.results

    def _stages(self, config: Callable[..., Any]) -> list[Stage]:
        n, rounds = self.burst_n, self.rounds
        top = max(self.concurrency)
        stages = [
            Stage("paths", "acquire paths, exec", config("bench-paths"), self.paths, ("single",)),
            Stage("prewarm", "pre-warmed new threads", config("bench-prewarm", prewarm=2, thread_mounts=False),
                  lambda pool, _: self.prewarmed(pool)),
            Stage("burst", f"burst of {n} new threads, {n} spare actors ready, {rounds} rounds",
                  config("bench-burst", spare_actors=n), lambda pool, _: self.burst(pool, "burst", rounds), ("burst",),
                  ray_alone=True),
            Stage("default", f"burst of {n} new threads on the default config, then {rounds} more once the pool has "
                  "learned it", config("bench-burst2"), lambda pool, _: self.default_bursts(pool), ("burst",)),
            Stage("arrivals", f"new threads arriving at 2/s, then 8/s ({n * 2} each), default config",
                  config("bench-arrive"), lambda pool, _: self.arrivals(pool, ((2.0, n * 2), (8.0, n * 2))),
                  ("single",)),
            Stage("lifecycle", "hibernate and resume, snapshot (default spare actors)",
                  config("bench-life", idle_action="hibernate"), lambda pool, _: self.lifecycle(pool), ("single",)),
            Stage("fork", f"{rounds} bursts of {n} forks from one snapshot, {n} spare actors",
                  config("bench-fork", spare_actors=n), lambda pool, _: self.fork_burst(pool), ("burst",)),
            Stage("rollouts", f"RL rollouts: {self.episodes} episodes at concurrency "
                  f"{', '.join(map(str, self.concurrency))}, as examples/rollouts.py runs them",
                  config("bench-rollouts", replicas=top + 2, thread_mounts=False),
                  lambda pool, _: self.rollout_run(pool), ("rollout",)),
        ]
        stages.append(Stage("usage", "the cost of looking at each sandbox's use (box.usage, top, its metrics)",
                            config("bench-usage", usage_interval=USAGE_LOOK_EVERY, thread_mounts=False),
                            lambda pool, _: self.usage_cost(pool)))
        if self.scale:
            stages.append(Stage("scale", f"{self.scale} sandboxes held at once", config("bench-scale"),
                                lambda pool, _: self.scale_run(pool)))
        live = _live_missing()
        if live is None:
            # The clean floors start the stage pool's own containers: gVisor's, with no network.
            stages.append(Stage("live", f"live hibernate and resume, a live fork burst of {n}, under gVisor "
                                "(processes and memory kept)",
                                config("bench-live", runtime="runsc", network={"egress": "none"}, spare_actors=n,
                                       limits={"memory": "1g", "cpus": 1.0, "pids": 512}),
                                lambda pool, _: self.live(pool), ("single", "burst")))
        else:
            self.out(f"live stage skipped: it needs {live}")
        if self.runtime:
            # As the bootstrap registers gVisor here: no network of its own (see docs/security.md).
            stages.append(Stage("runtime", f"cold start and exec under runtime {self.runtime} (no network)",
                                config("bench-runtime", runtime=self.runtime, network={"egress": "none"}),
                                lambda pool, _: self.under_runtime(pool), ("single_runtime",)))
        return stages

    def _stage(self, stage: Stage) -> None:
        """Clean floors, the stage in a private Ray cluster with its own pool, clean floors again."""
        import sandbox_actors

        self.out(stage.title)
        floors = self.results["clean_floors"].setdefault(stage.key, {})
        self._clean(stage.floors, floors, stage.config)
        with self._private_ray() as address:
            if stage.ray_alone:
                self.ray_alone(stage.config)
            pool = sandbox_actors.connect(stage.config)
            try:
                stage.measure(pool, address)
            finally:
                pool.shutdown()
        self._clean(stage.floors, floors, stage.config)

    @contextlib.contextmanager
    def _private_ray(self) -> Iterator[str]:
        """A local Ray cluster of this stage's own; gone, every process of it, when the stage ends."""
        import ray

        before = ray_processes()
        ray.init(address="local", namespace=NAMESPACE, logging_level=logging.ERROR, include_dashboard=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ours = ray_processes() - before
            ray.shutdown()
            if not wait_gone(ours, 60):
                self.fail("the stage's Ray processes were still there 60 s after ray.shutdown()")

    # ── clean floors: nothing of ours runs ────────────────────────────────

    def floor(self) -> None:
        """The floors of the whole run (and of the table's p50/floor column), before anything."""
        engine = FloorEngine(self._image, "bench-floor", config=self._default)
        try:
            engine.single()  # the engine client's own start-up is not the floor
            self.results["floor"] = summarize([engine.single() for _ in range(self.n)])
            rounds = []
            for r in range(self.rounds):
                rounds.append(engine.burst(self.burst_n))
                self.say(f"burst round {r + 1}/{self.rounds}: {rounds[-1][0]}/{self.burst_n} ok "
                         f"in {rounds[-1][1]:.2f}s")
            self.results["floor_burst"] = self._burst_row(rounds, "floor_burst")
        finally:
            engine.close()
        if self.runtime:
            engine = FloorEngine(self._image, "bench-floor-rt", self.runtime,
                                 config=type(self._default)(**{**self._default.model_dump(),
                                                               "network": {"egress": "none"}}))
            try:
                engine.single()
                self.results[f"floor_{self.runtime}"] = summarize([engine.single() for _ in range(self.n)])
            finally:
                engine.close()

    def _clean(self, kinds: tuple[str, ...], into: dict[str, Any], config: Any) -> None:
        """Measure the floors ``kinds`` once more (nothing of ours runs), adding to ``into``: the
        containers the stage's pool (``config``) would start, started straight through the engine."""
        if not kinds:
            return
        if "rollout" in kinds:
            self._clean_rollouts(into, config)
        runtime = self.runtime if "single_runtime" in kinds else None
        if "single" not in kinds and "burst" not in kinds and runtime is None:
            return
        engine = FloorEngine(self._image, "bench-clean", runtime, config=config)
        try:
            engine.single()
            if "single" in kinds or runtime:
                singles = [engine.single() for _ in range(self.n)]
                into.setdefault("single_s", []).extend(round(s, 4) for s in singles)
                self.say(f"clean floor: {self.n} single starts, p50 {summarize(singles)['p50']:.0f} ms")
            if "burst" in kinds:
                ok, wall = engine.burst(self.burst_n)
                if ok < self.burst_n:
                    self.fail(f"clean floor burst: {ok}/{self.burst_n} started")
                into.setdefault("burst_s", []).append(round(wall, 3))
                self.say(f"clean floor: burst of {self.burst_n} in {wall:.2f}s")
        finally:
            engine.close()

    def _clean_rollouts(self, into: dict[str, Any], config: Any) -> None:
        if self._rollout_floor is None:
            self._rollout_floor = rollouts.Floor(self._image, "bench-rollout-floor", config)
            self._rollout_floor.prepare()
        for concurrency in self.concurrency:
            row = self._rollout_floor.run(self.episodes, concurrency)
            if row["ok"] < row["n"]:
                self.fail(f"rollout floor at concurrency {concurrency}: {row['ok']}/{row['n']} scored "
                          f"({'; '.join(row['failures'][:3])})")
            into.setdefault("rollout_per_s", {}).setdefault(str(concurrency), []).append(row["per_s"])
            self.say(f"clean floor: {row['n']} rollouts at concurrency {concurrency}: {row['per_s']:.2f}/s")

    # ── through the pool ──────────────────────────────────────────────────

    def _wait_spares(self, pool: Any, actors: int = 0, sandboxes: int = 0, timeout: float = 120.0) -> None:
        """Until the pool has its spares (and none is still starting: a new worker process costs
        ~0.3 s of CPU, which would slow what is measured next); a timeout is a failure of the run."""
        deadline = time.monotonic() + timeout
        while True:
            stats = pool.stats()
            if (stats["spare_actors"] >= actors and stats["states"]["spare"] >= sandboxes
                    and not stats.get("spares_starting")):
                return
            if time.monotonic() >= deadline:
                self.fail(f"after {timeout:.0f}s the pool had {stats['spare_actors']}/{actors} spare actors, "
                          f"{stats['states']['spare']}/{sandboxes} spare sandboxes, "
                          f"{stats.get('spares_starting', 0)} starting")
                return
            time.sleep(0.05)

    @staticmethod
    def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        value = call()
        return value, time.perf_counter() - started

    def cold(self, pool: Any, key: str = "cold") -> None:
        """New threads one at a time, each after the spare actors are back."""
        samples: list[float] = []
        for i in range(self.n):
            self._wait_spares(pool, actors=pool.config.spare_actors)
            box, seconds = self._timed(lambda: pool.acquire(f"cold-{i}"))
            assert box.path == "cold", box.path
            samples.append(seconds)
            pool.destroy(box)
        self.results[key] = summarize(samples)

    def live(self, pool: Any) -> None:
        """Live hibernations and their resumes (a sleeping process kept), held to gVisor's cold
        start; the checkpoint's size for an idle sandbox and for one holding a 200 MB process."""
        sleep, wake, sizes = [], [], []
        for i in range(self.n):
            box = pool.acquire(f"live-{i}")
            pid = box.exec("sleep 3600 > /dev/null 2>&1 & echo $!").output.strip()
            sleep.append(self._timed(lambda: box.hibernate(live=True))[1])
            sizes.append(next(r for r in pool.list() if r["thread_id"] == f"live-{i}")["checkpoint_bytes"])
            self._wait_spares(pool, actors=pool.config.spare_actors)
            again, seconds = self._timed(lambda: pool.acquire(f"live-{i}"))
            if not again.info.get("resumed_live") or again.exec(f"kill -0 {pid}").exit_code != 0:
                self.fail(f"live resume {i}: its processes did not come back ({again.info.get('resumed_live')})")
            wake.append(seconds)
            pool.destroy(again)
        self.results["live_hibernate"], self.results["live_resume"] = summarize(sleep), summarize(wake)
        self.results["checkpoint_idle_mb"] = round(sorted(sizes)[len(sizes) // 2] / 1e6, 1)
        holder = pool.acquire("live-holder")
        holder.write_file("/tmp/holder.py", LIVE_HOLDER)
        holder.start("python3 /tmp/holder.py")
        if not _until(lambda: holder.exec("cat /tmp/state 2>/dev/null || echo 0").output.split()[0] != "0", 120):
            self.fail("the 200 MB process did not start within 120 s")
        began = time.perf_counter()
        holder.hibernate(live=True)
        self.results["live_hibernate_200mb_s"] = round(time.perf_counter() - began, 3)
        row = next(r for r in pool.list() if r["thread_id"] == "live-holder")
        self.results["checkpoint_200mb_mb"] = round((row["checkpoint_bytes"] or 0) / 1e6, 1)
        again, seconds = self._timed(lambda: pool.acquire("live-holder"))
        self.results["live_resume_200mb_s"] = round(seconds, 3)
        if not again.info.get("resumed_live"):
            self.fail("the 200 MB process's sandbox did not resume live")
        pool.destroy(again)
        self._live_forks(pool)

    def _live_forks(self, pool: Any) -> None:
        """A burst of forks from a live snapshot (a sleeping process kept), each running ``true``
        as its handle comes, held to gVisor's clean floor burst."""
        source = pool.acquire("live-source")
        pid = source.exec("sleep 3600 > /dev/null 2>&1 & echo $!").output.strip()
        snap = source.snapshot("bench-live", live=True)
        pool.destroy(source)
        self._wait_spares(pool, actors=pool.config.spare_actors, timeout=600)
        threads = [f"live-fork-{i}" for i in range(self.burst_n)]
        def first(box: Any) -> tuple[Any, int | None]:
            return box.info.get("forked_live"), box.exec(f"kill -0 {pid}").exit_code

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(threads)) as commands:
            ran = [commands.submit(first, box) for box in pool.fork(snap, threads)]
            outcomes = [r.result() for r in ran]
        wall = time.perf_counter() - started
        ok = sum(1 for live, code in outcomes if live is True and code == 0)
        if ok < self.burst_n:
            self.fail(f"live fork burst: {ok}/{self.burst_n} forks went on from the snapshot's processes")
        self.results["live_fork_burst"] = {"n": self.burst_n, "ok": ok, "wall_s": round(wall, 3),
                                           "checkpoint_mb": round((snap.checkpoint_bytes or 0) / 1e6, 1)}
        for row in pool.list():
            pool.destroy(row["sandbox_id"])
        pool.remove_snapshot(snap)

    def under_runtime(self, pool: Any) -> None:
        """Cold start and exec of sandboxes under ``self.runtime`` (rows suffixed with its name)."""
        self.cold(pool, f"cold_{self.runtime}")
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
        """``true`` through the SandboxActor, straight over HTTP to the same container, and through
        a trivial async Ray actor making that same request (Ray's own share), in alternating
        blocks, so all three see the same machine."""
        import ray

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
        trivial = None
        try:
            record = loop.run_until_complete(backend.discover(box.sandbox_id))
            if record is None:
                raise SandboxError(f"the container of sandbox {box.sandbox_id} is gone")
            api = SandboxAPI(record.url, record.token)
            trivial = ray_exec_actor().remote(record.url, record.token)
            ray.get(trivial.exec.remote("true"), timeout=120)  # its worker started and its client connected
            actor: list[float] = []
            direct: list[float] = []
            alone: list[float] = []
            for _ in range(10):
                actor += [self._timed(lambda: box.exec("true"))[1] for _ in range(self.n)]
                direct += loop.run_until_complete(direct_block(api))
                alone += [self._timed(lambda: ray.get(trivial.exec.remote("true")))[1] for _ in range(self.n)]
            loop.run_until_complete(api.aclose())
            loop.run_until_complete(backend.close())
        finally:
            if trivial is not None:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.get(trivial.close.remote(), timeout=30)
                ray.kill(trivial)
            loop.close()
        self.results[f"exec_actor{suffix}"] = summarize(actor)
        self.results[f"exec_direct{suffix}"] = summarize(direct)
        self.results[f"exec_ray_alone{suffix}"] = summarize(alone)

    def prewarmed(self, pool: Any) -> None:
        samples = []
        for i in range(self.n * 2):
            self._wait_spares(pool, actors=pool.config.spare_actors, sandboxes=pool.config.prewarm)
            box, seconds = self._timed(lambda: pool.acquire(f"new-{i}"))
            assert box.path == "prewarmed", box.path
            samples.append(seconds)
            pool.destroy(box)
        self.results["prewarmed"] = summarize(samples)

    def _burst_row(self, rounds: list[tuple[int, float]], key: str) -> dict[str, Any]:
        """A burst figure over its rounds: the median wall time, and the successes of the worst
        round (fewer than all is a failure of the run)."""
        walls = sorted(wall for _, wall in rounds)
        worst = min(ok for ok, _ in rounds)
        if worst < self.burst_n:
            self.fail(f"{key}: a round had {worst}/{self.burst_n} threads ok")
        return {"n": self.burst_n, "ok": worst, "wall_s": round(walls[len(walls) // 2], 3),
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

    def burst(self, pool: Any, key: str, rounds: int, wait_spares: int | None = None, keep_last: bool = True) -> None:
        """``rounds`` bursts of new threads, each thread acquiring and running ``true``; before
        each, the spare actors are awaited (``wait_spares``, else the config's). The last round's
        sandboxes are kept with ``keep_last`` (the memory figures read them)."""
        measured, per_round = [], []
        for r in range(rounds):
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
        self.results[key] = {**self._burst_row(measured, key), "spare_actors": per_round[-1]["spare_actors"],
                             "rounds": per_round}

    def default_bursts(self, pool: Any) -> None:
        """On the default config: Ray's own floor, a first burst (nothing learned: ``burst_default``,
        beside both floors at once), then, once the pool has grown its spares to that burst, the
        idle cost of spares against trivial actors, and ``burst_repeat``."""
        self.ray_floor()
        at_once = self._at_once_round()
        self.say(f"both floors at once: {self.burst_n} trivial actors created while {self.burst_n} bare "
                 f"containers start, in {at_once:.2f}s")
        self.burst(pool, "burst_default", 1, keep_last=False)
        self.results["burst_default"]["at_once_s"] = round(at_once, 3)
        self.say("waiting for the pool to grow its spare actors to the burst")
        self._wait_spares(pool, actors=self.burst_n, timeout=600)
        time.sleep(2)  # let the last spare's start-up settle: measure the steady state
        self.idle_cost(pool)
        self.burst(pool, "burst_repeat", self.rounds, wait_spares=self.burst_n)
        self.memory(pool)

    def idle_cost(self, pool: Any) -> None:
        """What idle spare actors hold (count, USS, CPU), and the idle CPU of as many trivial Ray
        actors measured right after, in the same cluster: the least any actor costs here."""
        import psutil
        import ray

        from ..spawn import sandbox_actors

        pids = []
        for handle in sandbox_actors(pool.config).values():
            info = ray.get(handle.describe.remote(), timeout=10)
            if info.get("sandbox_id") is None:
                pids.append(info["pid"])
        trivial = trivial_actor()
        actors = [trivial.remote() for _ in range(max(1, len(pids)))]
        answered = ray.get([a.ping.remote() for a in actors], timeout=600)
        try:
            time.sleep(2)  # past their start-up
            # Both over the same seconds: this machine's speed drifts from one minute to the next.
            used = cpu_ms_per_s([*pids, *answered], seconds=4.0 if self.n <= 3 else 10.0)  # (a smoke run: 4 s)
            # What any actor holds here (Ray's own worker): the floor for ``actor_uss_mb``.
            trivial_uss = sorted(psutil.Process(pid).memory_full_info().uss / 2**20 for pid in answered)
            self.results["trivial_actor_uss_mb"] = round(trivial_uss[len(trivial_uss) // 2], 1)
        finally:
            for actor in actors:
                ray.kill(actor)
            wait_gone(set(answered))
        spare_cpu = round(sum(used[pid] for pid in pids) / max(1, len(pids)), 2)
        self.results["trivial_actor_idle_cpu_ms_per_s"] = round(sum(used[pid] for pid in answered) / len(answered), 2)
        uss = sum(psutil.Process(pid).memory_full_info().uss for pid in pids) / 2**20
        self.results["spares_idle"] = {"n": len(pids), "uss_mb": round(uss, 1),
                                       "cpu_cores": round(spare_cpu * len(pids) / 1000, 3)}
        self.results["spare_idle_cpu_ms_per_s"] = spare_cpu
        self.say(f"idle: a spare actor {spare_cpu:.2f} ms of CPU per second, a trivial Ray actor "
                 f"{self.results['trivial_actor_idle_cpu_ms_per_s']:.2f} ({len(pids)} of each)")

    def arrivals(self, pool: Any, phases: tuple[tuple[float, int], ...] = ((2.0, 64), (8.0, 64))) -> None:
        """New threads arriving at a steady rate (per phase: rate per second, threads), each
        acquiring and running ``true``, then destroying its sandbox. p50/p95 per phase."""
        self._wait_spares(pool, actors=pool.config.spare_actors)
        rows = []
        with concurrent.futures.ThreadPoolExecutor(max(n for _, n in phases)) as threads:
            for p, (rate, count) in enumerate(phases):
                def one(thread: str) -> float | None:
                    started = time.perf_counter()
                    try:
                        box = pool.acquire(thread)
                        box.exec("true")
                    except SandboxError:  # counted as a failure and reported
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
                row = {"rate": rate, "count": count, "ok": len(latencies),
                       "wall_s": round(time.perf_counter() - begun, 1),
                       "spare_actors": pool.stats()["spare_actors"], **summarize(latencies)}
                if row["ok"] < count:
                    self.fail(f"arrivals at {rate:g}/s: {row['ok']}/{count} ok")
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
            self.say(f"Ray's floor, round {r + 1}/{self.rounds}: {self.burst_n} trivial actors answering "
                     f"in {measured[-1][1]:.2f}s")
        self.results["ray_floor_burst"] = self._burst_row(measured, "ray_floor_burst")

    def _ray_round(self) -> tuple[int, float]:
        """One round of Ray's floor, its processes gone after it. Returns (answered, wall seconds)."""
        import ray

        trivial = trivial_actor()
        started = time.perf_counter()
        actors = [trivial.remote() for _ in range(self.burst_n)]
        answered = ray.get([a.ping.remote() for a in actors], timeout=600)
        wall = time.perf_counter() - started
        for actor in actors:
            ray.kill(actor)
        wait_gone(set(answered))
        return len(answered), wall

    def ray_alone(self, config: Any) -> None:
        """Ray's own share of a burst with spare actors ready: the stage's clean floor burst (its
        pool's containers, straight through the engine) while ``burst_n`` trivial Ray actors idle
        beside it, in the stage's cluster before its pool starts. Every Ray worker process wakes
        ~100 times a second whatever it runs, so a design with one actor per sandbox cannot go
        below this (``ray_alone`` of the burst target)."""
        import ray

        trivial = trivial_actor()
        actors = [trivial.remote() for _ in range(self.burst_n)]
        engine = FloorEngine(self._image, "bench-ray-alone", config=config)
        pids: list[int] = []
        try:
            pids = ray.get([a.ping.remote() for a in actors], timeout=600)
            engine.single()
            time.sleep(2)  # the last worker's start-up settled, as the pool's spares are before a burst
            ok, wall = engine.burst(self.burst_n)
        finally:
            for actor in actors:
                ray.kill(actor)
            engine.close()
        wait_gone(set(pids))
        if ok < self.burst_n:
            self.fail(f"Ray alone: {ok}/{self.burst_n} of the floor burst started")
        self.results["ray_alone_burst"] = {"n": self.burst_n, "ok": ok, "wall_s": round(wall, 3),
                                           "trivial_actors": len(pids)}
        self.say(f"Ray alone: the clean floor burst of {self.burst_n} beside {len(pids)} idle trivial Ray actors "
                 f"in {wall:.2f}s")

    def _at_once_round(self) -> float:
        """Both floors of a first burst at once: ``burst_n`` trivial actors created while a floor
        burst of ``burst_n`` bare containers runs, until all answer. What a first burst asks of the
        machine (a new worker process and a container per thread) without any of our code. Wall
        seconds."""
        import ray

        engine = FloorEngine(self._image, "bench-at-once", config=self._default)
        trivial = trivial_actor()
        answered: list[int] = []
        try:
            engine.single()
            with concurrent.futures.ThreadPoolExecutor(1) as executor:
                started = time.perf_counter()
                actors = [trivial.remote() for _ in range(self.burst_n)]
                pings = executor.submit(ray.get, [a.ping.remote() for a in actors], timeout=600)
                try:
                    engine.burst(self.burst_n)
                    answered = pings.result()
                    wall = time.perf_counter() - started
                finally:
                    for actor in actors:
                        ray.kill(actor)
        finally:
            engine.close()
        wait_gone(set(answered))
        return wall

    def memory(self, pool: Any) -> None:
        import psutil
        import ray

        from backends import DockerBackend

        rows = pool.list()
        uss = []

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

        def actor_mb(pid: int) -> float:
            try:
                return psutil.Process(pid).memory_full_info().uss / 2**20
            except psutil.NoSuchProcess:
                return 0.0  # ended: all of it came back

        sleep, wake, freed, gone = [], [], [], []
        for i in range(self.n):
            box = pool.acquire(f"sleeper-{i}")
            box.exec("echo kept > /tmp/kept.txt")
            pid = ray.get(box.actor.describe.remote())["pid"]
            held = actor_mb(pid) + (asyncio.run(container_mb(box.sandbox_id)) or 0.0)
            sleep.append(self._timed(lambda: pool.hibernate(box))[1])
            # Measured again once hibernated: what the actor's process and the container still hold.
            gone.append(_until(lambda: not psutil.pid_exists(pid), 10))
            freed.append(held - actor_mb(pid) - (asyncio.run(container_mb(box.sandbox_id)) or 0.0))
            self._wait_spares(pool, actors=pool.config.spare_actors)
            again, seconds = self._timed(lambda: pool.acquire(f"sleeper-{i}"))
            assert again.path == "resumed" and again.read_file("/tmp/kept.txt").strip() == "kept", again.path
            wake.append(seconds)
            pool.destroy(again)
        self.results["hibernate"] = summarize(sleep)
        self.results["resume"] = summarize(wake)
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
        the floor's burst runs it)."""
        source = pool.acquire("fork-source")
        source.exec("echo prepared > /tmp/env.txt")
        snap = source.snapshot("bench-fork")
        pool.destroy(source)
        measured = []
        for r in range(self.rounds):
            self._wait_spares(pool, actors=pool.config.spare_actors, timeout=600)
            threads = [f"fork-{r}-{i}" for i in range(self.burst_n)]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(threads)) as commands:
                runs = [commands.submit(_try, functools.partial(box.exec, "true")) for box in pool.fork(snap, threads)]
                outcomes = [run.result() for run in runs]
            measured.append((sum(1 for o in outcomes if o is True), time.perf_counter() - started))
            self.say(f"fork round {r + 1}/{self.rounds}: {measured[-1][0]}/{self.burst_n} ok in {measured[-1][1]:.2f}s")
            for row in pool.list():
                pool.destroy(row["sandbox_id"])
        self.results["fork_burst"] = {**self._burst_row(measured, "fork_burst"),
                                      "spare_actors": pool.config.spare_actors}

    def rollout_run(self, pool: Any) -> None:
        """The rollout workload through the pool at each concurrency (the floors around the stage
        run the same episodes with no Ray)."""
        prepare = pool.acquire("prepare")
        prepare.exec(rollouts.PREPARE)
        snapshot = prepare.snapshot("rollout-env").name
        prepare.destroy()
        rows = self.results.setdefault("rollouts", [])
        for concurrency in self.concurrency:
            # A job's first tasks wait for Ray to start its worker processes (~0.35 s of CPU each)
            # and the pool to learn its spares: the figure is the steady state after that (the
            # spares the warm-up taught it to keep started, not starting within the run).
            warm = rollouts.run(pool.config.pool_name, pool.config.namespace, 2 * concurrency, concurrency, snapshot)
            self.say(f"warm-up at concurrency {concurrency}: {warm['ok']}/{warm['n']} in {warm['wall_s']:.1f}s")
            if not rollouts.settle(pool, timeout=600):
                self.fail(f"after its warm-up at concurrency {concurrency}, the pool's learned spare actors were "
                          "still starting 600 s later")
            got = rollouts.run(pool.config.pool_name, pool.config.namespace, self.episodes, concurrency, snapshot)
            got.pop("episodes")
            if got["ok"] < got["n"]:
                self.fail(f"rollouts at concurrency {concurrency}: {got['ok']}/{got['n']} scored "
                          f"({'; '.join(got['failures'][:3])})")
            rows.append(got)
            self.say(f"concurrency {concurrency}: {got['per_s']:.2f} rollouts/s, acquire p50 {got['acquire_p50']:.0f} "
                     f"ms, exec p50 {got['exec_p50']:.1f} ms")
        pool.remove_snapshot(snapshot)

    def usage_cost(self, pool: Any) -> None:
        """What a look at a sandbox's use costs: in its actor (the periodic looks behind its
        metrics, counted by the actor itself) and in the engine (dockerd, containerd and the
        shims, over looks made straight through the engine, nothing else asking it meanwhile);
        and what that is per sandbox per second at the default ``usage_interval``."""
        import psutil
        import ray

        from backends import DockerBackend
        from sandbox_actors.config import SandboxConfig

        boxes = [pool.acquire(f"usage-{i}") for i in range(2)]
        seconds = 6.0 if self.n <= 3 else 15.0
        time.sleep(seconds)  # the actors look every USAGE_LOOK_EVERY seconds meanwhile (a first look takes 2 s)
        looks, actor_cpu = 0, 0.0
        for box in boxes:
            counted = ray.get(box.actor.describe.remote(), timeout=30)["usage_looks"]
            looks, actor_cpu = looks + counted["count"], actor_cpu + counted["cpu_seconds"]
        if looks == 0:
            self.fail("usage: no sandbox actor looked at its sandbox's use")
            return
        engine = [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("dockerd", "containerd")
                  or (p.info["name"] or "").startswith("containerd-shim")]
        backend, record = DockerBackend(pool.config.pool_name), boxes[0].info
        try:
            # A first look takes two samples a window apart; each later one, one (it measures
            # from an earlier look at least a window old, as an actor's periodic looks do).
            first = asyncio.run(backend.usage(record["sandbox_id"], record["container_id"], disk=False))
            before = sum(sum(p.cpu_times()[:2]) for p in engine)
            mine = time.process_time()
            calls = 20 if self.n <= 3 else 100
            for _ in range(calls):
                asyncio.run(backend.usage(record["sandbox_id"], record["container_id"], since=first, disk=False))
            engine_ms = (sum(sum(p.cpu_times()[:2]) for p in engine) - before) / calls * 1000
            client_ms = (time.process_time() - mine) / calls * 1000
        finally:
            asyncio.run(backend.close())
        actor_ms, engine_ms = round(actor_cpu / looks * 1000, 2), round(engine_ms, 2)
        interval = SandboxConfig.model_fields["usage_interval"].default
        self.results["usage_look"] = {
            "looks": looks, "actor_cpu_ms": actor_ms, "engine_cpu_ms": engine_ms,
            "client_cpu_ms_direct": round(client_ms, 2), "usage_interval_default_s": interval,
            "cpu_ms_per_s_per_sandbox": round((actor_ms + engine_ms) / interval, 3)}
        self.say(f"usage: a look costs {actor_ms:.2f} ms of its actor's CPU and {engine_ms:.2f} ms of the engine's; "
                 f"every {interval:.0f} s (the default), {(actor_ms + engine_ms) / interval:.3f} ms of CPU per second "
                 "per sandbox")

    def scale_run(self, pool: Any) -> None:
        started = time.perf_counter()
        outcomes = run_all(lambda i: _try(lambda: pool.acquire(f"scale-{i}").exec("true")), range(self.scale), 8)
        ok = sum(1 for o in outcomes if o is True)
        held = [_try(lambda: pool.acquire(f"scale-{i}").exec("echo still").output.strip() == "still")
                for i in range(self.scale)]
        self.results["scale"] = {"n": self.scale, "ok": ok, "still_ok": sum(1 for h in held if h is True),
                                 "wall_s": round(time.perf_counter() - started, 1)}
        if ok < self.scale:
            self.fail(f"scale: {ok}/{self.scale} sandboxes started")
        self.memory(pool)


def _try(call: Callable[[], Any]) -> Any:
    try:
        call()
        return True
    except SandboxError as exc:
        return exc


def _until(done: Callable[[], bool], seconds: float) -> bool:
    """Whether ``done()`` came true within ``seconds`` (asked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _live_missing() -> str | None:
    """What this machine's engine lacks for live checkpoints (gVisor's runsc registered, the
    experimental mode), or None when it has both."""
    import docker

    from backends.engine import connect

    client = connect(None, 30)
    try:
        info = client.info()
    except docker.errors.DockerException as exc:
        return f"a Docker engine that answers ({exc})"
    finally:
        client.close()
    missing = [what for what, ok in (("gVisor's runsc registered with Docker", "runsc" in (info.get("Runtimes") or {})),
                                     ("the engine's experimental mode", info.get("ExperimentalBuild"))) if not ok]
    return " and ".join(missing) or None
