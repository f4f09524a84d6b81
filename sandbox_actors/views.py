"""Plain data that crosses process boundaries: what acquire returns, what actors and reapers report.

Imported by the client and by the actors alike, so a driver that only uses
sandboxes never loads the pool's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from backends.base import Mount


class StartOutcome(StrEnum):
    """What an actor's start of a sandbox found: it created a container, adopted the running one,
    resumed the stopped one, or found the running one OWNED by another actor that lives (and
    served nothing: the pool decides, handing the thread to that owner)."""

    CREATED = "created"
    ADOPTED = "adopted"
    RESUMED = "resumed"
    OWNED = "owned"


@dataclass(frozen=True)
class Found:
    """A start's outcome, and the owner's actor name when OWNED."""

    outcome: StartOutcome
    owner: str | None = None

    def report(self) -> dict[str, str]:
        """As a start's answer carries it: ``outcome``, and ``owner`` when OWNED."""
        return {"outcome": self.outcome.value, **({"owner": self.owner} if self.owner else {})}


@dataclass(frozen=True)
class HostDirs:
    """Directories of one node that a new sandbox mounts (a caller's own, e.g. an app's
    per-conversation directories): the sandbox starts on that node, with ``mounts`` in place of
    the pool's own thread directories. An acquire that finds the thread's sandbox already there
    (active, warm or hibernated) returns it as it is."""

    node_id: str
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class Lease:
    """What acquire returns: the sandbox and the actor that serves it.

    ``path`` is how it was obtained: 'hot' (already active), 'warm'
    (reclaimed), 'resumed' (its hibernated container started again),
    'prewarmed' (a spare sandbox, started ahead of need), 'cold' (a new
    container) or 'adopted' (a live sandbox the pool took over).
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


@dataclass(frozen=True)
class Snapshot:
    """A sandbox's filesystem saved as an image (not its processes, not the thread mounts).

    Attributes:
        name: what it is called in its pool (``acquire(thread, snapshot=name)``).
        image: the engine's image (``sandbox-actors-snapshot-<pool tag>:<name>``).
        size: the image's size in bytes; seconds: how long the commit took.
        engine_id, node_id: where it was taken (other nodes fetch it from there on first use).
        created: when (unix time); sandbox_id, thread_id: of what.
        checkpoint_bytes: a live snapshot's checkpoint (its processes and memory) on disk; None
            for a snapshot of files only.
    """

    name: str
    image: str
    size: int | None = None
    seconds: float | None = None
    engine_id: str | None = None
    node_id: str | None = None
    created: float = 0.0
    sandbox_id: str | None = None
    thread_id: str | None = None
    checkpoint_bytes: int | None = None

    @property
    def live(self) -> bool:
        """Whether sandboxes started from it go on from its processes and memory."""
        return self.checkpoint_bytes is not None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Snapshot:
        given: dict[str, Any] = {key: record[key] for key in cls.__dataclass_fields__ if key in record}
        if isinstance(record.get("checkpoint"), Mapping):
            given["checkpoint_bytes"] = int(record["checkpoint"].get("bytes") or 0)
        return cls(**given)
