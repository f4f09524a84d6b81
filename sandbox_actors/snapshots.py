"""Snapshots: a sandbox's filesystem saved as an image of its engine, to start new sandboxes from.

A snapshot holds the container's filesystem as it is (what the agent installed,
wrote to ``/tmp`` or its home), not its processes and not the thread mounts
(those are host directories). Its image is labelled with the pool and the
snapshot's name; its record (engine, node, size, when) is kept in Ray's KV. A
node whose engine lacks the image gets it from the snapshot's engine when a
sandbox starts there (the SandboxActor fetches it through that node's reaper).
Snapshots go with ``snapshot_ttl``, ``remove``, or the pool's shutdown (unless
``keep_snapshots``); images of the pool that no record names are reaped by
reconcile after a grace period (a snapshot being committed has no record yet).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from backends.docker_backend import LABEL_SNAPSHOT, LABEL_SNAPSHOT_CREATED
from backends.network import pool_tag

from backends.base import Capability

from .errors import InvalidRequest, SandboxError, SandboxNotFound
from .lifecycle import Lifecycle
from .operations import OpKind
from .state import SandboxState
from .threads import checkpoint_dir

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ORPHAN_GRACE = 300.0  # seconds an image of the pool may exist with no record (a commit under way)


def image_for(pool: str, name: str) -> str:
    return f"sandbox-actors-snapshot-{pool_tag(pool)}:{name}"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"invalid snapshot name {name!r}: 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


async def take(life: Lifecycle, sandbox_id: str, name: str | None, live: bool = False) -> dict[str, Any]:
    """Snapshot a running sandbox (once no other operation is under way on it); returns its record.

    Raises:
        InvalidRequest: a bad name, or one in use; SandboxNotFound: no such running sandbox;
        NotSupported: the backend cannot (a provisioner); BackendUnavailable: the engine did not answer.
    """
    while life.ops.get(sandbox_id) is not None:
        await life.ops.wait(sandbox_id)
    entry = life.state.entry(sandbox_id)
    if entry is None or entry.actor is None or entry.state not in (SandboxState.ACTIVE, SandboxState.WARM):
        state = "unknown" if entry is None else entry.state.value
        raise SandboxNotFound(f"sandbox {sandbox_id} is not running ({state}); acquire it, then snapshot it")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", entry.thread_id or sandbox_id[:12]).strip(".-") or "sandbox"
    name = validate_name(name or f"{stem[:80]}-{time.strftime('%Y%m%d-%H%M%S')}")
    if name in life.snapshot_records:
        raise InvalidRequest(f"snapshot {name!r} exists already; remove it first or choose another name")
    return await asyncio.shield(life.ops.start(sandbox_id, OpKind.SNAPSHOT, _commit(life, entry, name, live)))


async def _commit(life: Lifecycle, entry: Any, name: str, live: bool = False) -> dict[str, Any]:
    image, created = image_for(life.config.pool_name, name), time.time()
    began = time.monotonic()
    labels = {LABEL_SNAPSHOT: name, LABEL_SNAPSHOT_CREATED: f"{created:.3f}"}
    keep = checkpoint_dir(life.config.base_dir, name) if live else None
    committed = await life.fleet.snapshot(entry.actor, entry.sandbox_id, image, labels, keep)
    record = {"name": name, "image": image, "image_id": committed.get("image_id"), "size": committed.get("size"),
              **({"checkpoint": committed["checkpoint"]} if committed.get("checkpoint") else {}),
              "engine_id": entry.info.get("engine_id"), "node_id": entry.info.get("node_id"), "created": created,
              "sandbox_id": entry.sandbox_id, "thread_id": entry.thread_id,
              "seconds": round(time.monotonic() - began, 3)}
    await asyncio.to_thread(life.records.put_snapshot, name, record)
    life.snapshot_records[name] = record
    life.tally.count("snapshots")
    logger.info("snapshot %s of sandbox %s: %s (%s bytes) in %.2fs", name, entry.sandbox_id, image,
                record["size"], record["seconds"])
    return record


async def refresh(life: Lifecycle) -> dict[str, dict[str, Any]]:
    """The pool's snapshot records, as Ray's KV holds them (a restarted pool finds them there)."""
    life.snapshot_records = await asyncio.to_thread(life.records.snapshots)
    return life.snapshot_records


async def remove(life: Lifecycle, name: str) -> bool:
    """Remove a snapshot's image from every engine that has it, and its record; False when there
    was none.

    Raises:
        InvalidRequest: a sandbox started from it still exists (destroy those first).
        BackendUnavailable: an engine did not answer.
    """
    await refresh(life)
    engines = await life.fleet.engines()
    images = await life.fleet.snapshot_images(engines)
    known = name in life.snapshot_records
    removed_any = False
    for engine_id, listed in images.items():
        for image in listed:
            if image.get("name") != name:
                continue
            if not await life.fleet.remove_image(engines, engine_id, str(image["image"])):
                raise InvalidRequest(
                    f"snapshot {name!r} is in use by a sandbox started from it (on engine {engine_id[:12]}); "
                    "destroy those sandboxes first"
                )
            removed_any = True
    if known:
        await asyncio.to_thread(life.records.drop_snapshot, name)
        life.snapshot_records.pop(name, None)
        life.tally.count("snapshots_removed")
    return known or removed_any


async def remove_all(life: Lifecycle) -> int:
    """Remove every snapshot of the pool (its shutdown), recorded or not (a commit whose record
    was never written: its pool died in between); returns how many images went."""
    removed = 0
    for name in sorted(await refresh(life)):
        try:
            removed += await remove(life, name)
        except SandboxError as exc:
            logger.warning("could not remove snapshot %s: %s", name, exc.message)
    engines = await life.fleet.engines()
    for engine_id, listed in (await life.fleet.snapshot_images(engines)).items():
        for image in listed:
            try:
                removed += await life.fleet.remove_image(engines, engine_id, str(image["image"]))
            except SandboxError as exc:
                logger.warning("could not remove snapshot image %s: %s", image["image"], exc.message)
    return removed


async def reap(life: Lifecycle, engines: dict[str, tuple[Any, str]]) -> int:
    """Snapshots past ``snapshot_ttl`` go; images of the pool that no record names, older than
    the grace period, go too. Returns how many images were removed."""
    if Capability.SNAPSHOT not in life.config.backend.capabilities:
        return 0  # a backend that cannot snapshot has none
    records = await refresh(life)
    ttl, now, removed = life.config.snapshot_ttl, time.time(), 0
    for name, record in list(records.items()):
        if ttl > 0 and now - float(record.get("created") or now) > ttl:
            try:
                removed += await remove(life, name)
                logger.info("snapshot %s expired (snapshot_ttl=%.0fs); removed", name, ttl)
            except SandboxError as exc:
                logger.info("expired snapshot %s not removed yet: %s", name, exc.message)
    for engine_id, listed in (await life.fleet.snapshot_images(engines)).items():
        for image in listed:
            orphan = image.get("name") not in life.snapshot_records
            if orphan and now - float(image.get("created_at") or now) > ORPHAN_GRACE:
                try:
                    if await life.fleet.remove_image(engines, engine_id, str(image["image"])):
                        removed += 1
                        logger.info("removed snapshot image %s that no record names", image["image"])
                except SandboxError as exc:
                    logger.info("could not remove orphaned snapshot image %s: %s", image["image"], exc.message)
    return removed
