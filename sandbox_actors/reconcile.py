"""Reconcile and repair rules, as pure functions: what exists vs what the pool believes.

The pool gathers three views (its own entries, live SandboxActors, labelled
containers from one reaper per engine) and :func:`plan_reconcile` says what to
do with each sandbox id; ids it is busy with (starting, stopping, repairing)
are left alone this pass. :func:`plan_repair` decides, for one sandbox looked
at closely, how to make it whole or make it gone. The reconciler
(:mod:`sandbox_actors.reconciler`) carries the plans out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .views import ActorView, ContainerView

__all__ = ["ActorView", "AsleepPlan", "ContainerView", "ReconcilePlan", "RepairFacts", "RepairPlan", "plan_asleep",
           "plan_reconcile", "plan_repair", "repair_needs_probe"]


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
        _pick_owner(plan, owners, actor.sandbox_id, actor, by_id.get(actor.sandbox_id, []))
    for sandbox_id in sorted(known | set(owners) | set(by_id)):
        if sandbox_id in busy:
            continue
        owner = owners.get(sandbox_id)
        found = by_id.get(sandbox_id, [])
        if owner is None:
            if not any_unknown:
                _no_actor(plan, sandbox_id, found, sandbox_id in known)
        elif owner.dead_reason is not None or not owner.started:
            plan.repair.append(sandbox_id)
        else:
            _live_actor(plan, sandbox_id, owner, found, engines_seen, sandbox_id in known)
    return plan


def _pick_owner(
    plan: ReconcilePlan, owners: dict[str, ActorView], sandbox_id: str, actor: ActorView, found: list[ContainerView]
) -> None:
    """Two actors claiming one sandbox: the one whose container runs keeps it, the other ends."""
    current = owners.get(sandbox_id)
    if current is None:
        owners[sandbox_id] = actor
        return
    running = {c.container_id for c in found if c.running}
    keep, drop = (actor, current) if actor.container_id in running and current.container_id not in running else (
        current, actor
    )
    owners[sandbox_id] = keep
    plan.end_actors.append(drop.name)


def _no_actor(plan: ReconcilePlan, sandbox_id: str, found: list[ContainerView], known: bool) -> None:
    running = [c for c in found if c.running]
    plan.remove_containers += [c for c in found if not c.running]
    if running:
        plan.repair.append(sandbox_id)  # probe; re-adopt with a new actor, or remove
    elif known:
        plan.forget.append(sandbox_id)


def _live_actor(
    plan: ReconcilePlan, sandbox_id: str, actor: ActorView, found: list[ContainerView], engines_seen: set[str],
    known: bool,
) -> None:
    own = [c for c in found if c.container_id == actor.container_id]
    # Never two containers for one sandbox: the live actor's own one wins.
    plan.remove_containers += [c for c in found if c.container_id != actor.container_id]
    if own and own[0].running:
        if not known:
            plan.adopt.append(actor)
    elif own:
        plan.repair.append(sandbox_id)  # its container stopped: clean both up
    elif actor.engine_id in engines_seen:
        plan.end_actors.append(actor.name)
        if known:
            plan.forget.append(sandbox_id)


# ── one sandbox, looked at closely ──────────────────────────────────────────


@dataclass(frozen=True)
class RepairFacts:
    """What is true of one sandbox right now.

    Attributes:
        known: the pool has an entry for it.
        doomed: its destroy is owed (asked, not confirmed): never keep it.
        actor: what its actor says (None when that actor is gone or there is none).
        containers: every container of this sandbox the reapers found.
        answering: the id of a running container that answered its probe (probed
            only when :func:`repair_needs_probe` says so).
    """

    sandbox_id: str
    known: bool
    doomed: bool
    actor: ActorView | None
    containers: tuple[ContainerView, ...]
    answering: str | None = None


@dataclass
class RepairPlan:
    """How to make one sandbox whole or gone. ``outcome``: 'healthy', 'readopted', 'removed',
    'died', 'lost' or 'destroyed' (the owed destroy is done)."""

    outcome: str
    remove: list[ContainerView] = field(default_factory=list)  # containers to remove (never the kept one)
    stop_actor: bool = False  # its actor removes its own container, then ends
    end_actor: bool = False  # end the actor (its container, if any, is handled by ``remove``)
    adopt: bool = False  # a live pair the pool did not know: park it warm
    readopt: ContainerView | None = None  # a new actor on this container's node takes it over
    forget: bool = False  # drop the pool's entry (and any claim or owed destroy)


def repair_needs_probe(facts: RepairFacts) -> bool:
    """Whether the running containers must be asked if they answer (their actor is gone or never
    finished starting, and the sandbox is not doomed)."""
    return not facts.doomed and not (facts.actor is not None and facts.actor.started) and any(
        c.running for c in facts.containers
    )


def plan_repair(facts: RepairFacts) -> RepairPlan:
    """Decide what to do with one sandbox (never two containers for it, nothing unowned)."""
    actor = facts.actor
    if actor is not None and actor.started:
        own = [c for c in facts.containers if c.container_id == actor.container_id]
        others = [c for c in facts.containers if c.container_id != actor.container_id]
        if not facts.doomed and actor.dead_reason is None and own and own[0].running:
            return RepairPlan("healthy", remove=others, adopt=not facts.known)
        # Its container died, or its destroy is owed: its actor removes it, then ends.
        return RepairPlan("destroyed" if facts.doomed else "died", remove=others, stop_actor=True, forget=True)
    # The actor is gone or never finished starting: keep one container that answers.
    keep = None
    if not facts.doomed:
        keep = next((c for c in facts.containers if c.running and c.container_id == facts.answering), None)
    remove = [c for c in facts.containers if c is not keep]
    if keep is None:
        outcome = "destroyed" if facts.doomed else ("lost" if facts.known else "removed")
        return RepairPlan(outcome, remove=remove, end_actor=actor is not None, forget=True)
    return RepairPlan("readopted", remove=remove, end_actor=actor is not None, readopt=keep)


# ── hibernated sandboxes ────────────────────────────────────────────────────


@dataclass(frozen=True)
class AsleepPlan:
    remove_containers: list[ContainerView]  # a hibernated sandbox's other containers
    forget: list[str]  # hibernated sandboxes whose container is gone (removed, or lost with its node)


def plan_asleep(
    asleep: Iterable[tuple[str, str | None, str | None, str | None]],
    containers: Iterable[ContainerView],
    engines_seen: Iterable[str],
    alive_nodes: Iterable[str] | None,
) -> AsleepPlan:
    """Hibernated sandboxes, each as (sandbox id, container id, engine id, node id): their stopped
    container is kept; one whose engine was seen without it, or whose node is gone, is forgotten
    (its thread gets a new sandbox). ``alive_nodes`` None: not known this pass (no node is judged)."""
    engines_seen = set(engines_seen)
    by_id: dict[str, list[ContainerView]] = {}
    for container in containers:
        by_id.setdefault(container.sandbox_id, []).append(container)
    plan = AsleepPlan([], [])
    for sandbox_id, container_id, engine_id, node_id in asleep:
        found = by_id.get(sandbox_id, [])
        plan.remove_containers.extend(c for c in found if c.container_id != container_id)
        if any(c.container_id == container_id for c in found):
            continue
        if engine_id in engines_seen or (alive_nodes is not None and node_id not in set(alive_nodes)):
            plan.forget.append(sandbox_id)
    return plan
