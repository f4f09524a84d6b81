"""SandboxActor: the Ray actor that owns one sandbox's container.

Thin on purpose: it receives calls and hands them to a
:class:`~sandbox_actors.runtime.SandboxRuntime`. Its constructor never raises
and never touches the engine; :meth:`start` does the work. When an operation
finds the container dead, it tells the pool at once so the thread's next
acquire gets a new sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from backends import DockerBackend
from backends.sandbox_api import BashResult, FileInfo, ShellResult

from . import actors
from .config import SandboxConfig
from .errors import SandboxDied, SandboxError
from .metrics import SandboxMetrics
from .runtime import SandboxRuntime

logger = logging.getLogger(__name__)

LABEL_RAY_NODE = "sandbox-actors.ray-node"
_REPORT_TIMEOUT = 5.0


class SandboxActor:
    """One sandbox. Created by the pool through :func:`actors.spawn_sandbox_actor`."""

    def __init__(self, config: SandboxConfig, sandbox_id: str, thread_id: str | None) -> None:
        self._config = config
        self._node_id = actors.current_node_id()
        self._runtime = SandboxRuntime(
            config,
            sandbox_id,
            thread_id,
            DockerBackend(config.container_prefix),
            extra_labels={LABEL_RAY_NODE: self._node_id},
        )
        self._reported_dead = False
        self._metrics = SandboxMetrics(config.pool_name)

    async def ping(self) -> str:
        """Answers once the actor is scheduled and running; returns its node id."""
        return self._node_id

    async def start(self) -> dict[str, Any]:
        """Create or adopt the container and wait until it answers. Idempotent."""
        info = await self._runtime.start()
        return {**info, "node_id": self._node_id, "pid": os.getpid()}

    async def describe(self) -> dict[str, Any]:
        return {**self._runtime.describe(), "node_id": self._node_id, "pid": os.getpid()}

    async def activity(self) -> tuple[float, int, str | None]:
        """(seconds since the last operation, operations in flight, why it is dead or None)."""
        return self._runtime.idle_for(), self._runtime.inflight, self._runtime.dead_reason

    async def stop(self, if_idle_for: float | None = None) -> bool:
        """Remove the container (only when idle that long, if given). The pool then ends the actor."""
        stopped = await self._runtime.stop(if_idle_for)
        if stopped:
            await self._runtime.close()
        return stopped

    # ── operations ─────────────────────────────────────────────────────────

    async def exec(self, command: str, timeout: float | None = None, exec_dir: str | None = None) -> ShellResult:
        """Run a command in the sandbox's persistent shell (stderr merged)."""
        started = time.monotonic()
        try:
            return await self._guard(self._runtime.exec(command, timeout, exec_dir))
        finally:
            self._metrics.executed("exec", time.monotonic() - started)

    async def bash(
        self, command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> BashResult:
        """Run a command in a fresh session with extra env; stdout and stderr apart."""
        started = time.monotonic()
        try:
            return await self._guard(self._runtime.bash(command, env, timeout, exec_dir))
        finally:
            self._metrics.executed("bash", time.monotonic() - started)

    async def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        return await self._guard(self._runtime.read_file(path, start_line, end_line))

    async def read_bytes(self, path: str) -> bytes:
        return await self._guard(self._runtime.read_bytes(path))

    async def write_file(self, path: str, content: str | bytes, append: bool = False) -> int:
        return await self._guard(self._runtime.write_file(path, content, append))

    async def list_files(self, path: str, recursive: bool = False, show_hidden: bool = False) -> list[FileInfo]:
        return await self._guard(self._runtime.list_files(path, recursive, show_hidden))

    async def _guard(self, operation: Any) -> Any:
        try:
            return await operation
        except SandboxDied:
            # Tell the pool before the caller hears of it, so the caller's next acquire
            # already finds the repair under way (and gets a new sandbox).
            if not self._reported_dead:
                self._reported_dead = True
                await self._report_dead()
            raise

    async def _report_dead(self) -> None:
        config, sandbox_id = self._config, self._runtime.sandbox_id
        pool = await asyncio.to_thread(actors.get_actor, config.pool_name, config.namespace)
        if pool is None:
            logger.warning("sandbox %s died and pool %s is not running to hear of it", sandbox_id, config.pool_name)
            return
        try:
            await actors.call(pool.report_dead.remote(sandbox_id), _REPORT_TIMEOUT, "report a dead sandbox")
        except SandboxError as exc:
            logger.warning("sandbox %s died; could not tell pool %s: %s", sandbox_id, config.pool_name, exc)
