"""The egress proxy's own logic, on this machine's loopback (no container): names allowed
exactly or by suffix, DNS answered for allowed names only, HTTP by Host with headers injected
from the host, TLS by SNI, everything else refused, and each attempt logged."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import struct

import pytest

from backends.egress import (
    EgressProxy,
    EgressRules,
    Secret,
    dns_answer,
    dns_question,
    http_host,
    name_allowed,
    tls_server_name,
)
from backends.egress_ca import EgressCA
from tests.servers import answering_server


def test_names_are_allowed_exactly_or_under_a_suffix():
    patterns = ["api.github.com", "*.openai.com"]
    assert name_allowed("api.github.com", patterns) and name_allowed("API.GitHub.com.", patterns)
    assert name_allowed("api.openai.com", patterns) and name_allowed("a.b.openai.com", patterns)
    assert not name_allowed("openai.com", patterns) and not name_allowed("github.com", patterns)
    assert not name_allowed("evilopenai.com", patterns) and not name_allowed("api.github.com.evil", patterns)


def _query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def test_dns_answers_an_allowed_name_with_the_proxy_and_refuses_others():
    assert dns_question(_query("allowed.test"))[1:3] == ("allowed.test", 1)
    reply = dns_answer(_query("allowed.test"), "10.9.0.1")
    ident, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    assert ident == 0x1234 and flags & 0x000F == 0 and answers == 1 and reply.endswith(socket.inet_aton("10.9.0.1"))
    refused = dns_answer(_query("refused.test"), None)
    assert struct.unpack("!H", refused[2:4])[0] & 0x000F == 3  # NXDOMAIN
    assert struct.unpack("!H", dns_answer(_query("allowed.test", qtype=28), "10.9.0.1")[6:8])[0] == 0  # no AAAA


def test_what_a_connection_names():
    assert http_host(b"GET / HTTP/1.1\r\nHost: allowed.test:8080\r\n\r\n") == ("allowed.test", 8080)
    assert http_host(b"GET / HTTP/1.1\r\nhost: allowed.test\r\n\r\n") == ("allowed.test", None)
    assert http_host(b"GET / HTTP/1.1\r\n\r\n") is None
    # A real ClientHello, as Python's ssl writes it.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="api.github.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    assert tls_server_name(outgoing.read()) == "api.github.com"
    assert tls_server_name(b"GET / HTTP/1.1\r\n") is None


def test_the_proxy_lets_allowed_names_through_with_headers_from_the_host_and_logs_every_attempt(tmp_path):
    seen: list[dict] = []

    upstream = answering_server(seen, lambda: b"hello from allowed.test\n")
    port = upstream.server_address[1]
    secret = tmp_path / "token"
    secret.write_text("ghp_kept_on_the_host\n")
    rules = EgressRules(allow=("allowed.test",), inject={"allowed.test": {"Authorization": Secret(file=str(secret))}},
                        hosts={"allowed.test": "127.0.0.1", "refused.test": "127.0.0.1"})
    log: list[tuple[str, dict]] = []

    async def body():
        proxy = EgressProxy(rules, "127.0.0.1", lambda source, entry: log.append((source, entry)))
        await proxy.start(dns_port=0)
        try:
            async def get(host: str) -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
                writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: forged\r\n"
                             "Connection: close\r\n\r\n".encode())
                answer = await reader.read()
                writer.close()
                return answer

            allowed = await get("allowed.test")
            refused = await get("refused.test")
            loop = asyncio.get_running_loop()
            dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dns.setblocking(False)
            await loop.sock_connect(dns, ("127.0.0.1", proxy.dns_port))
            await loop.sock_sendall(dns, _query("refused.test"))
            nx = await asyncio.wait_for(loop.sock_recv(dns, 512), 5)
            dns.close()
            return allowed, refused, nx
        finally:
            await proxy.close()

    try:
        allowed, refused, nx = asyncio.run(body())
    finally:
        upstream.shutdown()
    assert allowed.startswith(b"HTTP/1.0 200") and allowed.endswith(b"hello from allowed.test\n")
    assert refused.startswith(b"HTTP/1.1 403")
    assert struct.unpack("!H", nx[2:4])[0] & 0x000F == 3
    assert [h.get("Authorization") for h in seen] == ["ghp_kept_on_the_host"]  # the forged one replaced
    entries = {(e["kind"], e["host"], e["allowed"]) for _, e in log}
    assert entries == {("connect", "allowed.test", True), ("connect", "refused.test", False),
                       ("dns", "refused.test", False)}
    done = next(e for _, e in log if e["host"] == "allowed.test")
    assert done["injected"] == ["Authorization"] and done["bytes_in"] > 0 and done["port"] == port


def test_an_allowed_name_cannot_lead_where_the_sandboxes_may_not_go():
    rules = EgressRules(allow=("localhost",), hosts={"mapped.test": "127.0.0.1:8080"},
                        refused=("127.0.0.0/8", "10.9.0.0/16"))
    with pytest.raises(LookupError, match="may not reach"):
        rules.resolve("localhost", 80)  # DNS says 127.0.0.1: the host itself
    assert rules.resolve("mapped.test", 80) == ("127.0.0.1", 8080)  # the operator's own mapping


def test_a_client_hello_in_pieces_is_read_whole():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="refused.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    log: list[dict] = []

    async def body():
        proxy = EgressProxy(EgressRules(allow=("allowed.test",)), "127.0.0.1", lambda _s, entry: log.append(entry))
        await proxy.start(dns_port=0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
            writer.write(hello[:20])
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(hello[20:])
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # refused: closed, nothing said
            writer.close()
        finally:
            await proxy.close()

    asyncio.run(body())
    assert [(e["host"], e["protocol"], e["allowed"]) for e in log] == [("refused.test", "tls", False)]


def test_the_proxy_knows_every_address_of_its_host(tmp_path):
    from sandbox_actors.outbound import _own_addresses

    table = tmp_path / "fib_trie"
    table.write_text("Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
                     "     |-- 172.17.0.1\n        /32 host LOCAL\n     |-- 172.17.255.255\n"
                     "        /32 link BROADCAST\n     |-- 192.0.2.2\n        /32 host LOCAL\n"
                     "Local:\n     |-- 192.0.2.2\n        /32 host LOCAL\n")
    assert _own_addresses(str(table)) == ["172.17.0.1/32", "192.0.2.2/32"]
    assert "127.0.0.1/32" in _own_addresses()  # this machine's own


def test_https_to_an_injected_domain_is_ended_with_the_pools_ca_and_sent_on_verified(tmp_path):
    # The "real" server's certificate comes from a CA of the test's own, which the proxy is told
    # to verify it with (network.upstream_ca); the sandbox side trusts the pool's CA's bundle.
    upstream_ca = EgressCA(tmp_path / "upstream-ca").ensure()
    seen: list[dict] = []
    upstream = answering_server(seen, lambda: f"over TLS, request {len(seen)}\n".encode(),
                                tls=upstream_ca.server_context("allowed.test"), keep_alive=True)
    port = upstream.server_address[1]
    secret = tmp_path / "token"
    secret.write_text("ghp_kept_on_the_host\n")
    pool_ca = EgressCA(tmp_path / "pool-ca").ensure()  # as the pool makes it, before its sandboxes start
    rules = EgressRules(allow=("allowed.test", "unverified.test"),
                        inject={"allowed.test": {"Authorization": Secret(file=str(secret))},
                                "unverified.test": {"Authorization": Secret(file=str(secret))}},
                        hosts={"allowed.test": f"127.0.0.1:{port}", "unverified.test": f"127.0.0.1:{port}"},
                        ca=pool_ca, upstream_ca=str(upstream_ca.public / "ca.pem"))
    log: list[dict] = []

    def fetch(name: str, proxy_port: int, trust: str, times: int = 1) -> list[tuple[int, bytes]]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", proxy_port, timeout=10, context=ssl.create_default_context(cafile=trust))
        connection._tunnel_host = None  # noqa: SLF001 - not a tunnel: the proxy is where the name leads
        connection.host = name  # SNI and Host: the name, as a sandbox whose DNS says "the proxy"
        connection._create_connection = lambda *_a, **_k: socket.create_connection(("127.0.0.1", proxy_port))  # noqa: SLF001
        answers = []
        for _ in range(times):
            connection.request("GET", "/", headers={"Authorization": "forged"})
            reply = connection.getresponse()
            answers.append((reply.status, reply.read()))
        connection.close()
        return answers

    async def body():
        proxy = EgressProxy(rules, "127.0.0.1", lambda _s, entry: log.append(entry))
        await proxy.start(dns_port=0)
        try:
            bundle = str(pool_ca.public / "bundle.pem")
            two = await asyncio.to_thread(fetch, "allowed.test", proxy.proxy_port, bundle, 2)
            # A client that does not trust the pool's CA refuses the proxy's certificate.
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(fetch, "allowed.test", proxy.proxy_port, str(upstream_ca.public / "ca.pem"))
            # A server the proxy cannot verify for the name it serves is not sent the secret.
            with pytest.raises((ConnectionError, http.client.RemoteDisconnected, ssl.SSLError)):
                await asyncio.to_thread(fetch, "unverified.test", proxy.proxy_port, bundle)
            return two
        finally:
            await proxy.close()

    try:
        two = asyncio.run(body())
    finally:
        upstream.shutdown()
    assert [status for status, _ in two] == [200, 200] and two[1][1] == b"over TLS, request 2\n"
    # Both requests (the second on a connection of its own) carried the host's secret, not the forged one.
    assert [h.get("Authorization") for h in seen] == ["ghp_kept_on_the_host"] * 2
    done = [e for e in log if e["host"] == "allowed.test"]
    assert [(e["protocol"], e["allowed"], e.get("injected"), "error" in e) for e in done[:2]] == [
        ("https", True, ["Authorization"], False)] * 2
    assert "TLS" in done[2]["error"]  # the client's refusal, seen from the proxy
    unverified = next(e for e in log if e["host"] == "unverified.test")
    assert "CERTIFICATE_VERIFY_FAILED" in unverified["error"] or "certificate" in unverified["error"].lower()
    assert (tmp_path / "pool-ca" / "ca.key").stat().st_mode & 0o077 == 0  # the CA's key: its owner's only
    assert "PRIVATE KEY" not in (pool_ca.public / "bundle.pem").read_text()
