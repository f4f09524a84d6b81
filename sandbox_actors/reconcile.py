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
    """What a live SandboxActor says about itself (``describe()``)."""

    sandbox_id: str
    started: bool
    container_id: str | None
    engine_id: str | None
    dead_reason: str | None = None
    thread_id: str | None = None
    idle_for: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_description(cls, info: Mapping[str, Any]) -> ActorView:
        return cls(
            sandbox_id=info["sandbox_id"],
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
    repair: list[str] = field(default_factory=list)  # needs a closer look: re-adopt, finish, or clean up
    remove_containers: list[ContainerView] = field(default_factory=list)  # stopped, or a duplicate
    end_actors: list[str] = field(default_factory=list)  # actor whose container is gone
    forget: list[str] = field(default_factory=list)  # pool entry with neither actor nor container

    def is_empty(self) -> bool:
        return not (self.adopt or self.repair or self.remove_containers or self.end_actors or self.forget)


def plan_reconcile(
    known: Iterable[str],
    actors: Mapping[str, ActorView | None],
    containers: Iterable[ContainerView],
    engines_seen: Iterable[str],
    busy: Iterable[str] = (),
) -> ReconcilePlan:
    """Decide, per sandbox id, how to make what exists match what the pool holds.

    Args:
        known: ids the pool has entries for.
        actors: live named SandboxActors; a None value means the actor did not
            answer (unknown: nothing is done to that id this pass).
        containers: every labelled container of the pool, from every engine
            a reaper answered for.
        engines_seen: engines whose container list is complete this pass.
            An actor whose container is not seen is ended only when its engine
            was seen (otherwise the container may just be out of view).
        busy: ids the pool is creating, stopping or repairing right now.
    """
    known, engines_seen, busy = set(known), set(engines_seen), set(busy)
    by_id: dict[str, list[ContainerView]] = {}
    for container in containers:
        by_id.setdefault(container.sandbox_id, []).append(container)
    plan = ReconcilePlan()
    for sandbox_id in sorted(known | set(actors) | set(by_id)):
        if sandbox_id in busy or (sandbox_id in actors and actors[sandbox_id] is None):
            continue
        actor = actors.get(sandbox_id)
        found = by_id.get(sandbox_id, [])
        if actor is None:
            _no_actor(plan, sandbox_id, found, sandbox_id in known)
        elif actor.dead_reason is not None or not actor.started:
            plan.repair.append(sandbox_id)
        else:
            _live_actor(plan, actor, found, engines_seen, sandbox_id in known)
    return plan


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
        plan.end_actors.append(actor.sandbox_id)
        if known:
            plan.forget.append(actor.sandbox_id)
