"""Every Ray call of the pool and the client, and every actor's options, in one place.

Actor classes stay undecorated; the factories here apply
``ray.remote(...).options(...)``. Awaiting an actor call goes through
:func:`call`, which turns Ray's exceptions into ours.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import ray
import ray.exceptions
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import SandboxConfig
from .errors import SandboxDied, SandboxError

logger = logging.getLogger(__name__)
K = TypeVar("K")

SANDBOX_ACTOR_PREFIX = "sbx-"
HEAD_RESOURCE = "node:__internal_head__"
REAPER_PREFIX = "reaper-"


class ActorGone(SandboxDied):
    """The actor behind a sandbox (or the pool) died or was killed."""


class ActorCallTimeout(SandboxError):
    """An actor did not answer within the deadline (it may be unschedulable or stuck)."""

    retryable = True


def unwrap(exc: BaseException) -> BaseException:
    """The error a user should see for an exception raised by an actor call."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, SandboxError):
            return cause
        # Not one of ours: a bug or a library error inside an actor. Keep it typed for callers.
        wrapped = SandboxError(f"unexpected {type(cause).__name__} inside an actor: {cause}")
        wrapped.__cause__ = cause if isinstance(cause, BaseException) else exc
        return wrapped
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        gone = ActorGone(f"actor is gone: {exc.__class__.__name__}")
        gone.__cause__ = exc
        return gone
    return exc


async def call(ref: Awaitable[Any], timeout: float | None = None, what: str = "actor call") -> Any:
    """Await an ObjectRef with an optional deadline, raising our error types.

    Raises:
        ActorCallTimeout: no answer within ``timeout``.
        ActorGone: the actor died.
        SandboxError: whatever typed error the actor raised.
    """
    try:
        if timeout is None:
            return await ref
        return await asyncio.wait_for(ref, timeout)
    except asyncio.TimeoutError:
        raise ActorCallTimeout(f"{what}: no answer within {timeout:.1f}s") from None
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise unwrap(exc) from None


async def call_each(refs: Mapping[K, Awaitable[Any]], timeout: float, what: str) -> dict[K, Any]:
    """Await many actor calls at once; each key maps to its result or to the error it raised."""
    keys = list(refs)
    results = await asyncio.gather(*(call(refs[k], timeout, what) for k in keys), return_exceptions=True)
    return dict(zip(keys, results))


@functools.cache
def _remote(cls: type) -> Any:
    """One Ray actor class per Python class, so its definition is exported once."""
    return ray.remote(cls)


def spawn_sandbox_actor(config: SandboxConfig, node_id: str | None = None) -> tuple[Any, str]:
    """Create a SandboxActor with a fresh name; it serves no sandbox until ``start``.

    ``node_id`` pins it to one node: used to re-adopt a container that
    already runs on that node's engine. Returns (handle, name).
    """
    from .sandbox import SandboxActor

    name = f"{SANDBOX_ACTOR_PREFIX}{config.pool_name}-{uuid.uuid4().hex[:16]}"
    options: dict[str, Any] = {
        "name": name,
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
    return _remote(SandboxActor).options(**options).remote(config, name), name


def get_actor(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def list_sandbox_actors(config: SandboxConfig, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The pool's live named SandboxActors: actor name -> handle.

    Handles in ``known`` are reused: looking one up costs a GCS round trip,
    which adds up with a hundred sandboxes on every reconcile pass.
    """
    prefix = f"{SANDBOX_ACTOR_PREFIX}{config.pool_name}-"
    known = known or {}
    found = {}
    for item in ray.util.list_named_actors(all_namespaces=True):
        name = item["name"]
        if item["namespace"] != config.namespace or not name.startswith(prefix):
            continue
        handle = known.get(name) or get_actor(name, config.namespace)
        if handle is not None:
            found[name] = handle
    return found


def kill(handle: Any) -> None:
    """End an actor for good (no restart). Killing a dead actor is fine."""
    try:
        ray.kill(handle, no_restart=True)
    except (ValueError, ray.exceptions.RayError) as exc:
        logger.debug("kill of an actor that is already gone: %s", exc)


def sandbox_nodes(config: SandboxConfig) -> dict[str, str]:
    """Alive nodes that can host sandboxes (have every configured resource): node id -> address."""
    wanted = config.ray.resources
    nodes = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        if all(have.get(name, 0) >= amount for name, amount in wanted.items()):
            nodes[node["NodeID"]] = node.get("NodeManagerAddress", "")
    return nodes


def node_addresses() -> list[str]:
    """The addresses of every alive node of the cluster (sandboxes are kept off all of them)."""
    return sorted({node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")
                   and node.get("NodeManagerAddress")})


def alive_nodes() -> set[str]:
    """Ids of the nodes Ray considers alive."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def spawn_reaper(config: SandboxConfig, node_id: str) -> Any:
    """The reaper pinned to ``node_id`` (created when missing)."""
    from .reaper import NodeReaper

    return (
        _remote(NodeReaper)
        .options(
            name=f"{REAPER_PREFIX}{config.pool_name}-{node_id[:16]}",
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=0,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(config)
    )


def list_reapers(config: SandboxConfig) -> list[Any]:
    prefix = f"{REAPER_PREFIX}{config.pool_name}-"
    handles = []
    for item in ray.util.list_named_actors(all_namespaces=True):
        if item["namespace"] == config.namespace and item["name"].startswith(prefix):
            handle = get_actor(item["name"], config.namespace)
            if handle is not None:
                handles.append(handle)
    return handles


def pool_actor(config: SandboxConfig) -> Any:
    """Get or create the pool named in ``config`` (any process may call this)."""
    from .pool import SandboxPool

    return (
        _remote(SandboxPool)
        .options(
            name=config.pool_name,
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            # Every head node has this resource; a sliver of it pins the pool there.
            resources={HEAD_RESOURCE: 0.001} if config.ray.pool_on_head else {},
            max_restarts=-1,
            max_concurrency=1000,
        )
        .remote(config)
    )


def _shut_down_key(config: SandboxConfig) -> bytes:
    return f"sandbox-actors/shut-down/{config.pool_name}".encode()


def mark_shut_down(config: SandboxConfig) -> None:
    """Record that the pool was shut down on purpose, so clients do not bring it back by retrying."""
    internal_kv._internal_kv_put(_shut_down_key(config), b"1", namespace=config.namespace)


def clear_shut_down(config: SandboxConfig) -> None:
    internal_kv._internal_kv_del(_shut_down_key(config), namespace=config.namespace)


def was_shut_down(config: SandboxConfig) -> bool:
    return bool(internal_kv._internal_kv_exists(_shut_down_key(config), namespace=config.namespace))


def _claim_key(config: SandboxConfig, sandbox_id: str) -> bytes:
    return f"sandbox-actors/claims/{config.pool_name}/{sandbox_id}".encode()


def put_claim(config: SandboxConfig, sandbox_id: str, thread_id: str) -> None:
    """Record, in Ray's GCS (out of the sandboxes' reach), that a pre-warmed sandbox serves ``thread_id``.

    It outlives the pool and the sandbox's actor, so a container re-adopted
    after both died still goes back to the thread that claimed it.
    """
    internal_kv._internal_kv_put(_claim_key(config, sandbox_id), thread_id.encode(), namespace=config.namespace)


def get_claim(config: SandboxConfig, sandbox_id: str) -> str | None:
    value = internal_kv._internal_kv_get(_claim_key(config, sandbox_id), namespace=config.namespace)
    return None if value is None else value.decode()


def drop_claim(config: SandboxConfig, sandbox_id: str) -> None:
    internal_kv._internal_kv_del(_claim_key(config, sandbox_id), namespace=config.namespace)


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def assigned_resources() -> dict[str, float]:
    """The Ray resources this actor holds (none beyond ``ray.resources``: SandboxActors use num_cpus=0)."""
    return {name: amount for name, amount in ray.get_runtime_context().get_assigned_resources().items() if amount}
