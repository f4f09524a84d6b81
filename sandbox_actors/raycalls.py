"""Every Ray call our code makes, and the translation of Ray's exceptions into ours.

The bottom layer: it imports no actor class. Awaiting an actor call goes
through :func:`call`, which turns Ray's exceptions into our error types;
cluster facts (nodes, named actors, this process's node and session) come
from here too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import ray
import ray.exceptions

from .errors import SandboxDied, SandboxError

logger = logging.getLogger(__name__)
K = TypeVar("K")


class ActorGone(SandboxDied):
    """The actor behind a sandbox (or the pool) died or was killed."""


class ActorCallTimeout(SandboxError):
    """An actor did not answer within the deadline (it may be unschedulable or stuck)."""

    retryable = True


RAY_CALL_ERRORS = (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


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


def only_unreachable(exc: BaseException) -> bool:
    """Whether an :class:`ActorGone` means unreachable for now (its node's link, say), not dead."""
    return isinstance(exc.__cause__, ray.exceptions.ActorUnavailableError)


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
    except RAY_CALL_ERRORS as exc:
        raise unwrap(exc) from None


async def call_each(refs: Mapping[K, Awaitable[Any]], timeout: float, what: str) -> dict[K, Any]:
    """Await many actor calls at once; each key maps to its result or to the error it raised."""
    keys = list(refs)
    results = await asyncio.gather(*(call(refs[k], timeout, what) for k in keys), return_exceptions=True)
    return dict(zip(keys, results))


def value(ref: Any) -> Any:
    """``ray.get`` for synchronous callers, with our error types."""
    try:
        return ray.get(ref)
    except RAY_CALL_ERRORS as exc:
        raise unwrap(exc) from None


def cancel(ref: Any) -> None:
    """Cancel an actor call in flight (an async actor's coroutine gets CancelledError there);
    nothing happens to one that has ended."""
    try:
        ray.cancel(ref)
    except (ValueError, TypeError, *RAY_CALL_ERRORS) as exc:  # ended already, or its actor is gone
        logger.debug("nothing to cancel: %s", exc)


@functools.cache
def remote_class(cls: type) -> Any:
    """One Ray actor class per Python class, so its definition is exported once."""
    return ray.remote(cls)


def get_actor(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def pools() -> list[tuple[str, str]]:
    """Every live SandboxPool actor of the cluster, in any namespace: (name, namespace)."""
    found = []
    for item in ray.util.list_named_actors(all_namespaces=True):
        handle = get_actor(item["name"], item["namespace"])
        descriptor = getattr(handle, "_ray_actor_creation_function_descriptor", None)
        if descriptor is not None and descriptor.class_name == "PoolActor" \
                and descriptor.module_name == "sandbox_actors.pool":
            found.append((item["name"], item["namespace"]))
    return sorted(found)


def named_by(prefix: str, name: str) -> bool:
    """Whether ``name`` is ``prefix`` and a suffix without a dash (our actors' suffixes are hex):
    pool 'p''s prefix 'sbx-p-' must not take in pool 'p-b''s 'sbx-p-b-<hex>'."""
    return name.startswith(prefix) and "-" not in name[len(prefix):]


def named_actors(namespace: str, prefix: str, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Live named actors in ``namespace`` whose name starts with ``prefix``: name -> handle.

    Handles in ``known`` are reused: looking one up costs a GCS round trip,
    which adds up with a hundred sandboxes on every reconcile pass.
    """
    known = known or {}
    found = {}
    for item in ray.util.list_named_actors(all_namespaces=True):
        name = item["name"]
        if item["namespace"] != namespace or not named_by(prefix, name):
            continue
        handle = known.get(name) or get_actor(name, namespace)
        if handle is not None:
            found[name] = handle
    return found


def kill(handle: Any) -> None:
    """End an actor for good (no restart). Killing a dead actor is fine."""
    try:
        ray.kill(handle, no_restart=True)
    except (ValueError, ray.exceptions.RayError) as exc:
        logger.debug("kill of an actor that is already gone: %s", exc)


def nodes_with(resources: Mapping[str, float]) -> dict[str, str]:
    """Alive nodes that have every resource in ``resources``: node id -> address."""
    nodes = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        if all(have.get(name, 0) >= amount for name, amount in resources.items()):
            nodes[node["NodeID"]] = node.get("NodeManagerAddress", "")
    return nodes


def alive_nodes() -> set[str]:
    """Ids of the nodes Ray considers alive."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def node_addresses() -> list[str]:
    """The addresses of every alive node of the cluster (sandboxes are kept off all of them)."""
    return sorted({node["NodeManagerAddress"] for node in ray.nodes()
                   if node.get("Alive") and node.get("NodeManagerAddress")})


def current_node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def session_name() -> str:
    """This cluster's session (e.g. ``session_2026-11-29_20-14-16_706512_1234``): unique per cluster
    start, and on every node's raylet command line while the cluster lives there."""
    return str(ray._private.worker.global_worker.node.session_name)


def assigned_resources() -> dict[str, float]:
    """The Ray resources this actor holds (none beyond ``ray.resources``: SandboxActors use num_cpus=0)."""
    return {name: amount for name, amount in ray.get_runtime_context().get_assigned_resources().items() if amount}


def wait_first(refs: list[Any]) -> tuple[Any, list[Any]]:
    """The first of ``refs`` to finish (result or error), and the others."""
    ready, rest = ray.wait(refs, num_returns=1)
    return ready[0], rest
