"""TLS ended inside the egress proxy, and where a sandbox finds the CA it trusts for that.

To add a header to an HTTPS request the proxy must read the request: it ends the sandbox's TLS
itself, with a certificate for the name the sandbox asked for, signed by the pool's CA
(:mod:`.egress_ca`), and opens TLS of its own to the real server, verified as any client would
verify it. The sandbox trusts that CA because the pool mounts a bundle of the node's trusted CAs
plus this one read-only at ``CA_CONTAINER_DIR`` and points its TLS clients there (see
``docs/security.md``, "HTTPS and the pool's CA").

Only domains with ``network.inject`` entries are ended here; every other allowed name passes
through by its SNI, untouched, verified by the sandbox against its own trust. Standard library
only: a sandbox's actor reads the constants.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl

# Where a sandbox finds the bundle, and the variables that point its TLS clients there (OpenSSL's
# and so Python's ssl and curl's, requests', curl's own, Node's extra CAs).
CA_CONTAINER_DIR = "/etc/sandbox-actors/egress-ca"
BUNDLE = "bundle.pem"
TRUST_ENVIRONMENT = {name: f"{CA_CONTAINER_DIR}/{BUNDLE}" for name in
                     ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")}


@functools.lru_cache(maxsize=4)
def upstream_context(cafile: str | None) -> ssl.SSLContext:
    """How the proxy verifies the real server of an ended connection: the node's trust, or
    ``cafile`` (``network.upstream_ca``) instead (read once per proxy process: loading a trust
    store costs milliseconds)."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class TlsServerStream:
    """The server side of TLS over an asyncio stream whose first bytes (the ClientHello, read to
    learn the SNI) were already taken from it; reads and writes plaintext, as the stream pair
    the proxy pipes (``read``, ``write``, ``drain``, ``can_write_eof``)."""

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 already: bytes) -> None:
        self._reader, self._writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._incoming.write(already)
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    def _send(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)

    async def _receive(self) -> None:
        self._send()
        await self._writer.drain()
        data = await self._reader.read(65536)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._receive()
        self._send()
        await self._writer.drain()

    async def read(self, limit: int = 65536) -> bytes:
        while True:
            try:
                return self._tls.read(limit)
            except ssl.SSLWantReadError:
                await self._receive()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._send()

    async def drain(self) -> None:
        await self._writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """The end of what the proxy sends (TLS's close_notify): a response delimited by the end
        of its connection ends there for the sandbox."""
        with contextlib.suppress(ssl.SSLWantReadError):  # the sandbox's own close_notify may not have come
            self._tls.unwrap()
        self._send()
