"""A real HTTP/1.1 test backend on a real socket.

Every request is answered with a JSON body
``{"name", "version", "method", "path", "headers", "host"}`` and the header ``x-backend: NAME``.

- ``/delay/<seconds>[/...]`` sleeps that long, then answers 200.
- ``/status/<code>[/...]`` answers that status code.
  (The first ``delay`` or ``status`` segment anywhere in the path counts: ``/none/status/503/a``.)
- anything else answers 200.

Requests are counted per path (query string included) so tests can check how many attempts
arrived (retries). Use it in-process (``Backend(...).start()``) or as a subprocess
(``python3 backend.py --name web-v1 --version v1 --host 127.0.0.11 --port 8080``), e.g. inside a
network namespace.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def _make_handler(backend: "Backend"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms stalls)
        server_version = "mizzen-e2e-backend"

        def log_message(self, fmt, *args):  # quiet
            pass

        def _handle(self):
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path
            backend._count(path)
            plain = path.split("?", 1)[0]
            parts = [p for p in plain.split("/") if p]
            code = 200
            # The first "delay" or "status" segment decides (so "/x/status/503/id" works too).
            for i, seg in enumerate(parts[:-1]):
                if seg == "delay":
                    try:
                        time.sleep(min(float(parts[i + 1]), 60.0))
                    except ValueError:
                        code = 400
                    break
                if seg == "status":
                    try:
                        code = int(parts[i + 1])
                    except ValueError:
                        code = 400
                    break
            body = json.dumps(
                {
                    "name": backend.name,
                    "version": backend.version,
                    "method": self.command,
                    "path": path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "host": self.headers.get("host"),
                }
            ).encode()
            no_body = code in (204, 304) or 100 <= code < 200 or self.command == "HEAD"
            try:
                self.send_response(code)
                self.send_header("x-backend", backend.name)
                self.send_header("content-type", "application/json")
                if no_body:
                    if code not in (204, 304) and not (100 <= code < 200):
                        self.send_header("content-length", str(len(body)))
                    self.end_headers()
                else:
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    return Handler


class Backend:
    """One backend server bound to ``host:port`` (port 0 picks a free one)."""

    def __init__(self, name: str, version: str = "", host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.version = version
        self.host = host
        self.port = port
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def count(self, path: str) -> int:
        """How many requests arrived for exactly this path (query included)."""
        with self._lock:
            return self._counts[path]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def start(self) -> "Backend":
        self._server = _Server((self.host, self.port), _make_handler(self))
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"backend-{self.name}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"Backend({self.name!r}, {self.version!r}, {self.address})"


def port_free_on_all(hosts: list[str], attempts: int = 50) -> int:
    """A port number that can be bound on every one of ``hosts`` (for a Service whose Pods
    all share one targetPort but have distinct IPs). Picked by lib.procs, below the kernel's
    ephemeral range and never handed out twice in a run, for the reasons given there."""
    from lib.procs import free_ports  # tests only; running this file as a backend needs none of it

    for _ in range(attempts):
        port = free_ports(1, hosts[0])[0]
        ok = True
        for h in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", default="")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    b = Backend(a.name, a.version, a.host, a.port)
    server = _Server((b.host, b.port), _make_handler(b))
    print(f"backend {b.name} listening on {b.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
