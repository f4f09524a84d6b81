"""A server of a test's own on this machine's loopback: answers every GET with a body, keeping
the headers each request came with (what a proxy added on the way is seen there)."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Callable


def answering_server(seen: list[dict], body: Callable[[], bytes], tls: ssl.SSLContext | None = None,
                     keep_alive: bool = False) -> http.server.ThreadingHTTPServer:
    """Started on 127.0.0.1 (a free port); each GET's headers go into ``seen``, then ``body()``
    answers it. ``tls``: over TLS with that context; ``keep_alive``: HTTP/1.1, its connections
    kept open unless a request says close (else HTTP/1.0). Call ``shutdown()`` when done."""
    class Answer(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def do_GET(self):  # noqa: N802
            seen.append(dict(self.headers))
            answer = body()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
