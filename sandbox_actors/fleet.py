"""The pool's hands: its SandboxActors, their spares, one reaper per engine.

:class:`Fleet` is what the pool asks of Ray, as a Protocol: the pool's logic runs on any fleet,
and the unit tests' fake is held to it by the type checker. :class:`RayFleet` does it with Ray:
it does what the pool decides and reports what happened; it decides nothing about sandboxes
(that is :class:`~sandbox_actors.state.PoolState`) and never calls back into the pool.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from backends.base import Mount

from . import raycalls, spawn
from .config import SandboxConfig
from .engines import STOP_TIMEOUT, EngineCalls, Engines
from .errors import SandboxError, SandboxOwned
from .procfs import serves_here
from .raycalls import ActorGone
from .spares import Spares
from .views import ActorView, ContainerView, StartOutcome

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = 3.0
IMAGE_TIMEOUT = 600.0  # committing, saving or loading an image of a few GB
LIVE_TIMEOUT = 300.0  # a live checkpoint of a sandbox holding a few GB of memory
CLAIM_TIMEOUT = 10.0
WATCH_SECONDS = 300.0  # how long one watch call on an actor lasts (the pool calls again while it needs the actor)
OWNER_GRACE = 30.0  # seconds past readiness_timeout to wait for another actor's start of a sandbox


class Fleet(Protocol):
    """What the pool asks of its actors and engines (see :class:`RayFleet`)."""

    prepared: dict[str, dict[str, Any]]

    @property
    def engine_on(self) -> dict[str, str]: ...

    @property
    def spare_count(self) -> int: ...
    @property
    def spares_starting(self) -> int: ...
    @property
    def starts_waiting(self) -> int: ...
    @property
    def keep_names(self) -> set[str]: ...
    def spare_target(self) -> int: ...
    def later(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...
    def start_began(self) -> None: ...
    def start_ended(self) -> None: ...
    async def actor_for(self, node_id: str | None) -> tuple[Any, str, bool]: ...
    def launched(self, name: str) -> None: ...
    async def placed(self, actor: Any, timeout: float) -> bool: ...
    def give_up_spare(self, node_id: str | None) -> bool: ...
    def refill(self) -> None: ...
    async def start(self, actor: Any, sandbox_id: str, thread_id: str | None, resume: bool = False,
                    image: str | None = None, image_from: str | None = None,
                    container_id: str | None = None, mounts: tuple[Mount, ...] = (),
                    checkpoint: str | None = None, restore_from: str | None = None) -> dict[str, Any]: ...
    async def owner_of(self, sandbox_id: str, owner: str) -> tuple[Any, dict[str, Any]]: ...
    async def hibernate(self, actor: Any, sandbox_id: str, live: bool = False) -> dict[str, Any]: ...
    async def snapshot(self, actor: Any, sandbox_id: str, image: str, labels: dict[str, str],
                       keep_checkpoint_in: str | None = None) -> dict[str, Any]: ...
    async def claim(self, actor: Any, thread_id: str | None) -> dict[str, Any]: ...
    async def alive(self, actor: Any, info: dict[str, Any] | None = None) -> bool: ...
    def actor_key(self, actor: Any) -> str: ...
    async def outlives(self, actor: Any, seconds: float) -> bool: ...
    async def describe(self, actor: Any) -> dict[str, Any]: ...
    async def activity(self, actors: dict[str, Any]) -> dict[str, Any]: ...
    async def begin_stop(self, actor: Any, if_idle_for: float) -> bool: ...
    async def cancel_stop(self, actor: Any) -> None: ...
    async def stop(self, actor: Any, sandbox_id: str, recycle_as: tuple[str, str] | None = None) -> bool: ...
    def kill(self, actor: Any) -> None: ...
    async def discard(self, actor: Any) -> None: ...
    async def close(self) -> None: ...
    async def actor_views(self) -> tuple[list[ActorView], dict[str, Any], set[str]]: ...
    def node_id(self) -> str: ...
    async def pool_exists(self, name: str) -> bool: ...
    async def alive_nodes(self) -> set[str]: ...
    def reaper_on(self, node_id: str | None) -> Any: ...
    async def engines(self) -> Engines: ...
    async def prepare(self, engines: Engines, strict: bool) -> None: ...
    async def containers(self, engines: Engines) -> tuple[builtins.list[ContainerView], set[str]]: ...
    async def remove(self, engines: Engines, container: ContainerView) -> bool: ...
    async def probe(self, engines: Engines, container: ContainerView) -> dict[str, Any] | None: ...
    async def remove_everywhere(self, sandbox_id: str, container_id: str | None, engine_id: str | None) -> bool: ...
    async def snapshot_images(self, engines: Engines) -> dict[str, builtins.list[dict[str, Any]]]: ...
    async def remove_image(self, engines: Engines, engine_id: str, image: str) -> bool: ...
    async def sweep(self) -> dict[str, int]: ...


class RayFleet(EngineCalls):
    """The actors and reapers of one pool, through Ray.

    Args:
        config: the pool's config.
    """

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__()
        self._config = config
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget work, kept referenced
        self._named: dict[str, Any] = {}  # the pool's named actors at the last look: name -> handle
        self._here: str | None = None  # the pool's node, once asked
        self.spares = Spares(config, self.later)

    # ── spare actors (see sandbox_actors.spares) ───────────────────────────

    @property
    def spare_count(self) -> int:
        return self.spares.count

    @property
    def spares_starting(self) -> int:
        return self.spares.starting_spares

    @property
    def starts_waiting(self) -> int:
        return self.spares.waiting

    @property
    def keep_names(self) -> set[str]:
        return self.spares.keep_names

    def spare_target(self) -> int:
        return self.spares.target()

    def start_began(self) -> None:
        self.spares.starting += 1  # refills wait for starts: they compete for CPU

    def start_ended(self) -> None:
        self.spares.starting -= 1

    async def actor_for(self, node_id: str | None) -> tuple[Any, str, bool]:
        return await self.spares.actor_for(node_id)

    def launched(self, name: str) -> None:
        self.spares.launched(name)

    def give_up_spare(self, node_id: str | None) -> bool:
        return self.spares.give_up_spare(node_id)

    def refill(self) -> None:
        self.spares.refill()

    async def close(self) -> None:
        """Stop refilling and end the spare actors (for shutdown)."""
        await self.spares.close()

    def later(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ── a sandbox's actor ──────────────────────────────────────────────────

    async def placed(self, actor: Any, timeout: float) -> bool:
        """Whether Ray placed the actor on a node within ``timeout`` (it answers a ping)."""
        try:
            await raycalls.call(actor.ping.remote(), timeout, "placing an actor")
            return True
        except raycalls.ActorCallTimeout:
            return False

    async def start(self, actor: Any, sandbox_id: str, thread_id: str | None, resume: bool = False,
                    image: str | None = None, image_from: str | None = None,
                    container_id: str | None = None, mounts: tuple[Mount, ...] = (),
                    checkpoint: str | None = None, restore_from: str | None = None) -> dict[str, Any]:
        """Have ``actor`` serve ``sandbox_id``: adopt its running container, start its stopped one
        again (``resume``, by its ``container_id`` when known; from its live ``checkpoint`` when
        given), or create one (of a snapshot's
        ``image``, fetched from the reaper named ``image_from`` when this node's engine lacks it;
        mounting ``mounts`` instead of the pool's thread directories when given).

        Answers ``outcome`` owned and the ``owner``'s name when another live actor owns the
        container (nothing served).

        Raises:
            ImageNotFound, ReadinessTimeout, SandboxStartError, ...: the container did not start.
        """
        return await raycalls.call(
            actor.start.remote(sandbox_id, thread_id, resume, image, image_from, container_id, mounts, checkpoint,
                               restore_from),
            self._config.readiness_timeout + 120 + (IMAGE_TIMEOUT if image else 0), f"starting sandbox {sandbox_id}",
        )

    async def hibernate(self, actor: Any, sandbox_id: str, live: bool = False) -> dict[str, Any]:
        """Have the actor stop its container, keeping the filesystem (with ``live``, its processes
        and memory too: the answer's ``checkpoint``), then end the actor.

        Raises:
            ActorGone: the actor is gone; BackendUnavailable: the engine did not stop it;
            NotSupported, SandboxStartError: no live checkpoint (the sandbox serves on).
        """
        info = await raycalls.call(actor.hibernate.remote(live), STOP_TIMEOUT + (LIVE_TIMEOUT if live else 0),
                                   f"hibernate {sandbox_id}")
        raycalls.kill(actor)
        return info

    async def snapshot(self, actor: Any, sandbox_id: str, image: str, labels: dict[str, str],
                       keep_checkpoint_in: str | None = None) -> dict[str, Any]:
        """Commit the sandbox's filesystem as ``image`` (and with ``keep_checkpoint_in``, keep its
        processes and memory there: a live snapshot); returns its id and size."""
        return await raycalls.call(actor.snapshot.remote(image, labels, keep_checkpoint_in),
                                   IMAGE_TIMEOUT + (LIVE_TIMEOUT if keep_checkpoint_in else 0), f"snapshot {sandbox_id}")

    async def owner_of(self, sandbox_id: str, owner: str) -> tuple[Any, dict[str, Any]]:
        """The live actor named ``owner`` that serves ``sandbox_id`` (a start found it owning the
        container), once its own start of it is done (a start cut short by a pool restart may
        still be under way there).

        Raises:
            SandboxOwned: it is gone, serves another sandbox, or did not finish starting this one in time.
        """
        def refused(why: str) -> SandboxOwned:
            return SandboxOwned(f"sandbox {sandbox_id} is owned by live actor {owner}, which {why}", owner=owner)

        handle = await asyncio.to_thread(raycalls.get_actor, owner, self._config.namespace)
        if handle is None:
            raise refused("is gone now")
        deadline = time.monotonic() + self._config.readiness_timeout + OWNER_GRACE
        while True:
            info = await raycalls.call(handle.describe.remote(), DESCRIBE_TIMEOUT, f"describe {owner}")
            if info.get("sandbox_id") != sandbox_id:
                raise refused(f"serves sandbox {info.get('sandbox_id')} now")
            if info.get("started"):
                return handle, {**info, "adopted": True, "outcome": StartOutcome.ADOPTED.value}
            if time.monotonic() > deadline:
                raise refused("did not finish starting it in time")
            await asyncio.sleep(0.2)

    async def claim(self, actor: Any, thread_id: str | None) -> dict[str, Any]:
        return await raycalls.call(actor.claim.remote(thread_id), CLAIM_TIMEOUT, "claim a spare")

    async def alive(self, actor: Any, info: dict[str, Any] | None = None) -> bool:
        """Whether the sandbox's actor lives and its container runs (a cheap check). On the pool's
        own node, ``info`` (what the actor said when it last answered) settles it without a call
        when the actor's process and the container's first process are still the ones it named:
        the check the actor itself makes, from here (a call is ~1.3 ms of a warm reclaim's ~3).
        Anywhere else, or when either process is not the one named, the actor is asked."""
        if self._here is None:
            self._here = self.node_id()
        if info is not None and serves_here(info, self._here):
            return True
        try:
            return bool(await raycalls.call(actor.alive.remote(), DESCRIBE_TIMEOUT, "alive"))
        except SandboxError:
            return False

    @staticmethod
    def actor_key(actor: Any) -> str:
        """The same key for every handle of one actor (a handle looked up again is another object)."""
        return str(actor._actor_id.hex())

    async def outlives(self, actor: Any, seconds: float) -> bool:
        """False as soon as Ray reports the actor dead; True once ``seconds`` have passed, or when
        the call went unanswered or Ray calls the actor unreachable for now (a slow or cut-off node
        is the reconcile's to judge)."""
        try:
            await raycalls.call(actor.watched.remote(seconds), seconds + DESCRIBE_TIMEOUT, "watch")
        except ActorGone as exc:
            if not raycalls.only_unreachable(exc):
                return False
            logger.debug("watched actor unreachable for now: %s", exc)
        except SandboxError as exc:
            logger.debug("watch of an actor ended without an answer: %s", exc)
        return True

    async def describe(self, actor: Any) -> dict[str, Any]:
        return await raycalls.call(actor.describe.remote(), DESCRIBE_TIMEOUT, "describe")

    async def activity(self, actors: dict[str, Any]) -> dict[str, Any]:
        """Sandbox id -> (idle seconds, operations in flight, dead reason), or the error it raised."""
        return await raycalls.call_each({sid: a.activity.remote() for sid, a in actors.items()}, DESCRIBE_TIMEOUT,
                                        "activity")

    async def begin_stop(self, actor: Any, if_idle_for: float) -> bool:
        """Ask the sandbox to stop serving if it has been idle that long; False when it is busy."""
        return bool(await raycalls.call(actor.begin_stop.remote(if_idle_for), DESCRIBE_TIMEOUT, "begin stop"))

    async def cancel_stop(self, actor: Any) -> None:
        await raycalls.call(actor.cancel_stop.remote(), DESCRIBE_TIMEOUT, "cancel stop")

    async def stop(self, actor: Any, sandbox_id: str, recycle_as: tuple[str, str] | None = None) -> bool:
        """Have the actor remove its container, then end it; or, given its (name, node) in
        ``recycle_as`` while a spare is wanted (and no node slots are configured), keep it as a
        spare (its process is reused: no Ray worker start for the next new sandbox).

        Raises:
            ActorGone: the actor is gone (its container may still exist).
            BackendUnavailable: the engine did not answer; nothing was removed.
        """
        # Not with node slots (ray.resources): a stop may be what frees a slot another sandbox waits for.
        spares = self.spares
        recycle = recycle_as is not None and not self._config.ray.resources and not spares.closed and spares.wanted()
        held = spares.holding(recycle_as[0], actor) if recycle and recycle_as else contextlib.nullcontext()
        with held:  # serving nothing for a moment: reconcile must keep it
            stopped = await raycalls.call(actor.stop.remote(sandbox_id, recycle), STOP_TIMEOUT, f"stop {sandbox_id}")
        if stopped is None:
            return True  # it serves another sandbox now (kept for it after this one's stop): leave it be
        if recycle and stopped and recycle_as is not None and not spares.closed:
            spares.keep(actor, *recycle_as)
            return True
        raycalls.kill(actor)
        return bool(stopped)

    @staticmethod
    def kill(actor: Any) -> None:
        raycalls.kill(actor)

    async def discard(self, actor: Any) -> None:
        """Make sure an actor we gave up on leaves nothing behind."""
        with contextlib.suppress(SandboxError):
            await raycalls.call(actor.stop.remote(), STOP_TIMEOUT, "discarding a failed sandbox")
        raycalls.kill(actor)

    # ── what exists ───────────────────────────────────────────────────────

    async def actor_views(self) -> tuple[list[ActorView], dict[str, Any], set[str]]:
        """Every live SandboxActor of the pool: (views, handles by name, names that did not answer)."""
        named = await asyncio.to_thread(spawn.sandbox_actors, self._config, self._named)
        self._named = named
        described = await raycalls.call_each(
            {name: handle.describe.remote() for name, handle in named.items()}, DESCRIBE_TIMEOUT, "describe"
        )
        views, unknown = [], set()
        for name, result in described.items():
            if isinstance(result, ActorGone):
                continue
            if isinstance(result, BaseException):
                unknown.add(name)
                # One the fleet is starting may still wait for its worker process (on a busy node,
                # seconds): expected, and no cause for alarm.
                log = logger.info if self.spares.launching(name) else logger.warning
                log("SandboxActor %s did not answer: %s", name, result)
                continue
            views.append(ActorView.from_description(result))
        return views, named, unknown

