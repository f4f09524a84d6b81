"""The sandbox API client against a server that answers oddly (a real HTTP server on a unix socket)."""

from __future__ import annotations

import asyncio
import json
import socketserver
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
            operation = {"shell": lambda: api.shell_exec("true"), "read": lambda: api.read_file("/x"),
                         "list": lambda: api.list_files("/")}[call]
            with pytest.raises(SandboxOperationError, match="object was expected"):
                await operation()
        finally:
            await api.aclose()

    asyncio.run(body())
