"""Preview URLs: a port served inside a sandbox, reachable from outside at a URL of its own.

Each exposure is a small listener on the sandbox's node (``bind``, a port of its own). A request
must carry the exposure's token (in the URL's ``sandbox_token`` query parameter, or an
``X-Sandbox-Token`` header); one that does not is answered 401 and goes no further. An
authorized request goes, token removed, through the sandbox's API (its unix socket or loopback
port, with the sandbox's own token) as a tunnel to the port on the sandbox's loopback: the
sandbox needs no network of its own (egress none and gVisor sandboxes too). Each connection
carries one request (``Connection: close`` is set), so every request shows the token; a
WebSocket's upgraded connection stays open. Closing the exposure revokes it: the listener and
every connection through it end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import urllib.parse
from collections.abc import Callable

from .errors import InvalidRequest, SandboxError
from .sandbox_api import UNIX_SCHEME

logger = logging.getLogger(__name__)

TOKEN_PARAM = "sandbox_token"
TOKEN_HEADER = "x-sandbox-token"
_HEAD_LIMIT = 64 * 1024
_HEAD_SECONDS = 30.0


class Exposure:
    """One port of one sandbox, served at :attr:`url` while open."""

    def __init__(self, api_url: str, api_token: str, port: int, bind: str = "127.0.0.1",
                 host: str | None = None, on_use: Callable[[], None] | None = None) -> None:
        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be 1-65535, not {port}")
        self.port, self._api_url, self._api_token = port, api_url, api_token
        self._bind, self._host, self._on_use = bind, host or bind, on_use
        self.token = secrets.token_urlsafe(24)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def open(self) -> str:
        """Start listening; returns the URL (with its token)."""
        self._server = await asyncio.start_server(self._serve, self._bind, 0, limit=_HEAD_LIMIT)
        listening = self._server.sockets[0].getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{listening}/?{TOKEN_PARAM}={self.token}"
        return self.url

    async def close(self) -> None:
        """Revoke it: nothing answers at the URL any more, and open connections end."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.close()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            request = _rewrite(head, self.token)
            if request is None:
                await _answer(writer, 401, "this preview URL needs its token (sandbox_token=... in the URL)")
                return
            try:
                upstream_reader, upstream_writer = await self._tunnel()
            except SandboxError as exc:
                await _answer(writer, 502, exc.message)
                return
            self._connections.add(upstream_writer)
            if self._on_use is not None:
                self._on_use()  # served traffic is the sandbox's activity (its idle timeout waits)
            upstream_writer.write(request)
            await _pipe_both_ways(reader, writer, upstream_reader, upstream_writer)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _tunnel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection through the sandbox's API to the port inside (its 101 read).

        Raises:
            SandboxError: the sandbox's API did not answer, or nothing listens on the port.
        """
        try:
            if self._api_url.startswith(UNIX_SCHEME):
                reader, writer = await asyncio.open_unix_connection(self._api_url[len(UNIX_SCHEME):])
            else:
                parts = urllib.parse.urlsplit(self._api_url)
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        except OSError as exc:
            raise SandboxError(f"the sandbox's API does not answer ({exc.strerror or exc})") from None
        writer.write((f"GET /v1/tunnel?port={self.port} HTTP/1.1\r\nHost: sandbox\r\n"
                      f"Authorization: Bearer {self._api_token}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
                      ).encode())
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            writer.close()
            raise SandboxError("the sandbox's API hung up on the tunnel") from None
        status = answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else b""
        if status != b"101":
            writer.close()
            raise SandboxError(f"nothing answers on port {self.port} in the sandbox (its API said "
                               f"{answer.splitlines()[0].decode(errors='replace')})")
        return reader, writer


def _rewrite(head: bytes, token: str) -> bytes | None:
    """The request head without its token, one request per connection; None when the token is
    missing or wrong."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    split = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
    given = [value for name, value in query if name == TOKEN_PARAM]
    headers = [line for line in lines[1:] if line]
    given += [line.split(":", 1)[1].strip() for line in headers if line.lower().startswith(TOKEN_HEADER + ":")]
    if not given or not all(hmac.compare_digest(value.encode(), token.encode()) for value in given):
        return None
    kept_query = urllib.parse.urlencode([(n, v) for n, v in query if n != TOKEN_PARAM])
    target = urllib.parse.urlunsplit(("", "", split.path or "/", kept_query, split.fragment))
    upgrade = any(line.lower().startswith("upgrade:") for line in headers)
    headers = [line for line in headers if not line.lower().startswith(TOKEN_HEADER + ":")
               and (upgrade or not line.lower().startswith("connection:"))]
    if not upgrade:
        headers.append("Connection: close")
    return "\r\n".join([f"{method} {target} {version}", *headers, "", ""]).encode("latin-1")


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = (message + "\n").encode()
    reason = {401: "Unauthorized", 502: "Bad Gateway"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _pipe_both_ways(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                          upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter) -> None:
    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    try:
        await asyncio.gather(copy(client_reader, upstream_writer), copy(upstream_reader, client_writer))
    finally:
        upstream_writer.close()
