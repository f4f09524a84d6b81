"""Metrics through ``ray.util.metrics``, exported on every node's metrics endpoint.

Ray prefixes every name with ``ray_`` on the Prometheus endpoint. Names:

========================================  =========  ====================================
name                                      type       tags
========================================  =========  ====================================
sandbox_actors_sandboxes                  gauge      pool, state (starting/active/warm/stopping)
sandbox_actors_created_total              counter    pool
sandbox_actors_reclaimed_total            counter    pool (warm reclaims)
sandbox_actors_evicted_total              counter    pool (LRU evictions of warm sandboxes)
sandbox_actors_reaped_total               counter    pool (idle timeouts)
sandbox_actors_failed_total               counter    pool (sandboxes that failed to start)
sandbox_actors_readopted_total            counter    pool (containers re-adopted by a new actor)
sandbox_actors_acquire_seconds            histogram  pool, path (hot/warm/cold/adopted)
sandbox_actors_exec_seconds               histogram  pool, op (exec/bash)
sandbox_actors_sandbox_cpu_seconds        gauge      pool, thread, sandbox (CPU used in all)
sandbox_actors_sandbox_cpu_percent        gauge      pool, thread, sandbox (of one core, lately)
sandbox_actors_sandbox_memory_bytes       gauge      pool, thread, sandbox
sandbox_actors_sandbox_pids               gauge      pool, thread, sandbox
sandbox_actors_sandbox_net_rx_bytes       gauge      pool, thread, sandbox
sandbox_actors_sandbox_net_tx_bytes       gauge      pool, thread, sandbox
sandbox_actors_sandbox_commands           gauge      pool, thread, sandbox (commands run)
========================================  =========  ====================================

The per-sandbox gauges are set by each SandboxActor every ``usage_interval`` seconds from its
engine's statistics (the same figures as ``box.usage()``), and set to 0 when its sandbox ends.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from ray.util import metrics

from backends.base import Usage

_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
COUNTERS = {
    "created": "Sandboxes whose container was created.",
    "reclaimed": "Warm sandboxes reclaimed by their thread.",
    "evicted": "Warm sandboxes evicted to stay within replicas.",
    "reaped": "Sandboxes destroyed by the idle timeout.",
    "failed": "Sandboxes that failed to start.",
    "readopted": "Containers whose actor died, re-adopted by a new actor.",
    "hibernated": "Sandboxes hibernated (container stopped with its files, actor ended).",
    "resumed": "Hibernated sandboxes resumed by their thread.",
    "resume_failed": "Hibernated sandboxes that could not be resumed (their thread got a new one).",
    "snapshots": "Snapshots taken.",
}


USAGE_GAUGES = {
    "cpu_seconds": "CPU seconds the sandbox used in all.",
    "cpu_percent": "CPU the sandbox used lately, in percent of one core.",
    "memory_bytes": "Memory the sandbox holds.",
    "pids": "Processes in the sandbox.",
    "net_rx_bytes": "Bytes the sandbox received.",
    "net_tx_bytes": "Bytes the sandbox sent.",
    "commands": "Commands run in the sandbox.",
}


class PoolMetrics:
    """The pool's gauges, counters and acquire histogram (created in the pool's process)."""

    def __init__(self, pool: str) -> None:
        self._tags = {"pool": pool}
        self._last_counts: dict[str, int] = {}
        self._sandboxes = metrics.Gauge(
            "sandbox_actors_sandboxes", "Sandboxes of the pool per state.", tag_keys=("pool", "state")
        )
        self._counters = {
            event: metrics.Counter(f"sandbox_actors_{event}_total", text, tag_keys=("pool",))
            for event, text in COUNTERS.items()
        }
        self._acquire = metrics.Histogram(
            "sandbox_actors_acquire_seconds", "Acquire latency inside the pool.", _LATENCY_BOUNDARIES,
            tag_keys=("pool", "path"),
        )

    def states(self, counts: Mapping[str, int]) -> None:
        """Set the gauge of each state whose count changed (every change of state calls this)."""
        for state, value in counts.items():
            if self._last_counts.get(state) != value:
                self._sandboxes.set(value, {**self._tags, "state": state})
                self._last_counts[state] = value

    def count(self, event: str, amount: int = 1) -> None:
        counter = self._counters.get(event)
        if counter is not None and amount > 0:
            counter.inc(amount, self._tags)

    def acquired(self, path: str, seconds: float) -> None:
        self._acquire.observe(seconds, {**self._tags, "path": path})


class SandboxMetrics:
    """A SandboxActor's command latency histogram."""

    def __init__(self, pool: str) -> None:
        self._tags = {"pool": pool}
        self._exec = metrics.Histogram(
            "sandbox_actors_exec_seconds", "Command latency through the SandboxActor.", _LATENCY_BOUNDARIES,
            tag_keys=("pool", "op"),
        )
        self._usage: dict[str, metrics.Gauge] | None = None  # made at the first look (spares never look)

    def executed(self, op: str, seconds: float) -> None:
        self._exec.observe(seconds, {**self._tags, "op": op})

    def used(self, thread_id: str | None, sandbox_id: str, usage: Usage | None) -> None:
        """Set the sandbox's usage gauges (to 0 when ``usage`` is None: the sandbox ended)."""
        if self._usage is None:
            self._usage = {
                name: metrics.Gauge(f"sandbox_actors_sandbox_{name}", text, tag_keys=("pool", "thread", "sandbox"))
                for name, text in USAGE_GAUGES.items()
            }
        tags = {**self._tags, "thread": thread_id or "", "sandbox": sandbox_id}
        for name, gauge in self._usage.items():
            gauge.set(float(getattr(usage, name)) if usage is not None else 0.0, tags)


class Tally:
    """The pool's event counts (shown by ``stats()``) and, when given, its exported metrics."""

    def __init__(self, metrics_: PoolMetrics | None = None) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self._metrics = metrics_

    def count(self, event: str, amount: int = 1) -> None:
        self.counters[event] += amount
        if self._metrics is not None:
            self._metrics.count(event, amount)

    def states(self, counts: Mapping[str, int]) -> None:
        if self._metrics is not None:
            self._metrics.states(counts)

    def acquired(self, path: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.acquired(path, seconds)
