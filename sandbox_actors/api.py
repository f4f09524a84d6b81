"""Every operation on a sandbox, declared once.

Each declaration is a typed stub (its name, parameters, defaults, result and doc) with what the
layers need to know of it: the sandbox API route that serves it, whether its result streams,
whether calling it twice is harmless. The layers are derived from it or checked against it:

* the SandboxActor's method (``served``), and the handle's sync and async faces (``SyncCall``,
  ``AsyncCall``): derived, one line each;
* the Ray-free runtime (``SandboxRuntime``), the HTTP client (``SandboxAPI``) and the image's
  server route: written by hand, each under the operation's own name, and checked against the
  declaration by ``tests/test_operations.py`` (``sandbox-actors operations`` prints the table).

Adding an operation: declare it here, implement it in the runtime, the HTTP client and the
image's server, add its one-line faces, test it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from backends.base import Usage
from backends.sandbox_api import BashResult, CommandView, FileInfo, ShellResult, TerminalExit, TerminalOutput

P = ParamSpec("P")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Operation(Generic[P, R]):
    """One operation on a sandbox (see the module's docstring).

    Attributes:
        stub: its typed declaration. route: the AIO sandbox API route that serves it, or ENGINE:
            the runtime answers it from the container's engine (no request to the sandbox), or
            RUNTIME: from what the runtime keeps itself. stream:
            its result comes as items (a Ray streaming generator), the last one final.
            retry_safe: calling it again after a lost answer does no harm.
    """

    stub: Callable[P, R]
    route: str
    stream: bool = False
    retry_safe: bool = False

    @property
    def name(self) -> str:
        return self.stub.__name__

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.stub) or ""

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.stub)  # once: every call binds its arguments to it

    def wire(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """The arguments of a call, positional in declared order with defaults filled in, as the
        actor receives them (mappings as plain dicts: they cross a process boundary).

        Raises:
            TypeError: a call that does not fit the declaration (as a Python call would).
        """
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(dict(v) if isinstance(v, Mapping) else v for v in bound.arguments.values())


def operation(route: str, *, stream: bool = False, retry_safe: bool = False
              ) -> Callable[[Callable[P, R]], Operation[P, R]]:
    def declare(stub: Callable[P, R]) -> Operation[P, R]:
        return Operation(stub, route, stream, retry_safe)

    return declare


ENGINE = "engine"  # the route of an operation the runtime answers from the sandbox's engine
RUNTIME = "runtime"  # the route of an operation the runtime answers from what it keeps itself


# ── the operations ──────────────────────────────────────────────────────────
# Streamed operations declare the type of their items (the last one is the final result).


@operation("POST /v1/shell/exec")
def exec(command: str, timeout: float | None = None, exec_dir: str | None = None,  # noqa: A001
         idle_timeout: float | None = None) -> ShellResult:
    """Run ``command`` in the persistent shell (cwd and env persist; stderr merged).
    ``idle_timeout``: killed once it prints nothing for that long (then no wall-clock limit
    applies unless ``timeout`` is given too).

    Raises:
        CommandTimeout: it ran past ``timeout`` (default: config exec_timeout, none with
            ``idle_timeout``) or printed nothing for ``idle_timeout``, and was killed.
        SandboxDied: the sandbox is gone; acquire the thread again.
        BackendUnavailable: the engine did not answer (nothing was destroyed).
    """
    raise NotImplementedError


@operation("POST /v1/bash/exec")
def bash(command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
         exec_dir: str | None = None) -> BashResult:
    """Run ``command`` in a fresh session with extra ``env`` (for secrets: never in the command
    line, never logged); stdout and stderr apart."""
    raise NotImplementedError


@operation("POST /v1/shell/exec", stream=True)
def stream(command: str, timeout: float | None = None, exec_dir: str | None = None,
           idle_timeout: float | None = None) -> str | ShellResult:
    """:func:`exec`, its output yielded as the command prints it (str chunks), then its
    ShellResult (output empty: it came in the chunks). Leaving early kills the command."""
    raise NotImplementedError


@operation("POST /v1/bash/exec", stream=True)
def bash_stream(command: str, env: Mapping[str, str] | None = None, timeout: float | None = None,
                exec_dir: str | None = None) -> tuple[str, str] | BashResult:
    """:func:`bash`, streamed: ("stdout" | "stderr", text) as the command prints, then its
    BashResult (streams empty). Leaving early kills the command."""
    raise NotImplementedError


@operation("POST /v1/shell/exec")
def start_command(command: str, session_id: str | None = None, exec_dir: str | None = None) -> str:
    """Start ``command`` in the background (its own process group, output kept in the sandbox);
    returns its session id (see view_command, wait_command, kill_command)."""
    raise NotImplementedError


@operation("POST /v1/shell/view", retry_safe=True)
def view_command(session_id: str, offset: int = 0, max_bytes: int | None = None) -> CommandView:
    """A background command's status, and its output from byte ``offset``."""
    raise NotImplementedError


@operation("POST /v1/shell/wait", retry_safe=True)
def wait_command(session_id: str, seconds: float) -> CommandView:
    """Wait up to ``seconds`` for a background command to end; its status then."""
    raise NotImplementedError


@operation("POST /v1/shell/kill", retry_safe=True)
def kill_command(session_id: str) -> CommandView:
    """Kill a background command's process group."""
    raise NotImplementedError


@operation("PUT /v1/file/upload")
def upload_chunk(path: str, offset: int, data: bytes, final: bool) -> int:
    """Write ``data`` at ``offset`` of a file being uploaded to ``path`` (beside it until
    ``final``, then moved into place whole); returns the bytes written so far."""
    raise NotImplementedError


@operation("GET /v1/file/download", retry_safe=True)
def download_chunk(path: str, offset: int, length: int) -> tuple[bytes, int]:
    """Up to ``length`` bytes of ``path`` from ``offset``, and the file's size."""
    raise NotImplementedError


@operation("POST /v1/file/read", retry_safe=True)
def read_file(path: str, start_line: int | None = None, end_line: int | None = None) -> str:
    """A text file's content (invalid UTF-8 replaced), lines ``start_line`` (0-based) to
    ``end_line`` when given.

    Raises:
        SandboxFileNotFound: there is no such file.
    """
    raise NotImplementedError


@operation("GET /v1/file/download", retry_safe=True)
def read_bytes(path: str) -> bytes:
    """A file's exact bytes."""
    raise NotImplementedError


@operation("POST /v1/file/write")
def write_file(path: str, content: str | bytes, append: bool = False) -> int:
    """Write text or bytes to ``path`` (parents created); returns the bytes written."""
    raise NotImplementedError


@operation("POST /v1/file/list", retry_safe=True)
def list_files(path: str, recursive: bool = False, show_hidden: bool = False) -> list[FileInfo]:
    """The entries of a directory: FileInfo(name, path, is_directory, size, modified_time)."""
    raise NotImplementedError


@operation(ENGINE, retry_safe=True)
def usage() -> Usage:
    """What the sandbox uses now, from its engine's own statistics (as ``docker stats`` shows
    them): CPU (percent of one core over at least the last second, and seconds in all), memory (and
    its limit), processes, network in and out, disk (its own writable layer), and the commands
    run through this actor."""
    raise NotImplementedError


@operation("POST /v1/pty/open")
def pty_open(cols: int = 80, rows: int = 24) -> str:
    """Open an interactive terminal (a bash on a pseudo-terminal of ``cols`` x ``rows``) in
    the sandbox; returns its id. It lives until :func:`pty_close`, its shell's exit, or the
    sandbox's end, whoever reads it or not (see :func:`pty_output`); 16 at most at a time."""
    raise NotImplementedError


@operation("POST /v1/pty/write")
def pty_write(terminal_id: str, data: str) -> int:
    """Type ``data`` into the terminal (keys as text: "\r" Enter, "\x03" Ctrl-C); returns the
    bytes written."""
    raise NotImplementedError


@operation("POST /v1/pty/resize", retry_safe=True)
def pty_resize(terminal_id: str, cols: int, rows: int) -> None:
    """Resize the terminal (its programs get SIGWINCH)."""
    raise NotImplementedError


@operation("POST /v1/pty/output", stream=True, retry_safe=True)
def pty_output(terminal_id: str, offset: int = 0) -> TerminalOutput | TerminalExit:
    """What the terminal prints, as it prints it: TerminalOutput(offset, data) items from byte
    ``offset`` of all it printed (the last 64 KB when ``offset`` is older: a client that comes
    back sees what it missed), then TerminalExit(exit_code) when its shell ends. Leaving early
    (detaching) only stops the reading: the terminal goes on."""
    raise NotImplementedError


@operation("POST /v1/pty/close", retry_safe=True)
def pty_close(terminal_id: str) -> int | None:
    """End the terminal (its shell and what runs in it); returns the shell's exit code."""
    raise NotImplementedError


@operation(RUNTIME, retry_safe=True)
def expose(port: int) -> str:
    """A URL on the sandbox's node (config ``bind_host``) at which ``port``, served inside the
    sandbox, answers: only requests that carry the URL's token (its ``sandbox_token`` query
    parameter, or an ``X-Sandbox-Token`` header) reach it, through the sandbox's API (no network
    of the sandbox's own needed). The same URL for a port exposed already. It lasts until
    :func:`unexpose`, or until the sandbox stops (a hibernation, a destroy, its actor's end)."""
    raise NotImplementedError


@operation(RUNTIME, retry_safe=True)
def unexpose(port: int) -> bool:
    """Revoke ``port``'s URL: nothing answers there any more and its open connections end.
    False when it was not exposed."""
    raise NotImplementedError


@operation(RUNTIME, retry_safe=True)
def audit(limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` commands run in the sandbox, oldest first: each with ``at`` (epoch
    seconds), ``kind`` (exec, bash, stream, bash_stream, start), ``command`` (its first 2,000
    characters; never ``bash``'s env), ``exit_code``, ``status``, ``seconds``, ``cpu_seconds``,
    ``peak_memory_bytes``, or ``error`` (the error's type); in a pool with ``allow_domains``, each
    egress attempt too (``kind`` "egress", ``via`` dns, http, https or tls, ``host``, ``port``,
    ``allowed``, ``bytes_out``/``bytes_in``, ``injected`` header names, ``error``). A thread's
    trail outlives its actor (kept on the host beside the thread's directories)."""
    raise NotImplementedError


OPERATIONS: tuple[Operation[..., Any], ...] = (
    exec, bash, stream, bash_stream, start_command, view_command, wait_command, kill_command, upload_chunk,
    download_chunk, read_file, read_bytes, write_file, list_files, usage, audit, expose, unexpose,
    pty_open, pty_write, pty_resize, pty_output, pty_close,
)


# ── the faces derived from them ─────────────────────────────────────────────


class _Face(Generic[P, R]):
    """A descriptor: the operation as a method of a handle (``handle.sandbox_id``, ``.actor``)."""

    def __init__(self, op: Operation[P, R]) -> None:
        self.op = op
        self.__doc__ = op.doc

    def __set_name__(self, owner: type, name: str) -> None:
        if name != self.op.name:
            raise TypeError(f"{owner.__name__}.{name} faces operation {self.op.name!r}: one name for both")

    def _call(self, handle: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Callable[[], Any]:
        """The actor call, to be made (its arguments checked now)."""
        wired = self.op.wire(args, kwargs)
        method = getattr(handle.actor, self.op.name)
        if self.op.stream:
            method = method.options(_generator_backpressure_num_objects=STREAM_BACKLOG)
        return lambda: method.remote(handle.sandbox_id, *wired)


STREAM_BACKLOG = 64  # output chunks a stream may run ahead of its reader (then the sandbox waits)


class SyncCall(_Face[P, R]):
    """The operation on a sync handle: the call, its answer waited for."""

    @overload
    def __get__(self, handle: None, owner: type) -> SyncCall[P, R]: ...
    @overload
    def __get__(self, handle: Any, owner: type) -> Callable[P, R]: ...

    def __get__(self, handle: Any, owner: type) -> Any:
        if handle is None:
            return self

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, handle._wait(self._call(handle, args, kwargs)()))

        call.__doc__, call.__name__ = self.op.doc, self.op.name
        return call


class SyncStream(_Face[P, R]):
    """A streamed operation on a sync handle: an iterator of its items."""

    @overload
    def __get__(self, handle: None, owner: type) -> SyncStream[P, R]: ...
    @overload
    def __get__(self, handle: Any, owner: type) -> Callable[P, Iterator[R]]: ...

    def __get__(self, handle: Any, owner: type) -> Any:
        if handle is None:
            return self

        def call(*args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
            return cast(Iterator[R], handle._streamed(self._call(handle, args, kwargs)))

        call.__doc__, call.__name__ = self.op.doc, self.op.name
        return call


class AsyncCall(_Face[P, R]):
    """The operation on an async handle: a coroutine of its answer."""

    @overload
    def __get__(self, handle: None, owner: type) -> AsyncCall[P, R]: ...
    @overload
    def __get__(self, handle: Any, owner: type) -> Callable[P, Any]: ...

    def __get__(self, handle: Any, owner: type) -> Any:
        if handle is None:
            return self

        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, await handle._await(self._call(handle, args, kwargs)()))

        call.__doc__, call.__name__ = self.op.doc, self.op.name
        return call


class AsyncStream(_Face[P, R]):
    """A streamed operation on an async handle: an async iterator of its items."""

    @overload
    def __get__(self, handle: None, owner: type) -> AsyncStream[P, R]: ...
    @overload
    def __get__(self, handle: Any, owner: type) -> Callable[P, AsyncIterator[R]]: ...

    def __get__(self, handle: Any, owner: type) -> Any:
        if handle is None:
            return self

        def call(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
            return cast(AsyncIterator[R], handle._streamed(self._call(handle, args, kwargs)))

        call.__doc__, call.__name__ = self.op.doc, self.op.name
        return call
