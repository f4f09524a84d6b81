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


def _raw_server(tmp_path, answer: bytes, hold: float = 0.0):
    """A server on a unix socket that reads one request's head and body, writes ``answer`` in
    pieces of 7 bytes (so lines and chunks come split), then waits ``hold`` seconds and closes."""
    path = str(tmp_path / "raw.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        for i in range(0, len(answer), 7):
            writer.write(answer[i:i + 7])
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(hold)
        writer.close()

    return path, serve


_EVENTS = (b'event: output\r\ndata: {"output": "h\xc3\xa9llo "}\r\n\r\n'
           b'event: output\ndata: {"output": "world"}\n\n'
           b'event: result\ndata: {"exit_code": 0, "status": "completed"}\n\n')


def _chunked(body: bytes, size: int = 10) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nTrailer: x\r\n\r\n"


@pytest.mark.parametrize("framing", ["chunked", "length", "until-closed"])
def test_a_stream_over_a_unix_socket_reads_events_in_any_framing(tmp_path, framing):
    headers = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    body = {"chunked": _chunked(_EVENTS), "length": _EVENTS, "until-closed": _EVENTS}[framing]
    headers += {"chunked": b"Transfer-Encoding: chunked\r\n", "length": b"Content-Length: %d\r\n" % len(_EVENTS),
                "until-closed": b"Connection: close\r\n"}[framing]
    path, serve = _raw_server(tmp_path, headers + b"\r\n" + body)

    async def body_of_test():
        server = await asyncio.start_unix_server(serve, path)
        api = SandboxAPI(f"unix:{path}")
        try:
            return [item async for item in api.stream("echo")]
        finally:
            await api.aclose()
            server.close()

    items = asyncio.run(body_of_test())
    assert items[:2] == ["héllo ", "world"]
    assert items[2].exit_code == 0 and items[2].output == ""


def test_a_stream_that_goes_silent_is_a_typed_error(tmp_path):
    from backends.errors import SandboxUnreachable

    path, serve = _raw_server(tmp_path, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                              b'event: output\ndata: {"output": "started"}\n\n', hold=30)

    async def body():
        server = await asyncio.start_unix_server(serve, path)
        api = SandboxAPI(f"unix:{path}")
        seen = []
        try:
            with pytest.raises(SandboxUnreachable, match="went silent"):
                # a read timeout of the command's timeout plus the grace: shortened for the test
                from backends import sandbox_api
                grace, sandbox_api._HTTP_GRACE = sandbox_api._HTTP_GRACE, 0.0
                try:
                    async for item in api.stream("sleep 60", timeout=0.5):
                        seen.append(item)
                finally:
                    sandbox_api._HTTP_GRACE = grace
        finally:
            await api.aclose()
            server.close()
        return seen

    assert asyncio.run(body()) == ["started"]


_NO_HTTPX = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
sys.modules["httpx"] = None  # importing it now fails
import sandbox_actors.sandbox  # what a SandboxActor imports
from backends.sandbox_api import SandboxAPI

async def serve(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    reply = b'{"success": true, "data": {"output": "hi", "exit_code": 0}}'
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(reply) + reply)
    await writer.drain()

async def main():
    path = "\\0sandbox-actors-test-" + str(id(serve))
    server = await asyncio.start_unix_server(serve, path)
    api = SandboxAPI("unix:" + path)
    try:
        plain = await api.exec("echo hi")
        streamed = [item async for item in api.stream("echo hi")]  # a JSON reply to a stream: its output once
    finally:
        await api.aclose()
        server.close()
    print(plain.output, streamed[0])

asyncio.run(main())
"""


def test_a_sandbox_on_a_unix_socket_is_reached_without_httpx():
    """Every SandboxActor of a pool whose image answers on a unix socket (ours) neither imports
    nor loads httpx: its import stack cost each actor ~2.5 MB."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", _NO_HTTPX, repo], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["hi", "hi"]
