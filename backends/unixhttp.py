"""A small HTTP/1.1 client for a sandbox's API on a unix socket: requests with a body of known
length, answers with a ``Content-Length``, chunked or until-closed body, connections kept alive;
and streamed answers (server-sent events), read as they come.

Every command, stream, file read and readiness probe of a sandbox on a unix socket goes through
one of these, in its SandboxActor: a general client (httpx) spent about a millisecond of CPU on
each, as much as the command itself, and its import stack (httpcore, anyio, h11) about 2.5 MB
of each actor's memory.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json as jsonlib
from collections.abc import AsyncIterator, Mapping
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


class Streamed:
    """An answer whose body is read as it comes (:meth:`UnixHTTP.stream`): status and headers
    at once, then the body's lines (:meth:`aiter_lines`) or all of it (:meth:`aread`), each
    read waiting at most ``read_timeout`` (TimeoutError)."""

    def __init__(self, status_code: int, headers: dict[str, str], reader: asyncio.StreamReader,
                 read_timeout: float) -> None:
        self.status_code, self.headers = status_code, headers
        self._pieces = _body_pieces(reader, headers)
        self._read_timeout = read_timeout
        self.content = b""

    async def _next(self) -> bytes | None:
        try:
            return await asyncio.wait_for(self._pieces.__anext__(), self._read_timeout)
        except StopAsyncIteration:
            return None

    async def aread(self) -> bytes:
        pieces = []
        while (piece := await self._next()) is not None:
            pieces.append(piece)
        self.content = b"".join(pieces)
        return self.content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines as text (split at LF, CRLF or CR, without them), as they come."""
        decoder, pending = codecs.getincrementaldecoder("utf-8")("replace"), ""
        while (piece := await self._next()) is not None:
            pending += decoder.decode(piece)
            *lines, pending = pending.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for line in lines:
                yield line
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending


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

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None,
                     timeout: float = 30.0, read_timeout: float = 3600.0) -> AsyncIterator[Streamed]:
        """A request whose answer is read as it comes, on a connection of its own (``timeout``
        for connecting and the answer's head, ``read_timeout`` for each read of its body).
        Leaving the block closes the connection: a server hears a hang-up before the end (ours
        then kills the command it streams)."""
        body = jsonlib.dumps(json).encode() if json is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\n{self._head}"
                + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
                + ("Content-Type: application/json\r\n" if json is not None else "")
                + f"Content-Length: {len(body)}\r\n\r\n")

        async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
            reader, writer = await asyncio.open_unix_connection(self._path)
            try:
                writer.write(head.encode("latin-1") + body)
                await writer.drain()
                status = await reader.readline()
                if not status:
                    raise ProtocolError("the sandbox's API closed the connection without answering")
                code, answer_headers, _keep = await _read_head(status, reader)
                return reader, writer, code, answer_headers
            except BaseException:
                writer.close()
                raise

        reader, writer, code, answer_headers = await asyncio.wait_for(opened(), timeout)
        try:
            yield Streamed(code, answer_headers, reader, read_timeout)
        finally:
            writer.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _reader, writer in idle:
            writer.close()


class _Stale(Exception):
    """The connection was closed before any answer (a kept-alive one the server let go)."""


async def _read_answer(status: bytes, reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """The answer after its status line, and whether the connection may be used again."""
    code, headers, keep = await _read_head(status, reader)
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            content = b"".join([piece async for piece in _chunks(reader)])
        elif "content-length" in headers:
            content = await reader.readexactly(_length(headers))
        else:
            content, keep = await reader.read(), False  # until the server closes
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the connection ended inside the answer's body") from exc
    return Response(code, headers, content), keep


async def _read_head(status: bytes, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bool]:
    """The status code and headers after the status line, and whether the connection may be
    used again once the body is read."""
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
    return int(parts[1]), headers, keep


def _length(headers: Mapping[str, str]) -> int:
    if not headers["content-length"].isdigit():
        raise ProtocolError(f"a Content-Length that is no number: {headers['content-length'][:40]!r}")
    return int(headers["content-length"])


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body's chunks, up to its end (trailers read and dropped)."""
    while True:
        line = await reader.readline()
        try:
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        except ValueError:
            raise ProtocolError(f"a chunk size that is no number: {line[:40]!r}") from None
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


async def _body_pieces(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    """A body as it comes, whatever its framing (chunked, a length, or until the server closes)."""
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            async for piece in _chunks(reader):
                yield piece
        elif "content-length" in headers:
            left = _length(headers)
            while left:
                piece = await reader.read(min(left, 65536))
                if not piece:
                    raise ProtocolError("the connection ended inside the answer's body")
                left -= len(piece)
                yield piece
        else:
            while piece := await reader.read(65536):
                yield piece
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the connection ended inside the answer's body") from exc
