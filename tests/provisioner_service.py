"""A provisioner-compatible HTTP service for the tests, on loopback, backed by real containers.

It speaks the original provisioner's API (``/health``, ``/api/sandboxes``...)
with ``X-API-Key`` and creates each sandbox as a real container of our image
through the Docker backend. It keeps no state of its own: what exists is what
the engine holds, so a restarted service on the same port sees the same
sandboxes (pending ones aside).

    python -m tests.provisioner_service --api-key KEY [--port 0] [--mode normal|pending|fail]

``pending``: sandboxes are accepted but never start (status Pending, a URL where
nothing answers). ``fail``: creates answer 500 with a message.
Prints ``listening on http://127.0.0.1:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from backends import DockerBackend, Limits, SandboxSpec

POOL = "provisioner-service"  # the pool label of the containers this service creates
FAIL_MESSAGE = "quota exceeded: no capacity for new sandboxes in namespace sandbox-test"


class Provisioner:
    def __init__(self, api_key: str, image: str, prefix: str, mode: str) -> None:
        self.api_key, self.image, self.mode = api_key, image, mode
        self.backend = DockerBackend(prefix)
        self.pending: dict[str, dict[str, Any]] = {}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def item(self, record: Any) -> dict[str, Any]:
        return {"sandbox_id": record.sandbox_id, "sandbox_url": record.url, "thread_id": record.thread_id,
                "status": "Running" if record.running else "Failed"}

    def get(self, sandbox_id: str) -> dict[str, Any] | None:
        if sandbox_id in self.pending:
            return self.pending[sandbox_id]
        record = self.run(self.backend.discover(sandbox_id))
        return None if record is None or record.pool != POOL else self.item(record)

    def create(self, sandbox_id: str, thread_id: str | None) -> tuple[int, dict[str, Any]]:
        found = self.get(sandbox_id)
        if found is not None:
            return 200, found
        if self.mode == "fail":
            return 500, {"detail": FAIL_MESSAGE}
        if self.mode == "pending":
            self.pending[sandbox_id] = {"sandbox_id": sandbox_id, "sandbox_url": f"http://127.0.0.1:{free_port()}",
                                        "thread_id": thread_id, "status": "Pending"}
            return 201, self.pending[sandbox_id]
        spec = SandboxSpec(sandbox_id=sandbox_id, pool=POOL, image=self.image, thread_id=thread_id,
                           limits=Limits(memory="256m", cpus=1.0, pids=256))
        return 201, self.item(self.run(self.backend.create(spec)))

    def delete(self, sandbox_id: str) -> bool:
        if self.pending.pop(sandbox_id, None) is not None:
            return True
        if self.get(sandbox_id) is None:
            return False
        return self.run(self.backend.destroy(sandbox_id))

    def list(self) -> list[dict[str, Any]]:
        return [self.item(r) for r in self.run(self.backend.list(POOL))] + list(self.pending.values())


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def handler(service: Provisioner) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def route(self, method: str) -> None:
            path = self.path.rstrip("/")
            if path == "/health" and method == "GET":
                return self.reply(200, {"status": "ok"})
            if not path.startswith("/api/sandboxes"):
                return self.reply(404, {"detail": "not found"})
            if self.headers.get("X-API-Key") != service.api_key:
                return self.reply(401, {"detail": "invalid API key"})
            sandbox_id = path[len("/api/sandboxes/"):] if path.startswith("/api/sandboxes/") else ""
            if method == "POST" and not sandbox_id:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not isinstance(body.get("sandbox_id"), str) or not body["sandbox_id"]:
                    return self.reply(422, {"detail": "sandbox_id is required"})
                return self.reply(*service.create(body["sandbox_id"], body.get("thread_id")))
            if method == "GET" and not sandbox_id:
                items = service.list()
                return self.reply(200, {"sandboxes": items, "count": len(items)})
            if method == "GET":
                found = service.get(sandbox_id)
                return self.reply(200, found) if found else self.reply(404, {"detail": f"no sandbox {sandbox_id}"})
            if method == "DELETE":
                if service.delete(sandbox_id):
                    return self.reply(200, {"ok": True})
                return self.reply(404, {"detail": f"no sandbox {sandbox_id}"})
            return self.reply(405, {"detail": "method not allowed"})

        def do_GET(self) -> None:
            self.route("GET")

        def do_POST(self) -> None:
            self.route("POST")

        def do_DELETE(self) -> None:
            self.route("DELETE")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--image", default="sandbox-actors-minimal:latest")
    parser.add_argument("--prefix", default="provisioned", help="container name prefix")
    parser.add_argument("--mode", choices=["normal", "pending", "fail"], default="normal")
    args = parser.parse_args()
    service = Provisioner(args.api_key, args.image, args.prefix, args.mode)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(service))
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
