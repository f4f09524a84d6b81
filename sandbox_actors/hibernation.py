"""Resume, expiry and rediscovery of hibernated sandboxes (hibernating itself is a kind of stop:
:meth:`~sandbox_actors.lifecycle.Lifecycle.hibernate_later`).

A hibernated sandbox's container is stopped with its filesystem kept and its
actor ended; the same container starts again under a new actor on its node when
its thread comes back. What is hibernated is recorded in Ray's KV, so a
restarted pool keeps those stopped containers instead of reaping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .errors import BackendUnavailable, PoolExhausted, SandboxError, SandboxNotFound
from .lifecycle import Lifecycle, lease
from .operations import OpKind
from .state import Entry
from .views import Lease

logger = logging.getLogger(__name__)


def resume_later(life: Lifecycle, entry: Entry) -> asyncio.Task[Lease | None]:
    """Start a RESUMING sandbox's container again under a new actor on its node (the 'resume'
    operation). The task returns None when it could not be resumed: the sandbox is removed then
    and the acquire starts a fresh one."""
    return life.ops.start(entry.sandbox_id, OpKind.RESUME, resume(life, entry))


async def resume(life: Lifecycle, entry: Entry) -> Lease | None:
    sandbox_id = entry.sandbox_id
    began = time.monotonic()
    try:
        actor, info = await _start_on_its_engine(life, entry)
    except (PoolExhausted, BackendUnavailable):
        life.state.resume_failed(sandbox_id)  # no room on its node, or its engine away: it sleeps on
        raise
    except SandboxError as exc:
        logger.warning("sandbox %s could not be resumed (%s); its thread gets a new sandbox", sandbox_id,
                       exc.message)
        await _remove_asleep(life, entry)
        life.tally.count("resume_failed")
        return None
    await asyncio.to_thread(life.records.drop_hibernated, sandbox_id)
    resumed = life.state.resumed(sandbox_id, actor, info)
    if resumed is None:  # let go of meanwhile (shutting down)
        life.fleet.later(life.fleet.discard(actor))
        return None
    life.tally.count("resumed")
    logger.info("sandbox %s resumed in %.2fs", sandbox_id, time.monotonic() - began)
    return lease(resumed, "resumed")


async def _start_on_its_engine(life: Lifecycle, entry: Entry) -> tuple[Any, dict[str, Any]]:
    """The stopped container started again under a new actor on a node that reaches its engine:
    the node it slept on first, then any other on the same engine (nodes may share one). A node
    lost a moment ago can still answer and be listed alive, and an actor pinned there is never
    placed: so no room on one node means trying the next."""
    nodes = await _nodes_with_engine(life, entry.info.get("engine_id"), entry.info.get("node_id"))
    for index, node_id in enumerate(nodes):
        try:
            return await life.start_sandbox(entry.sandbox_id, entry.thread_id, node_id=node_id, resume=True,
                                            container_id=entry.container_id, checkpoint=_checkpoint_of(entry))
        except PoolExhausted as exc:
            if index == len(nodes) - 1:
                raise
            logger.info("sandbox %s: no room on node %s to resume it (%s); trying node %s", entry.sandbox_id,
                        node_id[:12], exc.message, nodes[index + 1][:12])
    raise AssertionError("unreachable: _nodes_with_engine returns at least one node")


def _checkpoint_of(entry: Entry) -> str | None:
    """The live checkpoint a hibernated sandbox's resume restores, if it has one."""
    checkpoint = entry.info.get("checkpoint")
    return str(checkpoint["name"]) if isinstance(checkpoint, dict) and checkpoint.get("name") else None


async def _nodes_with_engine(life: Lifecycle, engine_id: str | None, was_on: str | None) -> list[str]:
    """The live nodes whose reapers reach the engine that holds the stopped container, the one
    it slept on first. From the engines as last looked up when its own node is among them and
    Ray lists it alive (a resume waits for this: asking every reaper again cost ~4 ms, Ray's
    node list ~0.5 ms); else looked up again.

    Raises:
        SandboxNotFound: its node is gone and no live node reaches its engine (lost with the node).
        BackendUnavailable: its node lives but its engine does not answer now (retry later).
    """
    known = [node for node, engine in life.fleet.engine_on.items() if engine == engine_id]
    if was_on in known:
        alive = await life.fleet.alive_nodes()
        if was_on in alive:
            return sorted((node for node in known if node in alive), key=lambda node: node != was_on)
    engines = await life.fleet.engines()
    if engine_id is not None and engine_id in engines:
        nodes = sorted(node for node, engine in life.fleet.engine_on.items() if engine == engine_id)
        return sorted(nodes, key=lambda node: node != was_on) or [engines[engine_id][1]]
    if was_on in await life.fleet.alive_nodes():
        raise BackendUnavailable(f"the engine that holds the hibernated container (node {str(was_on)[:12]}) does "
                                 "not answer; retry")
    raise SandboxNotFound(f"its node {str(was_on)[:12]} is gone and no live node reaches its engine")


async def _remove_asleep(life: Lifecycle, entry: Entry) -> None:
    """A hibernated sandbox is given up: its stopped container (where its engine still answers)
    and its records go."""
    with contextlib.suppress(SandboxError):
        await life.fleet.remove_everywhere(entry.sandbox_id, entry.container_id, entry.info.get("engine_id"))
    if life.state.entry(entry.sandbox_id) is not None:
        life.state.removed(entry.sandbox_id)
    await asyncio.to_thread(life.records.drop_hibernated, entry.sandbox_id)


def expire(life: Lifecycle) -> None:
    """Remove hibernated sandboxes past ``hibernate_ttl`` and the oldest beyond ``max_hibernated``."""
    config = life.config
    for entry in life.state.expired_hibernated(config.hibernate_ttl, config.max_hibernated):
        if life.ops.get(entry.sandbox_id) is None:
            logger.info("hibernated sandbox %s expired; removing it", entry.sandbox_id)
            life.stop_later(entry)


def load(life: Lifecycle, records: dict[str, dict[str, Any]], changed: set[str]) -> None:
    """Hibernated sandboxes a previous pool recorded (``records``, from Ray's KV) become entries
    again. Call after the last await of a reconcile pass: ``changed`` are ids the pool touched
    since the records were read."""
    now = time.time()
    for sandbox_id, record in records.items():
        if sandbox_id in changed or life.state.entry(sandbox_id) is not None:
            continue
        info = {key: record.get(key) for key in ("container_id", "engine_id", "node_id", "container_name", "checkpoint")
                if key != "checkpoint" or record.get(key)}
        thread_id = record.get("thread_id")
        since = float(record.get("since") or now)
        life.state.hibernated_found(sandbox_id, str(thread_id) if thread_id else None, info, now - since)
