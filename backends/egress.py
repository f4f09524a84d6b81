"""Egress by domain: what a pool's sandboxes may reach, by name, through a proxy the pool owns.

With ``network.egress: allowlist`` and ``network.allow_domains``, a sandbox reaches nothing by
address (its firewall refuses everything it would forward) and only named hosts through this
proxy, one per pool and node, listening on the pool network's gateway:

* DNS (the sandbox's resolver asks it): an allowed name is answered with the gateway's own
  address (so the sandbox's connection comes here), any other name with NXDOMAIN, both logged.
* TCP to the gateway on any port is redirected here (a NAT rule of the pool's): the proxy reads
  what the sandbox names, the Host header of plain HTTP or the SNI of a TLS ClientHello, and,
  when that name is allowed, connects to it on the port the sandbox asked for and passes the
  bytes both ways; otherwise it refuses (HTTP 403, or a closed connection) and logs it.
* A request to a domain with ``network.inject`` entries carries those headers, their values
  read on the host (an environment variable of the proxy's process, or a file): the secret is
  never inside the sandbox. Plain HTTP is read as it passes; HTTPS to such a domain is ended
  here, with a certificate from the pool's CA, which the sandbox trusts (:mod:`.tls`), and sent
  on over TLS of the proxy's own, verified. Each such request goes with ``Connection: close``,
  so the next one comes on a connection of its own and gets its headers too. HTTPS to any other
  allowed name passes through untouched.

Names are matched exactly, or by ``*.suffix`` (any name under the suffix, not the suffix itself).
Nothing here knows about Ray or Docker: the caller gives the addresses, and a function that
tells, from a connection's source address, whose it is, and receives the log entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .tls import TlsServerStream, upstream_context

if TYPE_CHECKING:
    from .egress_ca import EgressCA

logger = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a REDIRECTed connection was going
_HEAD_LIMIT = 64 * 1024
_HEAD_SECONDS = 15.0
_REPLY_SECONDS = 900.0  # a server may think long before it answers (a model's completion)
_DNS_TTL = 5


def name_allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns``: an exact name, or ``*.suffix`` for any name
    under the suffix (``*.github.com`` allows ``api.github.com``, not ``github.com``)."""
    name = name.rstrip(".").lower()
    for pattern in patterns:
        pattern = pattern.rstrip(".").lower()
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


# ── DNS ─────────────────────────────────────────────────────────────────────


def dns_question(packet: bytes) -> tuple[int, str, int, int] | None:
    """(id, name, type, flags) of a DNS query's first question; None when it is not one."""
    if len(packet) < 12:
        return None
    ident, flags, questions = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000 or questions < 1:
        return None  # a response, or no question
    labels, at = [], 12
    while at < len(packet):
        size = packet[at]
        if size == 0:
            at += 1
            break
        if size & 0xC0 or at + 1 + size > len(packet):
            return None  # compression in a question, or cut short
        labels.append(packet[at + 1:at + 1 + size].decode("ascii", "replace"))
        at += 1 + size
    if at + 4 > len(packet):
        return None
    qtype, _qclass = struct.unpack("!HH", packet[at:at + 4])
    return ident, ".".join(labels), qtype, flags


def dns_answer(packet: bytes, address: str | None) -> bytes:
    """The reply to ``packet`` (a query): an A record of ``address`` for an A question, no
    record for other types of an allowed name, NXDOMAIN when ``address`` is None."""
    question = dns_question(packet)
    assert question is not None
    ident, _name, qtype, flags = question
    end = 12
    while packet[end] != 0:
        end += 1 + packet[end]
    end += 5  # the root label, type and class
    answers = b""
    if address is not None and qtype == 1:
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, _DNS_TTL, 4) + socket.inet_aton(address)
    rcode = 0 if address is not None else 3
    header = struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x0100) | 0x0080 | rcode, 1,
                         1 if answers else 0, 0, 0)
    return header + packet[12:end] + answers


# ── what a connection names ─────────────────────────────────────────────────


def tls_server_name(hello: bytes) -> str | None:
    """The SNI of a TLS ClientHello (the first bytes a TLS client sends), or None."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return None
        at = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        at += 1 + hello[at]  # session id
        at += 2 + struct.unpack("!H", hello[at:at + 2])[0]  # cipher suites
        at += 1 + hello[at]  # compression methods
        end = at + 2 + struct.unpack("!H", hello[at:at + 2])[0]
        at += 2
        while at + 4 <= end:
            kind, size = struct.unpack("!HH", hello[at:at + 4])
            if kind == 0:  # server_name: list length, then (type 0, length, name)
                name_size = struct.unpack("!H", hello[at + 7:at + 9])[0]
                return hello[at + 9:at + 9 + name_size].decode("ascii")
            at += 4 + size
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def http_host(head: bytes) -> tuple[str, int | None] | None:
    """The Host header of an HTTP request head: (name, port or None), or None."""
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"host:"):
            host = line[5:].strip().decode("ascii", "replace")
            name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
            return name, int(port) if port.isdigit() else None
    return None


def with_headers(head: bytes, headers: Mapping[str, str]) -> bytes:
    """An HTTP request head with ``headers`` set (any the client sent of those names replaced)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    names = {name.lower().encode() for name in headers}
    kept = [lines[0], *(line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in names)]
    kept += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
    return b"\r\n".join(kept) + b"\r\n\r\n"


# ── the proxy ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Secret:
    """Where an injected header's value is read, on the host: an environment variable or a file."""

    env: str | None = None
    file: str | None = None

    def read(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise LookupError(f"environment variable {self.env} is not set on this node")
            return value
        assert self.file is not None
        with open(self.file, encoding="utf-8") as handle:
            return handle.read().strip()


@dataclass
class EgressRules:
    """What the proxy lets through: ``allow`` (names), ``inject`` (per name or ``*.suffix``:
    header -> Secret), ``hosts`` (names resolved here to these addresses instead of by DNS),
    ``refused`` (networks an allowed name may not resolve to by DNS: what the sandboxes' own
    rules refuse, so a name cannot open the way there; ``hosts`` entries are the operator's
    choice and are not checked)."""

    allow: tuple[str, ...]
    inject: Mapping[str, Mapping[str, Secret]] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)
    refused: tuple[str, ...] = ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4")
    ca: EgressCA | None = None  # ends HTTPS to the ``inject`` domains (None: they pass untouched)
    upstream_ca: str | None = None  # verifies those servers instead of the node's trust

    def injects(self, name: str) -> bool:
        return any(name_allowed(name, [pattern]) for pattern in self.inject)

    def headers_for(self, name: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for pattern, headers in self.inject.items():
            if name_allowed(name, [pattern]):
                found.update({header: secret.read() for header, secret in headers.items()})
        return found

    def resolve(self, name: str, port: int) -> tuple[str, int]:
        """Where a connection to ``name`` on ``port`` goes: the ``hosts`` entry's address (and
        port, when it gives one), else what DNS says here."""
        given = self.hosts.get(name.lower())
        if given is None:
            address = socket.gethostbyname(name)
            found = ipaddress.ip_address(address)
            if any(found in ipaddress.ip_network(network, strict=False) for network in self.refused):
                raise LookupError(f"{name} resolves to {address}, which sandboxes may not reach")
            return address, port
        address, _, fixed = given.partition(":")
        return address, int(fixed) if fixed else port


LogEntry = dict[str, Any]


class EgressProxy:
    """The DNS server and TCP proxy of one pool on one node (see the module's docstring)."""

    def __init__(self, rules: EgressRules, address: str, log: Callable[[str, LogEntry], None]) -> None:
        self.rules, self.address, self._log = rules, address, log
        self._dns: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self.dns_port = 0
        self.proxy_port = 0

    async def start(self, dns_port: int = 53, proxy_port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._dns, _ = await loop.create_datagram_endpoint(lambda: _Dns(self), local_addr=(self.address, dns_port))
        self.dns_port = self._dns.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._serve, self.address, proxy_port, limit=_HEAD_LIMIT)
        self.proxy_port = self._tcp.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._dns is not None:
            self._dns.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def answer(self, packet: bytes, source: str) -> bytes | None:
        question = dns_question(packet)
        if question is None:
            return None
        name = question[1]
        allowed = name_allowed(name, self.rules.allow)
        self._log(source, {"kind": "dns", "host": name, "allowed": allowed})
        return dns_answer(packet, self.address if allowed else None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        port = _original_port(writer.get_extra_info("socket"))  # None: not redirected (asked of us by name)
        entry: LogEntry = {"kind": "connect", "host": None, "port": port, "allowed": False, "bytes_out": 0,
                           "bytes_in": 0}
        began = time.monotonic()
        try:
            head, tls, name, port = await _named(reader, port)
            entry.update(host=name, port=port, protocol="tls" if tls else "http")
            if name is None or not name_allowed(name, self.rules.allow):
                if not tls:
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            entry["allowed"] = True
            client: _Stream = reader
            client_out: _Out = writer
            upstream_tls: ssl.SSLContext | None = None
            if tls and self.rules.ca is not None and self.rules.injects(name):
                # A certificate for the name (made once: a key and files, off the loop).
                context = await asyncio.to_thread(self.rules.ca.server_context, name)
                ended = TlsServerStream(context, reader, writer, head)
                await asyncio.wait_for(ended.handshake(), _HEAD_SECONDS)
                client = client_out = ended
                head = await _request_head(ended)
                upstream_tls = upstream_context(self.rules.upstream_ca)
                entry["protocol"] = "https"
            injected = self.rules.headers_for(name) if not tls or upstream_tls is not None else {}
            if injected and b"\r\n\r\n" in head:  # one request per connection: the next one gets them too
                head = _with_headers_at_head(head, {**injected, "Connection": "close"})
                entry["injected"] = sorted(injected)
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.rules.resolve(name, port), ssl=upstream_tls,
                                        server_hostname=name if upstream_tls else None), _HEAD_SECONDS)
            upstream_writer.write(head)
            entry["bytes_out"] += len(head)
            if "injected" in entry:  # the client is told too: it sends its next request anew
                reply = await _request_head(upstream_reader, timeout=_REPLY_SECONDS)
                if b"\r\n\r\n" in reply:
                    reply = _with_headers_at_head(reply, {"Connection": "close"})
                client_out.write(reply)
                entry["bytes_in"] += len(reply)
            counts = await _pipe(client, client_out, upstream_reader, upstream_writer)
            entry["bytes_out"] += counts[0]
            entry["bytes_in"] += counts[1]
        except ssl.SSLError as exc:  # before OSError, its base: the sandbox's TLS, or the server's
            entry["error"] = f"TLS: {exc.reason or exc}"
        except (OSError, asyncio.TimeoutError, LookupError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            entry["seconds"] = round(time.monotonic() - began, 3)
            self._log(source, entry)
            writer.close()


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.proxy.answer(data, addr[0])
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _original_port(sock: socket.socket | None) -> int | None:
    """The port a REDIRECTed connection was going to (None when it was not redirected)."""
    if sock is None:
        return None
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        address = socket.inet_ntoa(raw[4:8])
        if (address, port) != sock.getsockname()[:2]:
            return port
    return None


async def _named(reader: asyncio.StreamReader, port: int | None) -> tuple[bytes, bool, str | None, int]:
    """What a new connection names, from its first bytes: (those bytes, TLS or not, the name (SNI
    or Host), the port: the one it was going to, else the Host's, else the protocol's)."""
    head = await asyncio.wait_for(reader.read(_HEAD_LIMIT), _HEAD_SECONDS)
    if head[:1] != b"\x16":
        head = await _request_head(reader, head)
        host = http_host(head)
        return head, False, host[0] if host else None, port or (host[1] if host and host[1] else 80)
    # The whole first record (a ClientHello may span several segments).
    wanted = 5 + struct.unpack("!H", head[3:5])[0] if len(head) >= 5 else 5
    while len(head) < min(wanted, _HEAD_LIMIT):
        more = await asyncio.wait_for(reader.read(_HEAD_LIMIT), _HEAD_SECONDS)
        if not more:
            break
        head += more
        if len(head) >= 5:
            wanted = 5 + struct.unpack("!H", head[3:5])[0]
    return head, True, tls_server_name(head), port or 443


def _with_headers_at_head(message: bytes, headers: Mapping[str, str]) -> bytes:
    """An HTTP message (its head complete) with ``headers`` set in its head."""
    cut = message.index(b"\r\n\r\n") + 4
    return with_headers(message[:cut], headers) + message[cut:]


class _Stream(Protocol):
    async def read(self, limit: int = ..., /) -> bytes: ...


class _Out(Protocol):
    def write(self, data: bytes, /) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...


async def _request_head(client: _Stream, head: bytes = b"", timeout: float = _HEAD_SECONDS) -> bytes:
    """The first HTTP message head (and whatever came with it) read from ``client``, after ``head``."""
    while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
        more = await asyncio.wait_for(client.read(_HEAD_LIMIT), timeout)
        if not more:
            break
        head += more
    return head


async def _pipe(client_reader: _Stream, client_writer: _Out,
                upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter) -> tuple[int, int]:
    """Bytes both ways until both end; (bytes to upstream, bytes back)."""
    async def copy(reader: _Stream, writer: _Out) -> int:
        moved = 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                moved += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        return moved

    try:
        out, back = await asyncio.gather(copy(client_reader, upstream_writer), copy(upstream_reader, client_writer))
    finally:
        upstream_writer.close()
    return out, back


def gateway_of(subnet: str) -> str:
    """The first address of a subnet (Docker's gateway on a bridge network it made)."""
    return str(next(ipaddress.ip_network(subnet).hosts()))
