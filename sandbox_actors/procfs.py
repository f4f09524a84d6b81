"""What this node's ``/proc`` says of a process: enough to tell it from a later one that reused
its number (the runtime's quick check of its container, the pool's of a warm sandbox on its node)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is none here."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if len(fields) > 19 else None


def still_runs(pid: object, started: object) -> bool:
    """Whether process ``pid`` runs here and is the one that started at ``started`` (as
    :func:`process_start` read it then); False when either is unknown."""
    return isinstance(pid, int) and isinstance(started, str) and process_start(pid) == started


def serves_here(info: Mapping[str, Any], node_id: str) -> bool:
    """Whether the sandbox a SandboxActor described in ``info`` (its ``describe()``) is still
    served as it said, seen from node ``node_id``: the actor is on this node, knew of no death,
    and its process and its container's first process are still the ones it named."""
    return (info.get("node_id") == node_id and info.get("dead_reason") is None
            and still_runs(info.get("pid"), info.get("pid_started"))
            and still_runs(info.get("container_pid"), info.get("container_started")))
