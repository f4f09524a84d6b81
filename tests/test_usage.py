"""Per-sandbox usage, the commands' own figures and the audit trail, on real containers: what
`box.usage()`, `sandbox-actors top` and the metrics endpoint say agrees with the engine's own
statistics (`docker stats`), each exec result carries its command's CPU and peak memory, and
`sandbox-actors audit` lists what ran."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import docker
import httpx
import ray

import sandbox_actors
from backends.base import USAGE_CPU_WINDOW, Usage, usage_baseline
from tests.conftest import assert_no_actors_left, wait_until

# Holds ~120 MB resident and burns half a core, 5 ms on and 5 ms off, until killed: a steady figure
# to compare (never throttled at its 1-core limit, with room beside it for the CLI on 2 cores).
LOAD = ("python3 -c \"import time; held = bytearray(120 * 2**20); held[::4096] = b'x' * len(held[::4096])\n"
        "while True:\n end = time.perf_counter() + 0.005\n while time.perf_counter() < end: pass\n"
        " time.sleep(0.005)\"")
# Holds ~80 MB and burns ~0.4 s of CPU, then ends.
HOG = ("python3 -c \"import time; held = bytearray(80 * 2**20); held[::4096] = b'x' * len(held[::4096]); "
       "end = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(0.2)\"")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _engine_stats(container: str) -> dict:
    """`docker stats` of one container, as its CLI prints it (over its own ~1 s window)."""
    out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{json .}}", container],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class _EngineCpu:
    """The engine's CPU counter of one container, read every 50 ms while in use (the Docker API,
    not our code): its CPU percent over any window within."""

    def __init__(self, container: str) -> None:
        self.container, self.samples = container, []  # (time, cpu seconds)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = docker.from_env()
        try:
            while not self._done.is_set():
                stats = client.api.stats(self.container, stream=False, one_shot=True)
                self.samples.append((time.time(), stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9))
                self._done.wait(0.05)
        finally:
            client.close()

    def __enter__(self) -> _EngineCpu:
        self._thread.start()
        wait_until(lambda: self.samples, timeout=10, interval=0.02)
        # A window measured inside may start at an earlier look (at most a window and an actor's
        # sampling interval before): readings from that far back.
        time.sleep(USAGE_CPU_WINDOW + 1.5)
        return self

    def __exit__(self, *exc: object) -> None:
        until = time.time()  # one reading after what was measured inside, to end its windows
        wait_until(lambda: bool(self.samples) and self.samples[-1][0] > until, timeout=5, interval=0.02)
        self._done.set()
        self._thread.join(timeout=10)

    def _at(self, when: float) -> float:
        before = max((s for s in self.samples if s[0] <= when), default=None)
        after = min((s for s in self.samples if s[0] >= when), default=None)
        assert before is not None and after is not None, (
            f"no reading of the engine around {when}: {self.samples[0][0]}..{self.samples[-1][0]}")
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (when - before[0]) / (after[0] - before[0])

    def percent(self, start: float, end: float) -> float:
        return (self._at(end) - self._at(start)) / (end - start) * 100


def _bytes(text: str) -> float:
    """'120.5MiB' -> bytes (docker's units)."""
    number, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", text.strip()).groups()
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit or "B"]
    return float(number) * scale


def _cli(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox_actors.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address}, check=False)


def test_usage_top_and_the_metrics_agree_with_the_engines_statistics(ray_address, config):
    cfg = config.model_copy(update={"usage_interval": 1.0,
                                    "limits": config.limits.model_copy(update={"cpus": 1.0})})
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("busy")
        idle = client.acquire("idle")
        box.start(LOAD)
        assert wait_until(lambda: box.usage().memory_bytes > 120 * 2**20, timeout=30)
        container = box.info["container_name"]
        # Each figure of CPU is compared with the engine's over the same window (the engine's
        # counter read all the while): anything else running here, `docker stats` and our CLI
        # included, takes CPU from the load on 2 cores, so two windows differ.
        with _EngineCpu(container) as counter:
            engine = _engine_stats(container)
            ours = box.usage()
        cpu, memory = float(engine["CPUPerc"].rstrip("%")), _bytes(engine["MemUsage"].split("/")[0])
        ours_then = cpu_then = counter.percent(ours.at - ours.interval, ours.at)
        assert abs(ours.cpu_percent - cpu_then) <= 0.1 * cpu_then, (ours, cpu_then)  # ~50: half a core
        assert abs(ours.cpu_percent - cpu) <= 0.15 * cpu, (ours, engine)  # `docker stats`, a moment before
        assert 35 <= ours.cpu_percent <= 60 and ours.interval >= 1.0, ours
        assert abs(ours.memory_bytes - memory) <= 0.1 * memory, (ours, engine)
        assert ours.memory_limit_bytes == 256 * 2**20 and ours.pids >= 2
        assert ours.cpu_seconds > 0.5 and ours.disk_bytes is not None and ours.commands == 1
        rx, tx = (_bytes(part) for part in engine["NetIO"].split("/"))
        assert abs(ours.net_rx_bytes - rx) <= max(0.1 * rx, 2048) and abs(ours.net_tx_bytes - tx) <= max(0.1 * tx, 2048)

        # `sandbox-actors top`, as a person runs it: the same figures, for both sandboxes.
        with _EngineCpu(container) as counter:
            shown = _cli("top", "--once", "--pool", cfg.pool_name, "--namespace", cfg.namespace, address=ray_address)
            assert shown.returncode == 0, shown.stderr
            line = next(row for row in shown.stdout.splitlines() if row.startswith("busy "))
            assert re.search(r"\b(3\d|4\d|5\d|60)\.\d\b", line), line  # its CPU%
            assert "idle " in shown.stdout and "running" in shown.stdout
            rows = json.loads(_cli("top", "--json", "--pool", cfg.pool_name, "--namespace", cfg.namespace,
                                   address=ray_address).stdout)
        busy = next(r for r in rows if r["thread_id"] == "busy")["usage"]
        cpu_then = counter.percent(busy["at"] - busy["interval"], busy["at"])
        assert abs(busy["cpu_percent"] - cpu_then) <= 0.1 * cpu_then, (busy, cpu_then)
        assert abs(busy["memory_bytes"] - memory) <= 0.1 * memory, (busy, engine)
        print(f"CPU %: usage() {ours.cpu_percent} (the engine over its window {ours_then:.2f}, docker stats {cpu}); "
              f"top --json {busy['cpu_percent']} (the engine over its window {cpu_then:.2f})")
        assert next(r for r in rows if r["thread_id"] == "idle")["usage"]["cpu_percent"] < 5

        # The metrics endpoint: the busy sandbox's memory gauge, set by its actor every second.
        ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
        gauge = re.compile(r'ray_sandbox_actors_sandbox_memory_bytes\{[^}]*thread="busy"[^}]*\} ([\d.e+]+)')

        def exported() -> float | None:
            text = "".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text for port in ports)
            found = [float(v) for v in gauge.findall(text)] if f'pool="{cfg.pool_name}"' in text else []
            return max(found) if found else None

        assert wait_until(lambda: (exported() or 0) > 0.9 * memory, timeout=60, interval=1), exported()
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)


def test_a_cpu_percent_is_measured_over_a_second_at_least():
    def look(at: float, cpu_seconds: float) -> Usage:
        return Usage(at=at, cpu_percent=0, cpu_seconds=cpu_seconds, memory_bytes=0, memory_limit_bytes=0, pids=1,
                     net_rx_bytes=0, net_tx_bytes=0, block_read_bytes=0, block_write_bytes=0)

    assert usage_baseline([], now=100.0) is None  # a first look: the backend looks twice, a window apart
    looks = [look(90.0, 1.0), look(98.5, 2.0), look(99.2, 2.5), look(99.7, 2.7)]
    assert usage_baseline(looks, now=100.0) == looks[1]  # the newest a window old, not the last
    assert usage_baseline(looks[2:], now=100.0) == looks[2]  # none that old: the oldest, waited out
    assert USAGE_CPU_WINDOW >= 1.0


def test_each_exec_result_says_what_its_command_used_and_the_audit_lists_it(ray_address, pool):
    box = pool.acquire("audited")
    result = box.exec(HOG)
    assert result.exit_code == 0
    assert 0.35 <= result.cpu_seconds < 2.0 and 80 * 2**20 <= result.peak_memory_bytes < 400 * 2**20, result
    ran = box.bash("echo $SECRET_TOKEN | wc -c; exit 3", env={"SECRET_TOKEN": "hunter2-do-not-log"})
    assert ran.exit_code == 3 and ran.cpu_seconds is not None
    streamed = list(box.stream("echo streamed"))
    assert streamed[-1].exit_code == 0
    box.start("sleep 0.1")
    trail = box.audit()
    assert [(e["kind"], e["exit_code"]) for e in trail] == [("exec", 0), ("bash", 3), ("stream", 0), ("start", None)]
    assert trail[0]["command"] == HOG and trail[0]["peak_memory_bytes"] >= 80 * 2**20
    assert all("hunter2" not in json.dumps(e) for e in trail)  # bash's env is never recorded
    assert box.usage().commands == 4

    # The trail outlives the actor: after a hibernation, the CLI reads it from the host.
    pool.hibernate(box)
    shown = _cli("audit", "audited", "--json", "--pool", pool.config.pool_name, "--namespace", pool.config.namespace,
                 address=ray_address)
    assert shown.returncode == 0, shown.stderr
    assert [e["kind"] for e in json.loads(shown.stdout)] == ["exec", "bash", "stream", "start"]
    text = _cli("audit", "audited", "--pool", pool.config.pool_name, "--namespace", pool.config.namespace,
                address=ray_address).stdout
    assert "exit 3" in text and "$ echo $SECRET_TOKEN | wc -c; exit 3" in text
    missing = _cli("audit", "never-ran", "--pool", pool.config.pool_name, "--namespace", pool.config.namespace,
                   address=ray_address)
    assert missing.returncode == 3 and "never-ran" in missing.stderr
