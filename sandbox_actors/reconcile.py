"""Reconcile rules, as a pure function: what exists vs what the pool believes.

The pool gathers three views (its own entries, live SandboxActors, labelled
containers from one reaper per engine) and :func:`plan_reconcile` says what to
do with each sandbox id. The pool carries the plan out; ids it is busy with
(starting, stopping, repairing) are left alone this pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ActorView:
    """What a live SandboxActor says about itself (``describe()``); ``sandbox_id`` None: a spare."""

    name: str
    sandbox_id: str | None
    started: bool
    container_id: str | None = None
    engine_id: str | None = None
    dead_reason: str | None = None
    thread_id: str | None = None
    idle_for: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_description(cls, info: Mapping[str, Any]) -> ActorView:
        return cls(
            name=info["actor_name"],
            sandbox_id=info.get("sandbox_id"),
            started=bool(info.get("started")),
            container_id=info.get("container_id"),
            engine_id=info.get("engine_id"),
            dead_reason=info.get("dead_reason"),
            thread_id=info.get("thread_id"),
            idle_for=float(info.get("idle_for") or 0.0),
            info=dict(info),
        )


@dataclass(frozen=True)
class ContainerView:
    """A labelled container as a reaper lists it."""

    sandbox_id: str
    container_id: str
    running: bool
    engine_id: str
    node_id: str
    thread_id: str | None = None


@dataclass
class ReconcilePlan:
    adopt: list[ActorView] = field(default_factory=list)  # live pair the pool did not know: park it warm
    repair: list[str] = field(default_factory=list)  # sandbox ids needing a closer look: re-adopt, finish, clean up
    remove_containers: list[ContainerView] = field(default_factory=list)  # stopped, or a duplicate
    end_actors: list[str] = field(default_factory=list)  # actor names: container gone, duplicate, stray spare
    forget: list[str] = field(default_factory=list)  # pool entry with neither actor nor container

    def is_empty(self) -> bool:
        return not (self.adopt or self.repair or self.remove_containers or self.end_actors or self.forget)


def plan_reconcile(
    known: Iterable[str],
    actors: Iterable[ActorView],
    containers: Iterable[ContainerView],
    engines_seen: Iterable[str],
    busy: Iterable[str] = (),
    keep_names: Iterable[str] = (),
    any_unknown: bool = False,
) -> ReconcilePlan:
    """Decide, per sandbox id, how to make what exists match what the pool holds.

    Args:
        known: sandbox ids the pool has entries for.
        actors: live SandboxActors that answered.
        containers: every labelled container of the pool, from every engine
            a reaper answered for.
        engines_seen: engines whose container list is complete this pass.
            An actor whose container is not seen is ended only when its engine
            was seen (otherwise the container may just be out of view).
        busy: sandbox ids the pool is creating, stopping or repairing right now.
        keep_names: actors the pool holds without a sandbox (spares, ones being started).
        any_unknown: some actor did not answer. Its sandbox is unknown, so this
            pass re-adopts nothing and forgets nothing (that actor may own it).
    """
    known, engines_seen, busy, keep_names = set(known), set(engines_seen), set(busy), set(keep_names)
    plan = ReconcilePlan()
    owners: dict[str, ActorView] = {}
    by_id: dict[str, list[ContainerView]] = {}
    for container in containers:
        by_id.setdefault(container.sandbox_id, []).append(container)
    for actor in actors:
        if actor.sandbox_id is None:
            if actor.name not in keep_names:
                plan.end_actors.append(actor.name)  # a spare nobody holds (e.g. from a dead pool)
            continue
        _pick_owner(plan, owners, actor, by_id.get(actor.sandbox_id, []))
    for sandbox_id in sorted(known | set(owners) | set(by_id)):
        if sandbox_id in busy:
            continue
        actor = owners.get(sandbox_id)
        found = by_id.get(sandbox_id, [])
        if actor is None:
            if not any_unknown:
                _no_actor(plan, sandbox_id, found, sandbox_id in known)
        elif actor.dead_reason is not None or not actor.started:
            plan.repair.append(sandbox_id)
        else:
            _live_actor(plan, actor, found, engines_seen, sandbox_id in known)
    return plan


def _pick_owner(
    plan: ReconcilePlan, owners: dict[str, ActorView], actor: ActorView, found: list[ContainerView]
) -> None:
    """Two actors claiming one sandbox: the one whose container runs keeps it, the other ends."""
    current = owners.get(actor.sandbox_id)
    if current is None:
        owners[actor.sandbox_id] = actor
        return
    running = {c.container_id for c in found if c.running}
    keep, drop = (actor, current) if actor.container_id in running and current.container_id not in running else (
        current, actor
    )
    owners[actor.sandbox_id] = keep
    plan.end_actors.append(drop.name)


def _no_actor(plan: ReconcilePlan, sandbox_id: str, found: list[ContainerView], known: bool) -> None:
    running = [c for c in found if c.running]
    plan.remove_containers += [c for c in found if not c.running]
    if running:
        plan.repair.append(sandbox_id)  # probe; re-adopt with a new actor, or remove
    elif known:
        plan.forget.append(sandbox_id)


def _live_actor(
    plan: ReconcilePlan, actor: ActorView, found: list[ContainerView], engines_seen: set[str], known: bool
) -> None:
    own = [c for c in found if c.container_id == actor.container_id]
    # Never two containers for one sandbox: the live actor's own one wins.
    plan.remove_containers += [c for c in found if c.container_id != actor.container_id]
    if own and own[0].running:
        if not known:
            plan.adopt.append(actor)
    elif own:
        plan.repair.append(actor.sandbox_id)  # its container stopped: clean both up
    elif actor.engine_id in engines_seen:
        plan.end_actors.append(actor.name)
        if known:
            plan.forget.append(actor.sandbox_id)
