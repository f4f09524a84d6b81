"""Every actor's Ray options, in one place: names, namespaces, lifetimes, resources, placement.

Actor classes stay undecorated; :mod:`sandbox_actors.spawn` (SandboxActors,
reapers) and :func:`sandbox_actors.client.pool_actor` (the pool) apply these.
"""

from __future__ import annotations

import uuid
from typing import Any

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import SandboxConfig

SANDBOX_ACTOR_PREFIX = "sbx-"
REAPER_PREFIX = "reaper-"
HEAD_RESOURCE = "node:__internal_head__"


def sandbox_actor_prefix(config: SandboxConfig) -> str:
    return f"{SANDBOX_ACTOR_PREFIX}{config.pool_name}-"


def reaper_prefix(config: SandboxConfig) -> str:
    return f"{REAPER_PREFIX}{config.pool_name}-"


def sandbox_actor_options(config: SandboxConfig, node_id: str | None = None) -> dict[str, Any]:
    """A SandboxActor with a fresh name (it learns its sandbox from ``start``); ``node_id`` pins it
    there (to re-adopt a container on that node's engine)."""
    options: dict[str, Any] = {
        "name": f"{sandbox_actor_prefix(config)}{uuid.uuid4().hex[:16]}",
        "namespace": config.namespace,
        "lifetime": "detached",
        "max_restarts": 0,  # the pool recreates sandboxes, Ray does not
        "num_cpus": 0,
        "resources": dict(config.ray.resources),
    }
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    elif config.ray.scheduling == "spread":
        options["scheduling_strategy"] = "SPREAD"
    return options


def reaper_name(config: SandboxConfig, node_id: str) -> str:
    return f"{reaper_prefix(config)}{node_id[:16]}"


def reaper_options(config: SandboxConfig, node_id: str) -> dict[str, Any]:
    """The reaper of one node (shared by every caller: get_if_exists)."""
    return {
        "name": reaper_name(config, node_id),
        "namespace": config.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": 0,
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }


def pool_options(config: SandboxConfig) -> dict[str, Any]:
    """The pool: named, detached, restarted by Ray, any process may "create" it."""
    return {
        "name": config.pool_name,
        "namespace": config.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        # Every head node has this resource; a sliver of it pins the pool there.
        "resources": {HEAD_RESOURCE: 0.001} if config.ray.pool_on_head else {},
        "max_restarts": -1,
        "max_concurrency": 1000,
    }
