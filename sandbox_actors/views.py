"""Plain data that crosses process boundaries: what acquire returns, what actors and reapers report.

Imported by the client and by the actors alike, so a driver that only uses
sandboxes never loads the pool's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Lease:
    """What acquire returns: the sandbox and the actor that serves it.

    ``path`` is how it was obtained: 'hot' (already active), 'warm'
    (reclaimed), 'prewarmed' (a spare sandbox, started ahead of need),
    'cold' (a new container) or 'adopted' (a live sandbox the pool took over).
    """

    sandbox_id: str
    thread_id: str | None
    actor: Any
    path: str
    info: dict[str, Any] = field(default_factory=dict)


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
