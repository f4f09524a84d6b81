"""The demo: agent threads using sandboxes, end to end, on the embedded default.

A private local Ray cluster, the local Docker engine and the minimal image.
Several agent threads run turns concurrently (acquire, write a file in the
workspace, run a program that reads it, release); then every thread comes back
(warm reclaim, files still there); then a second process acquires one thread
(cross-process discovery). It prints progress as it goes and a summary at the
end, and exits 0 only when every check held, leak check included.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from .console import run_all

WORKSPACE = "/mnt/user-data/workspace"
PROGRAM = (
    "import glob\n"
    f"files = sorted(glob.glob('{WORKSPACE}/turn-*.txt'))\n"
    "values = [int(open(f).read().split()[-1]) for f in files]\n"
    "print(len(files), sum(values))\n"
)


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """p50/p95/max/n of a list of seconds, in milliseconds."""
    values = sorted(samples)
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0, "n": 0}
    p95 = values[min(len(values) - 1, max(0, round(0.95 * len(values)) - 1))]
    return {
        "p50": round(statistics.median(values) * 1000, 2),
        "p95": round(p95 * 1000, 2),
        "max": round(values[-1] * 1000, 2),
        "n": len(values),
    }


class Demo:
    """One run of the demo; ``run()`` returns the process exit code."""

    def __init__(self, threads: int, turns: int, out: Callable[[str], None] = print) -> None:
        self.threads = threads
        self.turns = turns
        self.out = out
        self.started = time.monotonic()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.ops: Counter[str] = Counter()
        self.checks: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            self.out(f"[{time.monotonic() - self.started:6.2f}s] {text}")

    def check(self, name: str, ok: bool) -> bool:
        with self._lock:
            self.checks.append((name, ok))
        return ok

    def run(self) -> int:
        import ray

        import sandbox_actors
        from sandbox_actors.config import SandboxConfig
        from sandbox_actors.image import build_image

        self.out(f"sandbox-actors demo: {self.threads} agent threads x {self.turns} turns, a return visit, "
                 "and a second process")
        image = build_image(progress=lambda line: self.say(f"image: {line}"))
        with tempfile.TemporaryDirectory(prefix="sandbox-actors-demo-") as base_dir:
            config = SandboxConfig(
                pool_name="sandbox-demo",
                namespace="sandbox_actors_demo",
                container_prefix="sandbox-demo",
                image=image.tag,
                base_dir=base_dir,
                replicas=self.threads + 1,
                spare_actors=self.threads,  # one started actor waiting per agent: cold starts skip Ray's
            )
            ray.init(address="local", logging_level=logging.ERROR, include_dashboard=False)
            try:
                address = ray.get_runtime_context().gcs_address
                self.say(f"ray: private local cluster at {address}")
                pool = sandbox_actors.connect(config)
                deadline = time.monotonic() + 120
                while pool.stats()["spare_actors"] < config.spare_actors and time.monotonic() < deadline:
                    time.sleep(0.1)
                self.say(f"pool {config.pool_name!r} ready (replicas={config.replicas}, "
                         f"idle_timeout={config.idle_timeout:.0f}s, {pool.stats()['spare_actors']} spare actors)")
                try:
                    self._phases(pool, address)
                finally:
                    stats = pool.stats()
                    shut = pool.shutdown()
                    self.say(f"shutdown: {shut.get('destroyed', 0)} sandbox(es) destroyed")
                self._leak_check(config)
            finally:
                ray.shutdown()
        return self._summary(stats)

    # ── phases ─────────────────────────────────────────────────────────────

    def _phases(self, pool: Any, address: str) -> None:
        names = [f"agent-{i + 1}" for i in range(self.threads)]
        self.say(f"phase 1: {self.threads} threads, {self.turns} turns each, concurrently")
        run_all(lambda name: self._agent(pool, name, range(1, self.turns + 1)), names, self.threads)
        self.say("phase 2: every thread comes back for another turn (warm reclaim, files kept)")
        run_all(lambda name: self._agent(pool, name, [self.turns + 1]), names, self.threads)
        self._second_process(pool, address, names[0])

    def _acquire(self, pool: Any, thread: str) -> Any:
        started = time.monotonic()
        box = pool.acquire(thread)
        self.latency[box.path].append(time.monotonic() - started)
        return box

    def _agent(self, pool: Any, thread: str, turns: Iterable[int]) -> None:
        for turn in turns:
            started = time.monotonic()
            box = self._acquire(pool, thread)
            took = time.monotonic() - started
            box.write_file(f"{WORKSPACE}/turn-{turn}.txt", f"{thread} turn {turn} value {turn * 10}\n")
            tool = self._acquire(pool, thread)  # a tool call in the same turn finds it active
            result = tool.exec(f"python3 - <<'EOF'\n{PROGRAM}EOF")
            count, total = (int(x) for x in result.output.split()[-2:])
            expected = (turn, sum(10 * k for k in range(1, turn + 1)))
            ok = self.check(f"{thread} turn {turn} program output", (count, total) == expected and result.ok)
            pool.release(box)
            with self._lock:
                self.ops.update({"acquire": 2, "write_file": 1, "exec": 1, "release": 1})
            self.say(
                f"{thread} turn {turn}: {box.path} acquire {took * 1000:.0f}ms, wrote turn-{turn}.txt, "
                f"program read {count} file(s) sum {total} {'ok' if ok else 'FAIL'}"
            )

    def _second_process(self, pool: Any, address: str, thread: str) -> None:
        config = pool.config
        self.say(f"phase 3: a second process acquires {thread!r}")
        command = [sys.executable, "-m", "sandbox_actors.demo", "child", address, config.pool_name,
                   config.namespace, thread]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            self.check("second process ran", False)
            self.say(f"second process failed:\n{done.stderr[-2000:]}")
            return
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        mine = pool.acquire(thread)
        same = seen["sandbox_id"] == mine.sandbox_id and seen["container"] == mine.info.get("container_name")
        files_ok = seen["files"] == self.turns + 1
        back = mine.read_file(f"{WORKSPACE}/from-second-process.txt").strip() == f"pid {seen['pid']}"
        pool.release(mine)
        self.ops.update({"acquire": 2, "read_file": 1, "list_files": 1, "write_file": 1, "release": 2})
        self.check("second process got the same sandbox", same)
        self.check("second process saw every turn's file", files_ok)
        self.check("first process reads what the second wrote", back)
        self.say(f"second process (pid {seen['pid']}): same sandbox {seen['sandbox_id'][:12]} "
                 f"via {seen['path']} acquire {seen['acquire_ms']:.0f}ms, saw {seen['files']} files, "
                 f"wrote one back {'ok' if same and files_ok and back else 'FAIL'}")

    def _leak_check(self, config: Any) -> None:
        import asyncio

        import ray

        from backends import DockerBackend

        async def containers_left() -> list[Any]:
            backend = DockerBackend(config.container_prefix)
            try:
                return await backend.list(config.pool_name)
            finally:
                await backend.close()

        deadline = time.monotonic() + 15
        while True:
            containers = asyncio.run(containers_left())
            actors_left = [a for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["namespace"] == config.namespace]
            if (not containers and not actors_left) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ok = self.check("no container or actor left after shutdown", not containers and not actors_left)
        self.say(f"leak check: {len(containers)} container(s), {len(actors_left)} actor(s) left "
                 f"{'ok' if ok else 'FAIL'}")

    # ── summary ────────────────────────────────────────────────────────────

    def _summary(self, stats: dict[str, Any]) -> int:
        counters = stats.get("counters", {})
        failed = [name for name, ok in self.checks if not ok]
        lines = [
            "",
            "summary",
            f"  sandboxes created {counters.get('created', 0)}, reclaimed warm {counters.get('reclaimed', 0)}, "
            f"evicted {counters.get('evicted', 0)}, failed to start {counters.get('failed', 0)}",
            f"  operations: {sum(self.ops.values())} ({', '.join(f'{k} {v}' for k, v in sorted(self.ops.items()))})",
            "  acquire latency (ms)     n      p50      p95      max",
        ]
        for path in ("cold", "warm", "hot"):
            row = summarize(self.latency.get(path, []))
            lines.append(f"    {path:<20} {row['n']:>3} {row['p50']:>8.1f} {row['p95']:>8.1f} {row['max']:>8.1f}")
        lines.append(f"  checks: {len(self.checks) - len(failed)}/{len(self.checks)} passed")
        lines += [f"    FAILED: {name}" for name in failed]
        self.out("\n".join(lines))
        return 0 if not failed and self.checks else 1


def _child(address: str, pool_name: str, namespace: str, thread: str) -> None:
    """The second process: attach to the same cluster and pool, use the same thread's sandbox."""
    import os

    import ray

    import sandbox_actors

    ray.init(address=address, logging_level=logging.ERROR)
    pool = sandbox_actors.connect(pool_name=pool_name, namespace=namespace)
    started = time.monotonic()
    box = pool.acquire(thread)
    took = time.monotonic() - started
    files = [f for f in box.list_files(WORKSPACE) if f.name.startswith("turn-")]
    box.write_file(f"{WORKSPACE}/from-second-process.txt", f"pid {os.getpid()}\n")
    pool.release(box)
    print(json.dumps({
        "sandbox_id": box.sandbox_id, "container": box.info.get("container_name"), "path": box.path,
        "acquire_ms": took * 1000, "files": len(files), "pid": os.getpid(),
    }))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        _child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m sandbox_actors.demo child ADDRESS POOL NAMESPACE THREAD")
