"""A small HTTP/1.1 client for a sandbox's API on a unix socket: requests with a body of known
length, answers with a ``Content-Length`` or chunked body, connections kept alive.

Every command, file read and readiness probe of a sandbox goes through one of these, in its
SandboxActor: a general client (httpx) spent about a millisecond of CPU on each, as much as the
command itself. Streams (server-sent events) still go through httpx.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

MAX_IDLE = 4  # connections kept open for the next requests
MAX_HEADER_LINES = 100


class Response:
    """What came back: status, headers (lower-case names), the whole body."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class ProtocolError(OSError):
    """The server's answer was not HTTP/1.1 as expected (or the connection ended mid-answer)."""


class UnixHTTP:
    """Requests to the server on the unix socket ``path``, each with ``headers``.

    Raises (from :meth:`request`): TimeoutError (no whole answer within ``timeout``), OSError (no
    connection, or it broke; ProtocolError for a malformed answer).
    """

    def __init__(self, path: str, headers: Mapping[str, str]) -> None:
        self._path = path
        self._head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None, content: bytes | None = None, timeout: float = 30.0) -> Response:
        body, kind = (jsonlib.dumps(json).encode(), "application/json") if json is not None else (content, None)
        target = f"{path}?{urlencode(params)}" if params else path
        head = (f"{method} {target} HTTP/1.1\r\nHost: sandbox\r\n{self._head}"
                + (f"Content-Type: {kind}\r\n" if kind else "")
                + (f"Content-Length: {len(body)}\r\n" if body is not None else "Content-Length: 0\r\n") + "\r\n")
        return await asyncio.wait_for(self._exchange(head.encode("latin-1") + (body or b"")), timeout)

    async def _exchange(self, request: bytes) -> Response:
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._over(reader, writer, request)
            except _Stale:
                continue  # the server closed it while idle: nothing was sent, try another
        reader, writer = await asyncio.open_unix_connection(self._path)
        try:
            return await self._over(reader, writer, request)
        except _Stale as exc:
            raise ProtocolError("the sandbox's API closed the connection without answering") from exc

    async def _over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Response:
        """One request and its answer on one connection; kept for the next one unless the
        server closes it."""
        keep = False
        try:
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            if not status:
                raise _Stale()
            response, keep = await _read_answer(status, reader)
            return response
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Stale() from exc
        finally:
            if keep and len(self._idle) < MAX_IDLE:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _reader, writer in idle:
            writer.close()


class _Stale(Exception):
    """The connection was closed before any answer (a kept-alive one the server let go)."""


async def _read_answer(status: bytes, reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """The answer after its status line, and whether the connection may be used again."""
    parts = status.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP answer: {status[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ProtocolError("the connection ended inside the answer's headers")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ProtocolError("too many header lines")
    keep = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            content = await _chunked(reader)
        elif "content-length" in headers:
            if not headers["content-length"].isdigit():
                raise ProtocolError(f"a Content-Length that is no number: {headers['content-length'][:40]!r}")
            content = await reader.readexactly(int(headers["content-length"]))
        else:
            content, keep = await reader.read(), False  # until the server closes
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the connection ended inside the answer's body") from exc
    return Response(int(parts[1]), headers, content), keep


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)  # the CRLF after each chunk
