"""A sandbox's handle: its operations, synchronous (``box``) and awaitable (``box.aio``).

Both faces offer the same operations, each one line derived from its declaration in
:mod:`sandbox_actors.api`. The composite ones (a background command, a chunked upload or
download) are written once as steps that name the calls they need; a sync driver waits for
each call, an async one awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, BinaryIO, Protocol

from backends.sandbox_api import BashResult, CommandView, ShellResult, TerminalExit

from . import api, raycalls
from .api import AsyncCall, AsyncStream, SyncCall, SyncStream
from .errors import PoolUnavailable, SandboxDied
from .raycalls import ActorGone
from .terminal import AsyncTerminal, Terminal
from .views import Lease, Snapshot

FILE_CHUNK = 2 * 1024 * 1024  # bytes per upload/download call (8 MiB ones made the actor hold 100+ MB)
Source = str | os.PathLike[str] | BinaryIO
# What a composite operation's steps yield: ("call", op name, args) for the sandbox, or ("io",
# function, args) for the local side (an async driver runs those in a worker thread).
Step = tuple[str, Any, tuple[Any, ...]]


class PoolClient(Protocol):
    """What a handle asks of the pool client it came from (:class:`sandbox_actors.PoolClient`)."""

    aio: Any  # the same calls, awaitable

    def release(self, handle_or_id: Any) -> bool: ...
    def destroy(self, handle_or_id: Any) -> bool: ...
    def hibernate(self, handle_or_id: Any, *, live: bool = False) -> bool: ...
    def snapshot(self, handle_or_id: Any, name: str | None = None, *, live: bool = False) -> Snapshot: ...
    def _report_dead(self, sandbox_id: str) -> None: ...


class SandboxHandle:
    """One acquired sandbox. Operations go straight to its SandboxActor.

    Attributes:
        sandbox_id: the sandbox's id (same for a thread in every process).
        thread_id: the thread it serves (None when anonymous).
        actor: the SandboxActor handle, for ``actor.exec.remote(sandbox_id, ...)`` style calls (an
            actor may serve another sandbox after this one is destroyed: it refuses calls naming
            this one then).
        path: how the acquire got it: 'hot', 'warm', 'resumed', 'prewarmed', 'cold' or 'adopted'.
        info: what its actor said about it (node, container, ...).
        aio: the same operations, awaitable.
    """

    exec = SyncCall(api.exec)
    bash = SyncCall(api.bash)
    stream = SyncStream(api.stream)
    bash_stream = SyncStream(api.bash_stream)
    start_command = SyncCall(api.start_command)
    view_command = SyncCall(api.view_command)
    wait_command = SyncCall(api.wait_command)
    kill_command = SyncCall(api.kill_command)
    upload_chunk = SyncCall(api.upload_chunk)
    download_chunk = SyncCall(api.download_chunk)
    read_file = SyncCall(api.read_file)
    read_bytes = SyncCall(api.read_bytes)
    write_file = SyncCall(api.write_file)
    list_files = SyncCall(api.list_files)
    usage = SyncCall(api.usage)
    audit = SyncCall(api.audit)
    expose = SyncCall(api.expose)
    unexpose = SyncCall(api.unexpose)
    pty_open = SyncCall(api.pty_open)
    pty_write = SyncCall(api.pty_write)
    pty_resize = SyncCall(api.pty_resize)
    pty_output = SyncStream(api.pty_output)
    pty_close = SyncCall(api.pty_close)

    def __init__(self, lease: Lease, pool: PoolClient | None = None) -> None:
        self.sandbox_id = lease.sandbox_id
        self.thread_id = lease.thread_id
        self.actor = lease.actor
        self.path = lease.path
        self.info = lease.info
        self._pool = pool
        self.aio = AsyncSandboxHandle(self)

    def __repr__(self) -> str:
        return f"SandboxHandle(sandbox_id={self.sandbox_id!r}, thread_id={self.thread_id!r}, path={self.path!r})"

    # ── composite operations ───────────────────────────────────────────────

    def start(self, command: str, session_id: str | None = None, exec_dir: str | None = None) -> BackgroundCommand:
        """Start ``command`` in the background (its own process group; output kept in the
        sandbox); view, wait for or kill it through the returned handle."""
        return BackgroundCommand(self, self.start_command(command, session_id, exec_dir))

    def upload(self, source: Source, path: str, chunk_size: int = FILE_CHUNK) -> int:
        """Copy a local file (or a binary stream) to ``path`` in the sandbox, ``chunk_size`` bytes
        at a time (memory stays at about one chunk; no size cap). The file appears at ``path``
        whole, at the end. Returns the bytes copied."""
        with _local(source, "rb") as f:
            return self._drive(upload_steps(f, path, chunk_size))

    def download(self, path: str, target: Source, chunk_size: int = FILE_CHUNK) -> int:
        """Copy ``path`` from the sandbox to a local file (written beside it, then renamed) or a
        binary stream, ``chunk_size`` bytes at a time. Returns the bytes copied."""
        with _local(target, "wb") as f:
            return self._drive(download_steps(f, path, chunk_size))

    def pty(self, cols: int = 80, rows: int = 24, *, attach: str | None = None) -> Terminal:
        """An interactive terminal in the sandbox (see :class:`~sandbox_actors.terminal.Terminal`):
        a new one of ``cols`` x ``rows``, or, with ``attach``, the terminal of that id, read
        from the last 64 KB it printed."""
        if attach is not None:
            return Terminal(self, attach)
        return Terminal(self, self.pty_open(cols, rows))

    # ── the pool's calls on this sandbox ───────────────────────────────────

    def release(self) -> bool:
        """Give the sandbox back to the pool's warm pool."""
        return self._require_pool().release(self)

    def destroy(self) -> bool:
        """Destroy the sandbox (container and actor)."""
        return self._require_pool().destroy(self)

    def hibernate(self, *, live: bool = False) -> bool:
        """Stop the container keeping its filesystem and end the actor; the next acquire of the
        thread resumes it (this handle is spent). ``live`` keeps its processes and memory too
        (gVisor pools)."""
        return self._require_pool().hibernate(self, live=live)

    def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        """Save the sandbox's filesystem (not the thread mounts) as a snapshot; with ``live``
        (gVisor pools), its processes and memory too: sandboxes started from it go on from them."""
        return self._require_pool().snapshot(self, name, live=live)

    # ── plumbing ───────────────────────────────────────────────────────────

    def _require_pool(self) -> PoolClient:
        if self._pool is None:
            raise PoolUnavailable("this handle was not obtained through a PoolClient")
        return self._pool

    def _died(self, exc: ActorGone) -> SandboxDied:
        if self._pool is not None:
            self._pool._report_dead(self.sandbox_id)
        died = SandboxDied(f"sandbox {self.sandbox_id}'s actor is gone; acquire the thread again")
        died.__cause__ = exc
        return died

    def _wait(self, ref: Any) -> Any:
        try:
            return raycalls.value(ref)
        except ActorGone as exc:
            raise self._died(exc) from None
        except KeyboardInterrupt:
            raycalls.cancel(ref)  # Ctrl-C: the command stops in the sandbox too
            raise

    def _streamed(self, start: Callable[[], Any]) -> Iterator[Any]:
        generator = start()
        finished = False
        try:
            for ref in generator:
                item = self._wait(ref)
                finished = isinstance(item, (ShellResult, BashResult, TerminalExit))
                yield item
        finally:
            if not finished:
                raycalls.cancel(generator)  # leaving early (or Ctrl-C) kills the command

    def _drive(self, steps: Generator[Step, Any, Any]) -> Any:
        answer = None
        while True:
            try:
                kind, what, args = steps.send(answer)
            except StopIteration as done:
                return done.value
            answer = getattr(self, what)(*args) if kind == "call" else what(*args)


class AsyncSandboxHandle:
    """``box.aio``: a sandbox's operations, awaitable (see :class:`SandboxHandle` for each)."""

    exec = AsyncCall(api.exec)
    bash = AsyncCall(api.bash)
    stream = AsyncStream(api.stream)
    bash_stream = AsyncStream(api.bash_stream)
    start_command = AsyncCall(api.start_command)
    view_command = AsyncCall(api.view_command)
    wait_command = AsyncCall(api.wait_command)
    kill_command = AsyncCall(api.kill_command)
    upload_chunk = AsyncCall(api.upload_chunk)
    download_chunk = AsyncCall(api.download_chunk)
    read_file = AsyncCall(api.read_file)
    read_bytes = AsyncCall(api.read_bytes)
    write_file = AsyncCall(api.write_file)
    list_files = AsyncCall(api.list_files)
    usage = AsyncCall(api.usage)
    audit = AsyncCall(api.audit)
    expose = AsyncCall(api.expose)
    unexpose = AsyncCall(api.unexpose)
    pty_open = AsyncCall(api.pty_open)
    pty_write = AsyncCall(api.pty_write)
    pty_resize = AsyncCall(api.pty_resize)
    pty_output = AsyncStream(api.pty_output)
    pty_close = AsyncCall(api.pty_close)

    def __init__(self, handle: SandboxHandle) -> None:
        self._handle = handle
        self.sandbox_id, self.actor = handle.sandbox_id, handle.actor

    async def start(self, command: str, session_id: str | None = None, exec_dir: str | None = None
                    ) -> AsyncBackgroundCommand:
        return AsyncBackgroundCommand(self, await self.start_command(command, session_id, exec_dir))

    async def upload(self, source: Source, path: str, chunk_size: int = FILE_CHUNK) -> int:
        with _local(source, "rb") as f:
            return await self._drive(upload_steps(f, path, chunk_size))

    async def download(self, path: str, target: Source, chunk_size: int = FILE_CHUNK) -> int:
        with _local(target, "wb") as f:
            return await self._drive(download_steps(f, path, chunk_size))

    async def pty(self, cols: int = 80, rows: int = 24, *, attach: str | None = None) -> AsyncTerminal:
        if attach is not None:
            return AsyncTerminal(self, attach)
        return AsyncTerminal(self, await self.pty_open(cols, rows))

    async def release(self) -> bool:
        return await self._handle._require_pool().aio.release(self._handle)

    async def destroy(self) -> bool:
        return await self._handle._require_pool().aio.destroy(self._handle)

    async def hibernate(self, *, live: bool = False) -> bool:
        return await self._handle._require_pool().aio.hibernate(self._handle, live=live)

    async def snapshot(self, name: str | None = None, *, live: bool = False) -> Snapshot:
        return await self._handle._require_pool().aio.snapshot(self._handle, name, live=live)

    async def _await(self, ref: Any) -> Any:
        try:
            return await raycalls.call(ref)
        except ActorGone as exc:
            raise self._handle._died(exc) from None
        except asyncio.CancelledError:
            raycalls.cancel(ref)  # a cancelled call stops the command in the sandbox too
            raise

    async def _streamed(self, start: Callable[[], Any]) -> AsyncIterator[Any]:
        generator = start()
        finished = False
        try:
            async for ref in generator:
                item = await self._await(ref)
                finished = isinstance(item, (ShellResult, BashResult, TerminalExit))
                yield item
        finally:
            if not finished:
                raycalls.cancel(generator)

    async def _drive(self, steps: Generator[Step, Any, Any]) -> Any:
        answer = None
        while True:
            try:
                kind, what, args = steps.send(answer)
            except StopIteration as done:
                return done.value
            answer = await getattr(self, what)(*args) if kind == "call" else await asyncio.to_thread(what, *args)


def upload_steps(f: BinaryIO, path: str, chunk_size: int) -> Generator[Step, Any, int]:
    """The calls of an upload: a chunk at a time, then the final call that moves it into place."""
    offset = 0
    while chunk := (yield ("io", f.read, (chunk_size,))):
        offset = yield ("call", "upload_chunk", (path, offset, chunk, False))
    return (yield ("call", "upload_chunk", (path, offset, b"", True)))


def download_steps(f: BinaryIO, path: str, chunk_size: int) -> Generator[Step, Any, int]:
    """The calls of a download: a chunk at a time until the file's size (or its end, if it shrank)."""
    offset, total = 0, None
    while total is None or offset < total:
        data, total = yield ("call", "download_chunk", (path, offset, chunk_size))
        if not data:
            break  # the file shrank under us
        yield ("io", f.write, (data,))
        offset += len(data)
    return offset


class BackgroundCommand:
    """A command started with :meth:`SandboxHandle.start`: view, wait for or kill it."""

    def __init__(self, box: SandboxHandle, session_id: str) -> None:
        self.box, self.session_id = box, session_id
        self._offset = 0

    def __repr__(self) -> str:
        return f"BackgroundCommand(session_id={self.session_id!r}, sandbox_id={self.box.sandbox_id!r})"

    def view(self) -> CommandView:
        """Its status, and the output printed since the last view."""
        seen = self.box.view_command(self.session_id, self._offset)
        self._offset = seen.next_offset
        return seen

    def wait(self, seconds: float = 60.0) -> CommandView:
        """Wait up to ``seconds`` for it to end; its status then."""
        return self.box.wait_command(self.session_id, seconds)

    def kill(self) -> CommandView:
        """Kill its process group."""
        return self.box.kill_command(self.session_id)


class AsyncBackgroundCommand:
    """A command started with :meth:`AsyncSandboxHandle.start`: the same, awaitable."""

    def __init__(self, box: AsyncSandboxHandle, session_id: str) -> None:
        self.box, self.session_id = box, session_id
        self._offset = 0

    async def view(self) -> CommandView:
        seen = await self.box.view_command(self.session_id, self._offset)
        self._offset = seen.next_offset
        return seen

    async def wait(self, seconds: float = 60.0) -> CommandView:
        return await self.box.wait_command(self.session_id, seconds)

    async def kill(self) -> CommandView:
        return await self.box.kill_command(self.session_id)


@contextlib.contextmanager
def _local(place: Source, mode: str) -> Iterator[BinaryIO]:
    """A local file to read, or one to write beside its name and rename once whole; a stream as is."""
    if not isinstance(place, (str, os.PathLike)):
        yield place
        return
    if mode == "rb":
        with open(place, "rb") as f:
            yield f
        return
    part = f"{os.fspath(place)}.part"
    try:
        with open(part, "wb") as f:
            yield f
        os.replace(part, place)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
