"""What a pool shows of itself: its sandboxes as rows, its totals and its isolation.

Read-only views over the pool's state, its lifecycle's counters and its fleet; the pool's
``list`` and ``stats`` calls return them as plain dicts (for tables and JSON).
"""

from __future__ import annotations

import os
from typing import Any

from backends.base import Capability

from .config import SandboxConfig
from .lifecycle import Lifecycle
from .state import PoolState


async def rows(life: Lifecycle, state: PoolState) -> list[dict[str, Any]]:
    """Every sandbox the pool holds, with the activity its actors report now (silent ones show
    what was last known)."""
    served = {e.sandbox_id: e.actor for e in state.entries.values() if e.actor is not None}
    for sandbox_id, report in (await life.fleet.activity(served)).items():
        if not isinstance(report, BaseException):
            state.note_activity(sandbox_id, report[0], report[1])
    now = state.clock()
    return [
        {"sandbox_id": entry.sandbox_id, "thread_id": entry.thread_id, "state": entry.state.value,
         "node_id": entry.info.get("node_id"), "container_name": entry.info.get("container_name"),
         "url": entry.info.get("url"), "age_s": round(now - entry.created_at, 3),
         "idle_s": round(now - entry.last_active, 3), "inflight": entry.inflight,
         "hibernated_s": None if entry.hibernated_at is None else round(now - entry.hibernated_at, 3),
         "checkpoint_bytes": (entry.info.get("checkpoint") or {}).get("bytes"), "image": entry.image,
         "actor_name": entry.info.get("actor_name") if entry.actor is not None else None}
        for entry in state.entries.values()
    ]


def stats(config: SandboxConfig, life: Lifecycle, state: PoolState) -> dict[str, Any]:
    """Totals per state, counters since the pool (re)started, and its isolation."""
    fleet = life.fleet
    return {
        "pool": config.pool_name, "namespace": config.namespace, "states": state.counts(),
        "total": len(state.entries), "replicas": config.replicas, "max_sandboxes": config.max_sandboxes,
        "spare_actors": fleet.spare_count, "spare_target": fleet.spare_target(),
        "spares_starting": fleet.spares_starting, "starts_waiting": fleet.starts_waiting,
        "capacity_waits": life.capacity_waits, "pid": os.getpid(),
        "counters": dict(life.tally.counters), "isolation": isolation(config, life),
    }


def isolation(config: SandboxConfig, life: Lifecycle) -> dict[str, Any]:
    """How the pool's sandboxes are kept apart: as its backend decides, or (docker) the network
    policy, runtime, user and root filesystem, and what each engine was prepared with."""
    if Capability.NETWORK_POLICY not in config.backend.capabilities:
        return {"network": "decided by the backend", "runtime": "decided by the backend"}
    return {
        "network": config.network.policy().describe(), "runtime": config.runtime or "default",
        "user": config.user, "read_only_rootfs": config.read_only_rootfs,
        "engines": {engine[:12]: info for engine, info in life.fleet.prepared.items()},
    }
