"""The one slow operation a sandbox may have under way: its start, check, stop or repair.

One registry replaces a dict of tasks per kind: a sandbox id maps to at most
one running :class:`Operation`, so "is anything happening to it?" is one
lookup, and whoever needs the sandbox waits for that operation to end.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from .errors import SandboxError


class OpKind(enum.StrEnum):
    """The slow things done to a sandbox, one at a time."""

    START = "start"  # its actor and container being created (or a spare's)
    CHECK = "check"  # a warm sandbox's actor asked whether it still runs, before it is handed out
    CLAIM = "claim"  # a pre-warmed spare given to its thread
    STOP = "stop"  # its container removed (or, idle and hibernating, stopped)
    HIBERNATE = "hibernate"  # its container stopped, its actor ended
    RESUME = "resume"  # a hibernated sandbox's container started again under a new actor
    SNAPSHOT = "snapshot"  # its filesystem committed as an image
    REPAIR = "repair"  # looked at closely and made whole or gone


@dataclass(frozen=True)
class Operation:
    """What is being done to one sandbox, and its task."""

    sandbox_id: str
    kind: OpKind
    task: asyncio.Task[Any]


class OperationInProgress(SandboxError):
    """A bug: the pool started a second operation on a sandbox that already has one."""


class Operations:
    """Every sandbox's running operation."""

    def __init__(self) -> None:
        self._running: dict[str, Operation] = {}

    def start(self, sandbox_id: str, kind: OpKind, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` as ``sandbox_id``'s operation; it is forgotten when it ends.

        Raises:
            OperationInProgress: the sandbox already has one (decide again instead).
        """
        if sandbox_id in self._running:
            work.close()
            raise OperationInProgress(
                f"sandbox {sandbox_id} already has a {self._running[sandbox_id].kind} under way"
            )
        task = asyncio.get_running_loop().create_task(work)
        operation = Operation(sandbox_id, kind, task)
        self._running[sandbox_id] = operation
        task.add_done_callback(lambda _t: self._forget(operation))
        return task

    def _forget(self, operation: Operation) -> None:
        if self._running.get(operation.sandbox_id) is operation:
            del self._running[operation.sandbox_id]

    def get(self, sandbox_id: str) -> Operation | None:
        return self._running.get(sandbox_id)

    def kind(self, sandbox_id: str) -> OpKind | None:
        operation = self._running.get(sandbox_id)
        return None if operation is None else operation.kind

    def busy(self) -> set[str]:
        """Sandbox ids with an operation under way."""
        return set(self._running)

    def of_kind(self, kind: OpKind) -> list[Operation]:
        return [operation for operation in self._running.values() if operation.kind == kind]

    async def wait(self, sandbox_id: str) -> None:
        """Until ``sandbox_id``'s operation (if any) has ended, however it ended: the waiter
        decides again on what is true afterwards."""
        operation = self._running.get(sandbox_id)
        if operation is not None:
            await asyncio.wait([operation.task])  # never cancels it, never raises its error

    async def drain(self) -> None:
        """Until every operation under way has ended."""
        while self._running:
            await asyncio.gather(*(op.task for op in list(self._running.values())), return_exceptions=True)
