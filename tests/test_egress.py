"""Egress by domain on real sandboxes: with `allow_domains: [allowed.test, secure.test]` a sandbox
reaches allowed.test's server over HTTP and secure.test's over HTTPS, both of which see the header
the proxy adds from a file on the host (no file or process in the sandbox holds it; for HTTPS the
proxy ends TLS with the pool's CA, which the sandbox trusts, and verifies the server with the CA
the test made for it), and not refused.test's; the audit lists every attempt.
The "domains" are servers this test starts on this machine, named through the sandbox's
resolver (the pool's proxy answers it) and mapped to them by `network.hosts`."""

from __future__ import annotations

import http.server
import json
import ssl

import sandbox_actors
from backends.egress_ca import EgressCA
from tests.conftest import assert_no_actors_left, wait_until
from tests.servers import answering_server

SECRET = "sk-kept-on-the-host-7d41c0"
FETCH = ("python3 -c \"import urllib.request, sys\ntry:\n print(urllib.request.urlopen('{scheme}://{name}/', timeout=10)"
         ".read().decode())\nexcept Exception as exc:\n print('FAILED', type(exc).__name__, exc); sys.exit(3)\"")


def _server(name: str, seen: list, tls: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    return answering_server(seen, lambda: f"hello from {name}".encode(), tls=tls)


def test_a_sandbox_reaches_only_allowed_domains_with_headers_added_outside_and_audited(ray_address, config, tmp_path):
    allowed_seen, refused_seen = [], []
    allowed, refused = _server("allowed.test", allowed_seen), _server("refused.test", refused_seen)
    # secure.test serves HTTPS with a certificate from a CA of the test's own (as an internal
    # service would), which the proxy is told to verify it with.
    internal_ca = EgressCA(tmp_path / "internal-ca").ensure()
    secure_seen: list = []
    secure = _server("secure.test", secure_seen, tls=internal_ca.server_context("secure.test"))
    secret = tmp_path / "api-key"
    secret.write_text(SECRET + "\n")
    cfg = config.model_copy(update={"network": type(config.network).model_validate({
        "egress": "allowlist", "allow_domains": ["allowed.test", "secure.test"],
        "inject": {"allowed.test": {"X-Api-Key": {"file": str(secret)}},
                   "secure.test": {"X-Api-Key": {"file": str(secret)}}},
        "upstream_ca": str(internal_ca.public / "ca.pem"),
        "hosts": {"allowed.test": f"127.0.0.1:{allowed.server_address[1]}",
                  "refused.test": f"127.0.0.1:{refused.server_address[1]}",
                  "secure.test": f"127.0.0.1:{secure.server_address[1]}"},
    })})
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("egress")
        reached = box.exec(FETCH.format(scheme="http", name="allowed.test"))
        assert reached.exit_code == 0 and reached.output.strip() == "hello from allowed.test", reached.output
        assert [h.get("X-Api-Key") for h in allowed_seen] == [SECRET]  # added on the way, outside

        # HTTPS: the sandbox's client verifies the proxy's certificate for secure.test (the
        # pool's CA, mounted and named by SSL_CERT_FILE), the proxy verifies the server's.
        over_tls = box.exec(FETCH.format(scheme="https", name="secure.test"))
        assert over_tls.exit_code == 0 and over_tls.output.strip() == "hello from secure.test", over_tls.output
        assert [h.get("X-Api-Key") for h in secure_seen] == [SECRET]
        # A client told to trust nothing but the system's own CAs refuses the proxy: nothing is
        # ended behind the sandbox's back without its trust.
        untrusting = box.exec("SSL_CERT_FILE=/dev/null " + FETCH.format(scheme="https", name="secure.test"))
        assert untrusting.exit_code == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusting.output, untrusting.output
        assert len(secure_seen) == 1
        mounted = box.exec("ls /etc/sandbox-actors/egress-ca; grep -rl 'PRIVATE KEY' /etc/sandbox-actors; true")
        assert mounted.output.split() == ["bundle.pem", "ca.pem"], mounted.output  # and no key

        blocked = box.exec(FETCH.format(scheme="http", name="refused.test"))
        assert blocked.exit_code == 3 and "FAILED" in blocked.output  # its name does not even resolve
        # Named by address with the refused name in its Host header: the proxy refuses it too.
        gateway = box.exec("python3 -c \"import socket; print(socket.gethostbyname('allowed.test'))\"").output.strip()
        forged = box.exec(f"python3 -c \"import http.client as h; c = h.HTTPConnection('{gateway}', 80, timeout=10); "
                          "c.request('GET', '/', headers={'Host': 'refused.test'}); print(c.getresponse().status)\"")
        assert forged.output.strip() == "403"
        assert refused_seen == []

        # The secret is nowhere in the sandbox: no file, no process's environment.
        looked = box.exec(f"grep -rls {SECRET} /etc /tmp /root /home /mnt /opt /proc/[0-9]*/environ 2>/dev/null; "
                          "echo done")
        assert looked.output.strip() == "done", looked.output

        trail = [e for e in box.audit() if e["kind"] == "egress"]
        seen = {(e["host"], e["via"], e["allowed"]) for e in trail}
        assert ("allowed.test", "dns", True) in seen and ("allowed.test", "http", True) in seen, trail
        assert ("refused.test", "dns", False) in seen and ("refused.test", "http", False) in seen, trail
        assert ("secure.test", "https", True) in seen, trail
        fetched = next(e for e in trail if e["host"] == "allowed.test" and e["via"] == "http")
        assert fetched["injected"] == ["X-Api-Key"] and fetched["bytes_in"] > 0
        assert SECRET not in json.dumps(trail)

        # An anonymous sandbox's trail has no file: its actor keeps its egress attempts too.
        anonymous = client.acquire()
        assert anonymous.exec(FETCH.format(scheme="http", name="refused.test")).exit_code == 3
        assert wait_until(lambda: any(e["kind"] == "egress" and e["host"] == "refused.test" and not e["allowed"]
                                      for e in anonymous.audit()), timeout=10), anonymous.audit()
        assert anonymous.usage().commands == 1  # egress attempts are not commands
    finally:
        client.shutdown()
        allowed.shutdown()
        refused.shutdown()
        secure.shutdown()
    assert_no_actors_left(cfg.pool_name)
