"""The sandbox API client against a server that answers oddly (a real HTTP server on a unix socket)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from backends.errors import SandboxOperationError
from backends.sandbox_api import SandboxAPI

REPLIES = {
    "/v1/shell/exec": {"success": True, "message": "ok", "data": None},
    "/v1/file/read": {"success": True, "message": "ok", "data": "not an object"},
    "/v1/file/list": [1, 2, 3],
}


class Odd(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(REPLIES[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # noqa: ANN002
        pass


@pytest.fixture
def odd_server(tmp_path):
    path = str(tmp_path / "odd.sock")
    server = socketserver.ThreadingUnixStreamServer(path, Odd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"unix:{path}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("call", ["shell", "read", "list"])
def test_a_reply_without_a_data_object_is_a_typed_error(odd_server, call):
    async def body():
        api = SandboxAPI(odd_server)
        try:
            operation = {"shell": lambda: api.exec("true"), "read": lambda: api.read_file("/x"),
                         "list": lambda: api.list_files("/")}[call]
            with pytest.raises(SandboxOperationError, match="object was expected"):
                await operation()
        finally:
            await api.aclose()

    asyncio.run(body())


_KILLED_IN_WARM_UP = """
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[1])
from backends import sandbox_api

serve = asyncio.start_unix_server

async def serve_then_die(*args, **kwargs):  # what a pool's ray.kill does to a spare warming up
    server = await serve(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return server

asyncio.start_unix_server = serve_then_die
asyncio.run(sandbox_api.warm_http_stack())
"""


def test_a_spare_killed_while_it_warms_up_leaves_nothing_on_disk(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", _KILLED_IN_WARM_UP, repo], env={**os.environ, "TMPDIR": str(tmp_path)},
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert os.listdir(tmp_path) == []


def test_only_https_clients_load_the_trusted_certificates():
    from backends.sandbox_api import context_for

    trusted = context_for("https://sandbox.example:8443")
    assert trusted.cert_store_stats()["x509_ca"] > 0 and trusted.verify_mode == ssl.CERT_REQUIRED
    assert context_for("http://sandbox.example", proxy="https://proxy.example:3128") is trusted
    plain = context_for("http://127.0.0.1:8080")
    # Never an insecure context: it verifies, and trusts nothing, so TLS through it cannot succeed.
    assert plain.cert_store_stats()["x509_ca"] == 0
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname


_NO_CERTIFICATES = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import httpx
def refuse(*args, **kwargs):
    raise AssertionError("the trusted certificates were loaded")
httpx.create_ssl_context = refuse
from backends import sandbox_api
asyncio.run(sandbox_api.warm_http_stack())  # a request over a unix socket, as every SandboxActor makes
print("ok")
"""


def test_a_request_over_a_unix_socket_loads_no_certificates():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", _NO_CERTIFICATES, repo], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr
