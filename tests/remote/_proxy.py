"""A real HTTP proxy in front of the S3 server that injects faults: dropped connections, 5xx
answers, lost conditional writes (412/409), delays. Requests pass through s3fs and botocore
unchanged; the proxy only decides, per request, to forward it, answer it itself, or hang up.
It also counts the body bytes of the answers to GET requests (what a load downloaded).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CODES = {
    500: "InternalError",
    503: "SlowDown",
    412: "PreconditionFailed",
    409: "ConditionalRequestConflict",
}


@dataclass
class Fault:
    method: str
    pattern: str
    """A regular expression searched in the request's path and query."""
    kind: str
    """``drop`` (hang up before forwarding), ``lost`` (forward, then hang up: the answer is
    lost), ``status`` (answer ``status`` without forwarding), ``delay`` (sleep, then forward)."""
    times: int = 1
    status: int = 500
    seconds: float = 0.0
    header: str | None = None
    """Only requests carrying this header (``If-None-Match``)."""


class S3Proxy:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str]] = []
        self.got_bytes = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.seen.clear()
            self.got_bytes = 0

    def inject(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def _match(self, method: str, path: str, headers: dict[str, str]) -> Fault | None:
        with self.lock:
            self.seen.append((method, path))
            for fault in self.faults:
                if fault.times <= 0 or fault.method != method:
                    continue
                if not re.search(fault.pattern, path):
                    continue
                if fault.header is not None and fault.header.lower() not in headers:
                    continue
                fault.times -= 1
                return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _hang_up(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _answer(self, status: int) -> None:
                code = _CODES.get(status, "InternalError")
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>injected by the test proxy</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                fault = proxy._match(self.command, self.path, headers)
                if fault is not None and fault.kind == "drop":
                    return self._hang_up()
                if fault is not None and fault.kind == "status":
                    return self._answer(fault.status)
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for k, v in self.headers.items():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = resp.getheaders()
                    status = resp.status
                finally:
                    conn.close()
                if fault is not None and fault.kind == "lost":
                    return self._hang_up()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.got_bytes += len(data)
                self.send_response(status)
                skip = ("transfer-encoding", "connection", "date", "server")
                if self.command != "HEAD":  # a HEAD's Content-Length is the object's size
                    skip += ("content-length",)
                    self.send_header("Content-Length", str(len(data)))
                for k, v in out_headers:
                    if k.lower() not in skip:
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
