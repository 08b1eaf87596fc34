"""A real HTTP server on 127.0.0.1 that replays scripted responses (status, body bytes, delay).

Not a mock: the client under test goes through requests, urllib3 and a TCP socket. Each request
pops the next :class:`Reply`; every request is recorded in :attr:`ScriptedServer.hits`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict | list = b""
    delay_s: float = 0.0
    content_type: str = "application/json"
    #: Content-Length to declare (defaults to the real length); larger than the body = truncated transfer.
    declared_length: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body_bytes(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


@dataclass
class Hit:
    path: str
    query: dict[str, list[str]]
    at: float


class ScriptedServer:
    """``with ScriptedServer() as srv: srv.script(Reply(...), ...); client(base_url=srv.url)``."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                with server._lock:
                    server.hits.append(Hit(parts.path, parse_qs(parts.query), time.monotonic()))
                    reply = server.replies.popleft() if server.replies else Reply(
                        500, b'{"error":"script exhausted"}')
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                data = reply.body_bytes()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(reply.declared_length or len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    pass  # the client gave up (read timeout)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # silence stderr
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Reply) -> "ScriptedServer":
        with self._lock:
            self.replies.extend(replies)
        return self

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def refused_url() -> str:
    """A 127.0.0.1 URL nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
