"""Starting SandboxActors and NodeReapers: the fleet's way to make actors.

Above the actor classes it starts, below the pool: the pool's fleet calls
these, and nothing here knows about the pool.
"""

from __future__ import annotations

from typing import Any

from . import raycalls
from .actorconfig import ActorConfig
from .config import SandboxConfig
from .options import (
    reaper_options,
    reaper_prefix,
    sandbox_actor_options,
    sandbox_actor_prefix,
)
from .reaper import NodeReaper
from .sandbox import SandboxActor


def sandbox_actor(config: SandboxConfig, node_id: str | None = None) -> tuple[Any, str]:
    """A new SandboxActor (serving no sandbox until ``start``): (handle, name)."""
    options = sandbox_actor_options(config, node_id)
    actor = raycalls.remote_class(SandboxActor).options(**options).remote(ActorConfig.of(config), options["name"])
    return actor, options["name"]


def reaper(config: SandboxConfig, node_id: str) -> Any:
    """The reaper pinned to ``node_id`` (created when missing)."""
    return raycalls.remote_class(NodeReaper).options(**reaper_options(config, node_id)).remote(config)


def sandbox_actors(config: SandboxConfig, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pool's live SandboxActors: name -> handle."""
    return raycalls.named_actors(config.namespace, sandbox_actor_prefix(config), known)


def reapers(config: SandboxConfig) -> list[Any]:
    return list(raycalls.named_actors(config.namespace, reaper_prefix(config)).values())
