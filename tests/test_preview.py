"""Preview URLs on real sandboxes: `box.expose(port)` serves a server inside the sandbox to a
client with the URL's token and to no client without it; after `unexpose`, to none. Through the
sandbox's API, so a sandbox with no network (gVisor here) is served too."""

from __future__ import annotations

import urllib.parse

import httpx
import pytest

import sandbox_actors
from tests.conftest import assert_no_actors_left, wait_until

SITE = "mkdir -p /tmp/site && echo 'hello from {name}' > /tmp/site/index.html && cd /tmp/site && " \
       "python3 -m http.server 8000 --bind 127.0.0.1"


def _serve_and_check(box, name: str) -> None:
    box.start(SITE.format(name=name))
    assert wait_until(lambda: box.exec("python3 -c \"import urllib.request; urllib.request.urlopen("
                                       "'http://127.0.0.1:8000/')\"").exit_code == 0, timeout=20)
    url = box.expose(8000)
    assert box.expose(8000) == url  # the same URL while it lasts
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1" and "sandbox_token=" in parts.query
    bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/index.html", "", ""))
    token = urllib.parse.parse_qs(parts.query)["sandbox_token"][0]

    served = httpx.get(url, timeout=10)
    assert served.status_code == 200 and served.text == f"hello from {name}\n"
    with_header = httpx.get(bare, headers={"X-Sandbox-Token": token}, timeout=10)
    assert with_header.status_code == 200 and with_header.text == f"hello from {name}\n"
    assert httpx.get(bare, timeout=10).status_code == 401  # no token: nothing reaches the sandbox
    assert httpx.get(bare + "?sandbox_token=" + "x" * len(token), timeout=10).status_code == 401
    assert httpx.get(bare, headers={"X-Sandbox-Token": token[:-1]}, timeout=10).status_code == 401
    # The sandbox's server saw the requests without the token (it never leaves the host).
    server = next(e for e in reversed(box.audit()) if e["kind"] == "start")
    log = box.view_command(server["session_id"]).output
    assert "GET /index.html" in log and token not in log and "sandbox_token" not in log
    nothing = box.expose(8001)  # nothing listens there inside: the client hears so
    assert httpx.get(nothing, timeout=10).status_code == 502

    assert box.unexpose(8000) is True and box.unexpose(8000) is False
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=5)  # revoked: nothing answers at all


def test_an_exposed_port_answers_with_its_token_only_until_unexposed(pool):
    _serve_and_check(pool.acquire("web"), "runc")


def test_a_sandbox_without_network_is_exposed_through_its_api(ray_address, config, docker_client):
    from tests.test_live_checkpoint import _live_config, _require_live

    _require_live(docker_client)  # gVisor registered (it runs here only without a network)
    cfg = _live_config(config)
    client = sandbox_actors.connect(cfg)
    try:
        box = client.acquire("web-none")
        assert box.info["url"].startswith("unix:")
        _serve_and_check(box, "gvisor")
        url = box.expose(8000)
        client.destroy(box)  # the sandbox's end revokes its URLs
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=5)
    finally:
        client.shutdown()
    assert_no_actors_left(cfg.pool_name)
