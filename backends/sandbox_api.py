"""A small async client for the sandbox HTTP API (the AIO sandbox subset).

Field names follow the ``agent-sandbox`` SDK's models, so the same client
drives our minimal image and the public AIO image. One client per sandbox: on a unix socket
it speaks through :mod:`backends.unixhttp` (httpx is not even imported), over TCP through an
``httpx.AsyncClient``; it must be closed (``aclose``), which never touches the container.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import ipaddress
import logging
import os
import secrets
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import unixhttp
from .errors import (
    CommandTimeout,
    InvalidRequest,
    ReadinessTimeout,
    ResourceLimitExceeded,
    SandboxAuthError,
    SandboxExited,
    SandboxFileNotFound,
    SandboxOperationError,
    SandboxUnreachable,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

UNIX_SCHEME = "unix:"

# Extra seconds the HTTP request may take beyond a command's own timeout
# before we give up on the server answering at all.
_HTTP_GRACE = 15.0
_TIMEOUT_STATUSES = {"hard_timeout", "no_change_timeout", "timed_out"}
SHELL_TRUNCATE_CHARS = 30000  # what the server keeps of a shell command's output (head and tail)
MAX_OUTPUT_CHARS = 8 * 1024 * 1024  # and without truncation (the server's own cap)
# Probing backs off as a start drags on: after the first probes, the wait between two is a
# tenth of the time waited so far (at most 0.25 s), and the engine is asked whether the
# container still runs every half of it (at most 2 s). A slow start costs at most ~10%
# more; dozens of containers starting at once cost the machine a few times fewer probes.
_PROBE_BACKOFF = 0.1
_MAX_PROBE_INTERVAL = 0.25
_MAX_LIVENESS_INTERVAL = 2.0


def _timed_out(status: str | None, timeout: float | None, idle_timeout: float | None) -> str:
    if status == "no_change_timeout":
        return f"command printed nothing for {idle_timeout}s and was killed"
    return f"command timed out after {timeout}s and was killed"


class HeadTail:
    """A command's output as it streams in, kept to ``limit`` characters: its head and its tail
    around a marker, as the server truncates what it returns at once."""

    def __init__(self, limit: int) -> None:
        self._limit, self._head, self._tail, self._dropped = limit, "", "", 0

    def feed(self, text: str) -> None:
        room = self._limit // 2 - len(self._head)
        if room > 0:
            self._head, text = self._head + text[:room], text[room:]
        self._tail += text
        excess = len(self._tail) - (self._limit - self._limit // 2)
        if excess > 0:
            self._tail, self._dropped = self._tail[excess:], self._dropped + excess

    def text(self) -> str:
        if not self._dropped:
            return self._head + self._tail
        return f"{self._head}\n...[truncated {self._dropped} chars]...\n{self._tail}"


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The HTTP proxy to reach a sandbox at ``url`` through, from the environment, or None.

    Local and private sandboxes are always reached directly, whatever the
    environment says (a corporate proxy cannot reach them): loopback and
    private or link-local addresses, ``*.docker.internal`` and single-label
    host names. Other hosts use ``http_proxy``/``https_proxy`` (either case)
    unless ``no_proxy`` lists them.
    """
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if not host or _is_local(host):
        return None
    env = {k.lower(): v for k, v in (os.environ if environ is None else environ).items()}
    scheme = urllib.parse.urlsplit(url).scheme or "http"
    proxy = env.get(f"{scheme}_proxy") or env.get("all_proxy")
    if not proxy or _bypassed(host, env.get("no_proxy", "")):
        return None
    return proxy


def _is_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or host.endswith(".docker.internal") or "." not in host
    return address.is_loopback or address.is_private or address.is_link_local


def _bypassed(host: str, no_proxy: str) -> bool:
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.split(":")[0].lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one costs ~20 ms of CPU, and a client is made per sandbox."""
    import httpx

    return httpx.create_ssl_context()


@functools.cache
def _no_tls_context() -> ssl.SSLContext:
    """For clients that never speak TLS (unix sockets, ``http://``): httpx builds a context for
    every transport, and loading the trusted certificates is most of a new SandboxActor's first
    request (~19 ms of CPU). It trusts no certificate, so it cannot make a TLS connection."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def context_for(url: str, proxy: str | None = None) -> ssl.SSLContext:
    """The TLS context a client of ``url`` (through ``proxy``) needs: the trusted one for https."""
    if any(u and urllib.parse.urlsplit(u).scheme == "https" for u in (url, proxy)):
        return tls_context()
    return _no_tls_context()


async def warm_http_stack() -> None:
    """Load what the HTTP client imports on first use (httpcore, anyio's backend, h11), by one
    request to a throwaway server on a unix socket inside this process (as sandboxes are reached).

    A spare actor calls this while it waits, so a burst of new sandboxes does
    not pay for dozens of processes importing modules at the same moment.
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    # An abstract socket (Linux): nothing on disk, so a spare killed in the middle (a pool's
    # shutdown ends its spares with ray.kill) leaves no directory behind.
    import httpx

    path = f"\0sandbox-actors-warm-{os.getpid()}-{secrets.token_hex(6)}"
    server = await asyncio.start_unix_server(answer, path)
    http = httpx.AsyncClient(base_url="http://sandbox", trust_env=False,
                             transport=httpx.AsyncHTTPTransport(uds=path, verify=_no_tls_context()))
    try:
        await http.get("/", timeout=5.0)
    finally:
        await http.aclose()
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class ShellResult:
    """A command run in the sandbox's persistent shell (stderr merged into output)."""

    output: str
    exit_code: int | None
    session_id: str
    status: str = "completed"
    limits_hit: tuple[str, ...] = ()
    # What the command's processes used (None from a server that does not say): CPU seconds, and
    # the most memory they held resident at once (sampled every 50 ms: a shorter command may show 0).
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _figures(data: Mapping[str, Any]) -> dict[str, Any]:
    """A command's CPU seconds and peak memory from the server's answer (None when it has none)."""
    cpu, peak = data.get("cpu_seconds"), data.get("peak_memory_bytes")
    return {"cpu_seconds": float(cpu) if isinstance(cpu, (int, float)) else None,
            "peak_memory_bytes": int(peak) if isinstance(peak, int) else None}


@dataclass(frozen=True)
class TerminalOutput:
    """What a terminal printed: ``data`` (raw bytes, as a terminal shows them) from byte
    ``offset`` of everything it printed since it began."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class TerminalExit:
    """A terminal's shell ended (the last item of its output)."""

    exit_code: int | None


@dataclass(frozen=True)
class CommandView:
    """A background command (started with ``start``): its status and output from an offset."""

    session_id: str
    status: str  # running, completed or terminated
    exit_code: int | None
    output: str = ""
    next_offset: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class BashResult:
    """A command run in a fresh session, with its streams apart."""

    stdout: str
    stderr: str
    exit_code: int | None
    status: str = "completed"
    limits_hit: tuple[str, ...] = ()
    cpu_seconds: float | None = None  # as ShellResult's
    peak_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    is_directory: bool
    size: int | None = None
    modified_time: str | None = None


class SandboxAPI:
    """Talks to one sandbox's API over HTTP.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:49153``, or ``unix:/path/api.sock`` for a
            server on a unix socket (no network needed between us and it).
        token: sent as ``Authorization: Bearer``; empty sends nothing.
        timeout: seconds for calls that run no command (files, probes).
    """

    def __init__(self, url: str, token: str = "", timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self._timeout = timeout
        self._socket = url[len(UNIX_SCHEME):] if url.startswith(UNIX_SCHEME) else None
        # On the unix socket, the lean client for everything; over TCP, httpx.
        self._unix = unixhttp.UnixHTTP(self._socket, headers) if self._socket is not None else None
        self._http: httpx.AsyncClient | None = None
        if self._unix is not None:
            return
        import httpx

        proxy = proxy_for(url)
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, trust_env=False, verify=context_for(url, proxy),
            proxy=proxy,
        )

    async def aclose(self) -> None:
        if self._unix is not None:
            await self._unix.aclose()
        if self._http is not None:
            await self._http.aclose()

    # ── transport ──────────────────────────────────────────────────────────

    async def _request(self, method: str, path: str, *, timeout: float | None = None,
                       **kwargs: Any) -> httpx.Response | unixhttp.Response:
        try:
            if self._unix is not None:
                return await self._unix.request(method, path, timeout=timeout or self._timeout, **kwargs)
            assert self._http is not None
            return await self._http.request(method, path, timeout=timeout or self._timeout, **kwargs)
        except Exception as exc:
            unreachable = self._unreachable(exc, f"did not answer {path} in time")
            if unreachable is None:
                raise
            raise unreachable from exc

    def _unreachable(self, exc: Exception, late: str) -> SandboxUnreachable | None:
        """A failure to reach the sandbox (either client's) as SandboxUnreachable (``late`` says
        what a timeout means); None for any other error."""
        if self._http is not None:
            import httpx

            if isinstance(exc, httpx.TimeoutException):
                return SandboxUnreachable(f"sandbox at {self.url} {late}")
            if isinstance(exc, httpx.TransportError):
                return SandboxUnreachable(f"sandbox at {self.url} is not answering ({type(exc).__name__})")
        if isinstance(exc, TimeoutError):  # (an OSError: first)
            return SandboxUnreachable(f"sandbox at {self.url} {late}")
        if isinstance(exc, OSError):
            return SandboxUnreachable(f"sandbox at {self.url} is not answering ({type(exc).__name__})")
        return None

    async def _call(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """The ``data`` of a successful reply.

        Raises:
            SandboxOperationError: the reply has no ``data`` object (a server that does not
                speak this API the way the agent-sandbox SDK describes it), or it says it failed.
        """
        response = await self._request(method, path, timeout=timeout, **kwargs)
        body = _json(response)
        if response.status_code >= 400 or body.get("success") is False:
            _raise_for(response.status_code, body, path)
        data = body.get("data")
        if not isinstance(data, dict):
            raise SandboxOperationError(
                f"{path}: the sandbox answered {type(data).__name__} where an object was expected "
                f"(message: {str(body.get('message') or '')[:200]!r})",
                status_code=response.status_code,
            )
        return data

    # ── context and readiness ──────────────────────────────────────────────

    async def context(self) -> dict[str, Any]:
        """``GET /v1/sandbox``: home dir, versions, system info."""
        response = await self._request("GET", "/v1/sandbox")
        body = _json(response)
        if response.status_code >= 400:
            _raise_for(response.status_code, body, "/v1/sandbox")
        return body

    async def health(self, timeout: float = 2.0) -> bool:
        """Whether the server answers at all (``GET /health``), within ``timeout``."""
        try:
            response = await self._request("GET", "/health", timeout=timeout)
        except SandboxUnreachable:
            return False
        return response.status_code < 500

    async def wait_ready(
        self,
        timeout: float,
        is_running: Callable[[], Awaitable[bool]],
        log_tail: Callable[[], Awaitable[str]],
        interval: float = 0.01,
        liveness_every: float = 0.5,
    ) -> float:
        """Poll readiness until it answers, the container exits, or ``timeout``.

        The API is probed every ``interval`` at first, backing off to a tenth
        of the time waited so far (many sandboxes starting at once then cost
        the machine less); whether the container still runs is asked of the
        engine every ``liveness_every`` seconds at first, backing off likewise.

        Returns:
            Seconds it took.

        Raises:
            SandboxExited: the container stopped while we waited (at once, not at the deadline).
            ReadinessTimeout: no answer in time; carries the last observation and log tail.
        """
        started = time.monotonic()
        deadline = started + timeout
        next_liveness = started + liveness_every
        while True:
            # The server makes its socket as it starts listening: until the file is there, a stat
            # stands in for the probe (a failed connect through the HTTP client costs far more CPU,
            # times every sandbox that starts at once), and is repeated sooner.
            probe = self._socket is None or os.path.exists(self._socket)
            last = await self._probe_ready(timeout) if probe else "no socket yet"
            if last is None:
                return time.monotonic() - started
            now = time.monotonic()
            waited = now - started
            if now >= next_liveness or now >= deadline:
                next_liveness = now + min(max(liveness_every, waited / 2), _MAX_LIVENESS_INTERVAL)
                if not await is_running():
                    tail = await log_tail()
                    raise SandboxExited(
                        f"container exited before its API answered (last probe: {last}); log tail:\n{tail}",
                        last_observation=last,
                        log_tail=tail,
                    )
            if time.monotonic() >= deadline:
                tail = await log_tail()
                raise ReadinessTimeout(
                    f"sandbox API at {self.url} not ready after {timeout:.1f}s (last probe: {last}); "
                    f"log tail:\n{tail}",
                    last_observation=last,
                    log_tail=tail,
                )
            pause = max(interval, waited * _PROBE_BACKOFF) if probe else max(interval, min(waited * _PROBE_BACKOFF, 0.1))
            await asyncio.sleep(min(pause, _MAX_PROBE_INTERVAL, deadline - now))

    async def _probe_ready(self, timeout: float) -> str | None:
        """None when the API answers ``GET /v1/sandbox``, else what the probe saw.

        Raises:
            SandboxAuthError: it refused our token.
        """
        try:
            response = await self._request("GET", "/v1/sandbox", timeout=min(2.0, max(0.2, timeout)))
        except SandboxUnreachable as exc:
            cause = exc.__cause__
            return f"{type(cause).__name__}: {cause}".rstrip(": ") if cause is not None else exc.message
        if response.status_code == 200:
            return None
        if response.status_code == 401:
            raise SandboxAuthError(f"sandbox at {self.url} refused our token")
        return f"HTTP {response.status_code}"

    # ── commands ───────────────────────────────────────────────────────────

    async def exec(
        self,
        command: str,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        exec_dir: str | None = None,
        truncate: bool = True,
        idle_timeout: float | None = None,
    ) -> ShellResult:
        """``POST /v1/shell/exec`` in the persistent shell; callers serialize per sandbox.
        ``idle_timeout``: killed after that long without new output (with no ``timeout``, however
        long it runs: its output then comes as a stream, so no HTTP read waits past the idle time).

        Raises:
            CommandTimeout: the command outlived ``timeout`` (or printed nothing for
                ``idle_timeout``) and was killed.
        """
        if idle_timeout and not timeout:
            kept = HeadTail(SHELL_TRUNCATE_CHARS if truncate else MAX_OUTPUT_CHARS)
            async for item in self.stream(command, exec_dir=exec_dir, idle_timeout=idle_timeout, kept=kept):
                if isinstance(item, ShellResult):
                    return dataclasses.replace(item, output=kept.text())
                kept.feed(item)
        payload = _drop_none(
            {"command": command, "id": session_id, "hard_timeout": timeout, "exec_dir": exec_dir, "truncate": truncate,
             "no_change_timeout": idle_timeout}
        )
        http_timeout = (timeout + _HTTP_GRACE) if timeout else None
        data = await self._call("POST", "/v1/shell/exec", json=payload, timeout=http_timeout or 3600.0)
        result = ShellResult(
            output=data.get("output") or "",
            exit_code=data.get("exit_code"),
            session_id=data.get("session_id") or "",
            status=data.get("status") or "completed",
            limits_hit=tuple(data.get("limits_hit") or ()),
            **_figures(data),
        )
        _check_limits(result.limits_hit, result.exit_code, output=result.output)
        if result.status in _TIMEOUT_STATUSES:
            raise CommandTimeout(_timed_out(result.status, timeout, idle_timeout), output=result.output)
        return result

    async def stream(
        self, command: str, *, timeout: float | None = None, exec_dir: str | None = None,
        idle_timeout: float | None = None, kept: HeadTail | None = None,
    ) -> AsyncGenerator[str | ShellResult, None]:
        """``POST /v1/shell/exec`` with ``Accept: text/event-stream``: output chunks (str) as the
        command prints them, then its ShellResult (output empty: it came in the chunks). A
        server that answers with one JSON reply instead yields its output once. Leaving the
        iteration early hangs up, which kills the command in the sandbox.

        Raises:
            CommandTimeout: the command outlived ``timeout`` (or printed nothing for
                ``idle_timeout``) and was killed; its output is what the caller ``kept``.
        """
        payload = _drop_none({"command": command, "hard_timeout": timeout, "exec_dir": exec_dir, "truncate": False,
                              "no_change_timeout": idle_timeout})
        events = self._events("/v1/shell/exec", payload, timeout or idle_timeout)
        try:
            async for event, data in events:
                if event == "output":
                    yield data.get("output") or ""
                else:
                    yield self._finished(data, timeout, idle_timeout, kept.text() if kept else "")
        finally:
            await events.aclose()  # at once, not when collected: closing hangs up, which stops the command

    async def bash_stream(
        self, command: str, *, env: Mapping[str, str] | None = None, timeout: float | None = None,
        exec_dir: str | None = None,
    ) -> AsyncGenerator[tuple[str, str] | BashResult, None]:
        """``POST /v1/bash/exec`` streamed: ("stdout" | "stderr", text) as the command prints,
        then its BashResult (streams empty: they came in the chunks)."""
        payload = _drop_none({"command": command, "env": dict(env) if env else None, "hard_timeout": timeout,
                              "exec_dir": exec_dir})
        events = self._events("/v1/bash/exec", payload, timeout)
        try:
            async for event, data in events:
                if event == "output":
                    yield (data.get("stream") or "stdout", data.get("output") or "")
                    continue
                result = BashResult(stdout="", stderr="", exit_code=data.get("exit_code"),
                                    status=data.get("status") or "completed",
                                    limits_hit=tuple(data.get("limits_hit") or ()), **_figures(data))
                _check_limits(result.limits_hit, result.exit_code, output="", stderr="")
                if result.status in _TIMEOUT_STATUSES:
                    raise CommandTimeout(f"command timed out after {timeout}s and was killed", output="", stderr="")
                yield result
        finally:
            await events.aclose()

    async def pty_open(self, cols: int = 80, rows: int = 24) -> str:
        """``POST /v1/pty/open``: a new terminal (an interactive bash) of that size; its id."""
        data = await self._call("POST", "/v1/pty/open", json={"cols": cols, "rows": rows})
        return str(data["id"])

    async def pty_write(self, terminal_id: str, data: str) -> int:
        """Type ``data`` into the terminal (keys as text: "\x03" is Ctrl-C); the bytes written."""
        answer = await self._terminal_call("/v1/pty/write", {"id": terminal_id, "data": data})
        return int(answer.get("written") or 0)

    async def pty_resize(self, terminal_id: str, cols: int, rows: int) -> None:
        await self._terminal_call("/v1/pty/resize", {"id": terminal_id, "cols": cols, "rows": rows})

    async def pty_close(self, terminal_id: str) -> int | None:
        """End the terminal's shell; its exit code."""
        answer = await self._terminal_call("/v1/pty/close", {"id": terminal_id})
        code = answer.get("exit_code")
        return int(code) if isinstance(code, int) else None

    async def pty_output(self, terminal_id: str, offset: int = 0
                         ) -> AsyncGenerator[TerminalOutput | TerminalExit, None]:
        """``POST /v1/pty/output`` streamed: what the terminal prints from ``offset`` (the last
        64 KB when that is older) as it comes, then TerminalExit when its shell ends. Leaving
        early only stops reading: the terminal goes on."""
        import base64

        events = self._events("/v1/pty/output", {"id": terminal_id, "offset": offset}, None, final="exit")
        try:
            async for event, data in events:
                if event == "output":
                    yield TerminalOutput(int(data["offset"]), base64.b64decode(data["data"]))
                elif event == "exit":
                    yield TerminalExit(data.get("exit_code"))
        except SandboxFileNotFound as exc:
            raise InvalidRequest(exc.message) from None
        finally:
            await events.aclose()

    async def _terminal_call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._call("POST", path, json=payload)
        except SandboxFileNotFound as exc:  # the server's 404: no such terminal
            raise InvalidRequest(exc.message) from None

    async def _events(
        self, path: str, payload: dict[str, Any], timeout: float | None, final: str = "result",
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """A command's server-sent events: ("output", data)..., then ("result", data). A server
        that answers one JSON reply instead gives ("output", its data) for each stream it
        filled, then ("result", its data)."""
        read_timeout = (timeout + _HTTP_GRACE) if timeout else 3600.0
        try:
            async with self._stream(path, payload, read_timeout) as response:
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await response.aread()
                    body = _json(response)
                    if response.status_code >= 400 or body.get("success") is False:
                        _raise_for(response.status_code, body, path)
                    data: dict[str, Any] = body["data"] if isinstance(body.get("data"), dict) else {}
                    for name in ("output", "stdout", "stderr"):
                        if data.get(name):
                            yield "output", {"stream": "stderr" if name == "stderr" else "stdout",
                                             "output": data[name]}
                    yield "result", data
                    return
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if event == "error":
                            raise SandboxOperationError(f"{path} failed: {data.get('message')}")
                        yield event, data
                        if event == final:
                            return
        except Exception as exc:
            unreachable = self._unreachable(exc, "went silent during a streamed command")
            if unreachable is None:
                raise
            raise unreachable from exc
        raise SandboxUnreachable(f"sandbox at {self.url} ended a streamed command without its result")

    def _stream(self, path: str, payload: dict[str, Any], read_timeout: float
                ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A POST whose answer (server-sent events, or one JSON reply) is read as it comes."""
        headers = {"Accept": "text/event-stream"}
        if self._unix is not None:
            return self._unix.stream("POST", path, json=payload, headers=headers, timeout=self._timeout,
                                     read_timeout=read_timeout)
        import httpx

        assert self._http is not None
        return self._http.stream("POST", path, json=payload, headers=headers,
                                 timeout=httpx.Timeout(self._timeout, read=read_timeout))

    @staticmethod
    def _finished(data: Mapping[str, Any], timeout: float | None, idle_timeout: float | None = None,
                  output: str = "") -> ShellResult:
        result = ShellResult(output="", exit_code=data.get("exit_code"), session_id=data.get("session_id") or "",
                             status=data.get("status") or "completed", limits_hit=tuple(data.get("limits_hit") or ()),
                             **_figures(data))
        _check_limits(result.limits_hit, result.exit_code, output=output)
        if result.status in _TIMEOUT_STATUSES:
            raise CommandTimeout(_timed_out(result.status, timeout, idle_timeout), output=output)
        return result

    # ── background commands (async_mode, then view / wait / kill) ─────────

    async def start_command(self, command: str, *, session_id: str | None = None, exec_dir: str | None = None) -> str:
        """Start ``command`` in the background; returns the id to view, wait for or kill it."""
        payload = _drop_none({"command": command, "id": session_id, "exec_dir": exec_dir, "async_mode": True})
        data = await self._call("POST", "/v1/shell/exec", json=payload)
        if data.get("status") != "running" or not data.get("session_id"):
            raise SandboxOperationError("this sandbox's server does not run commands in the background (async_mode)")
        return str(data["session_id"])

    async def view_command(self, session_id: str, offset: int = 0, max_bytes: int | None = None) -> CommandView:
        data = await self._job_call("/v1/shell/view", {"id": session_id, "offset": offset, "max_bytes": max_bytes})
        return CommandView(session_id, data.get("status") or "completed", data.get("exit_code"),
                           data.get("output") or "", int(data.get("next_offset") or offset))

    async def wait_command(self, session_id: str, seconds: float) -> CommandView:
        data = await self._job_call("/v1/shell/wait", {"id": session_id, "seconds": seconds},
                                    timeout=seconds + _HTTP_GRACE)
        return CommandView(session_id, data.get("status") or "completed", data.get("exit_code"))

    async def kill_command(self, session_id: str) -> CommandView:
        data = await self._job_call("/v1/shell/kill", {"id": session_id})
        return CommandView(session_id, data.get("status") or "terminated", data.get("exit_code"))

    async def _job_call(self, path: str, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        try:
            return await self._call("POST", path, json=_drop_none(payload), timeout=timeout)
        except SandboxFileNotFound as exc:  # the server's 404: no such background command
            raise InvalidRequest(f"{path}: {exc.message}") from None

    async def bash(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        exec_dir: str | None = None,
        max_output_length: int | None = None,
    ) -> BashResult:
        """``POST /v1/bash/exec`` in a fresh session with extra environment.

        Secrets belong in ``env``, never in ``command``: env values are sent
        in the body and never logged.
        """
        payload = _drop_none(
            {
                "command": command,
                "env": dict(env) if env else None,
                "hard_timeout": timeout,
                "exec_dir": exec_dir,
                "max_output_length": max_output_length,
            }
        )
        http_timeout = (timeout + _HTTP_GRACE) if timeout else 3600.0
        data = await self._call("POST", "/v1/bash/exec", json=payload, timeout=http_timeout)
        result = BashResult(
            stdout=data.get("stdout") or "",
            stderr=data.get("stderr") or "",
            exit_code=data.get("exit_code"),
            status=data.get("status") or "completed",
            limits_hit=tuple(data.get("limits_hit") or ()),
            **_figures(data),
        )
        _check_limits(result.limits_hit, result.exit_code, output=result.stdout, stderr=result.stderr)
        if result.status in _TIMEOUT_STATUSES:
            raise CommandTimeout(
                f"command timed out after {timeout}s and was killed", output=result.stdout, stderr=result.stderr
            )
        return result

    # ── files ──────────────────────────────────────────────────────────────

    async def read_file(self, path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        data = await self._call(
            "POST", "/v1/file/read", json=_drop_none({"file": path, "start_line": start_line, "end_line": end_line})
        )
        return data.get("content") or ""

    async def write_file(self, path: str, content: str | bytes, append: bool = False) -> int:
        """Write text (UTF-8) or bytes (sent base64). Returns bytes written."""
        payload: dict[str, Any]
        if isinstance(content, bytes):
            payload = {"file": path, "content": base64.b64encode(content).decode("ascii"), "encoding": "base64"}
        else:
            payload = {"file": path, "content": content}
        if append:
            payload["append"] = True
        data = await self._call("POST", "/v1/file/write", json=payload)
        return int(data.get("bytes_written") or 0)

    async def list_files(self, path: str, recursive: bool = False, show_hidden: bool = False) -> list[FileInfo]:
        data = await self._call(
            "POST", "/v1/file/list", json={"path": path, "recursive": recursive, "show_hidden": show_hidden}
        )
        return [
            FileInfo(
                name=item["name"],
                path=item["path"],
                is_directory=bool(item.get("is_directory")),
                size=item.get("size"),
                modified_time=item.get("modified_time"),
            )
            for item in data.get("files") or []
        ]

    async def upload_chunk(self, path: str, offset: int, data: bytes, final: bool) -> int:
        """``PUT /v1/file/upload``: ``data`` at ``offset`` of the file being uploaded to ``path``
        (it appears at ``path`` with the ``final`` chunk). Returns the size so far."""
        response = await self._request(
            "PUT", "/v1/file/upload", params={"path": path, "offset": offset, "final": int(final)}, content=data,
            timeout=max(self._timeout, 120.0),
        )
        body = _json(response)
        if response.status_code >= 400 or body.get("success") is False:
            _raise_for(response.status_code, body, "/v1/file/upload")
        return int((body.get("data") or {}).get("size") or 0)

    async def download_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes of a file from ``offset``, and the file's size."""
        response = await self._request("GET", "/v1/file/download",
                                       params={"path": path, "offset": offset, "length": length},
                                       timeout=max(self._timeout, 120.0))
        if response.status_code >= 400:
            _raise_for(response.status_code, _json(response), "/v1/file/download")
        total = response.headers.get("x-file-size")
        if total is None:
            raise SandboxOperationError("this sandbox's server does not serve files in ranges (no X-File-Size)")
        return response.content, int(total)

    async def read_bytes(self, path: str) -> bytes:
        """``GET /v1/file/download``: the file's exact bytes."""
        response = await self._request("GET", "/v1/file/download", params={"path": path})
        if response.status_code >= 400:
            _raise_for(response.status_code, _json(response), "/v1/file/download")
        return response.content


def _drop_none(payload: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in payload.items() if value is not None}


def _json(response: httpx.Response | unixhttp.Response | unixhttp.Streamed) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"success": response.status_code < 400, "message": response.text[:500]}
    return body if isinstance(body, dict) else {"data": body}


def _check_limits(limits: tuple[str, ...], exit_code: int | None, **facts: str) -> None:
    """A command that failed while a resource limit bit is a limit error, not a plain failure."""
    if limits and exit_code != 0:
        raise ResourceLimitExceeded(
            f"command failed (exit {exit_code}): the sandbox hit its {' and '.join(limits)} limit",
            limits=list(limits), exit_code=exit_code, **facts,
        )


def _raise_for(status: int, body: Mapping[str, Any], path: str) -> None:
    message = str(body.get("message") or body.get("detail") or f"HTTP {status}")
    data = body.get("data")
    if isinstance(data, Mapping) and data.get("limits_hit"):
        raise ResourceLimitExceeded(message, limits=list(data["limits_hit"]), exit_code=None, output="")
    if status == 401:
        raise SandboxAuthError(f"sandbox refused the request to {path}: {message}", status_code=status)
    if status == 404:
        raise SandboxFileNotFound(message, status_code=status)
    if status in (400, 422):
        raise InvalidRequest(f"{path}: {message}", status_code=status)
    raise SandboxOperationError(f"{path} failed: {message}", status_code=status)
