"""Backends for the protocol tests, each a real server on a real socket, started in-process.

- ``RawHttpBackend``: a hand-written HTTP/1.1 server (one request per connection) that shows
  what a proxy did on the wire: the header names exactly as received, whether a request
  reached it before its body ended (``/upload/TAG``), and a chunked response whose second
  half waits for the test (``/stream/TAG``).
- ``WsEchoBackend``: a WebSocket echo server (PyPI ``websockets``).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections import defaultdict

MIXED_CASE_REPLY = "X-Mixed-Case-Reply"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class RawHttpBackend:
    """``/upload/TAG`` records TAG as started once the headers are in, reads the whole body
    (Content-Length or chunked) and answers ``{"bytes": N, ...}``; ``/stream/TAG`` answers a
    chunked body ``first\\n`` and, once the test calls ``release(TAG)`` (or after 10 s),
    ``second\\n``; anything else answers the JSON echo. Every answer has the header
    ``X-Mixed-Case-Reply: yes`` and the JSON lists the request's raw header names."""

    def __init__(self, name: str, host: str, port: int = 0):
        self.name = name
        self.started: set[str] = set()
        self.events: dict[str, threading.Event] = defaultdict(threading.Event)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        backend = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    backend._serve(self.rfile, self.wfile)
                except (OSError, ValueError):
                    pass

        self.server = _Server((host, port), Handler)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=f"raw-{name}")

    def start(self) -> "RawHttpBackend":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def release(self, tag: str) -> None:
        self.events[tag].set()

    def _serve(self, rfile, wfile) -> None:
        line = rfile.readline(65536).decode("latin-1").rstrip("\r\n")
        if not line:
            return
        method, target, _ = line.split(" ", 2)
        raw_headers: list[tuple[str, str]] = []
        while True:
            h = rfile.readline(65536).decode("latin-1").rstrip("\r\n")
            if not h:
                break
            k, _, v = h.partition(":")
            raw_headers.append((k, v.strip()))
        hdr = {k.lower(): v for k, v in raw_headers}
        parts = [p for p in target.split("?", 1)[0].split("/") if p]
        tag = parts[1] if len(parts) > 1 else ""
        if parts[:1] == ["upload"]:
            with self._lock:
                self.started.add(tag)
        n = 0
        if hdr.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(rfile.readline(1024).split(b";")[0].strip(), 16)
                if size == 0:
                    while rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                left = size
                while left:
                    chunk = rfile.read(min(left, 65536))
                    if not chunk:
                        raise OSError("body ended early")
                    left -= len(chunk)
                rfile.readline(16)
                n += size
        elif "content-length" in hdr:
            left = int(hdr["content-length"])
            while left:
                chunk = rfile.read(min(left, 65536))
                if not chunk:
                    raise OSError("body ended early")
                left -= len(chunk)
                n += len(chunk)
        info = {"name": self.name, "method": method, "path": target, "bytes": n,
                "header_names": [k for k, _ in raw_headers], "headers": hdr}
        with self._lock:
            self.requests.append(info)
        head = f"HTTP/1.1 200 OK\r\nx-backend: {self.name}\r\n{MIXED_CASE_REPLY}: yes\r\nConnection: close\r\n"
        if parts[:1] == ["stream"]:
            wfile.write((head + "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
            wfile.write(b"6\r\nfirst\n\r\n")
            wfile.flush()
            self.events[tag].wait(10)
            wfile.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
            wfile.flush()
            return
        body = json.dumps(info).encode()
        wfile.write((head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                    + body)
        wfile.flush()


class WsEchoBackend:
    """WebSocket echo: every message comes back as ``NAME:message`` (text) or unchanged (binary)."""

    def __init__(self, name: str, host: str, port: int = 0):
        from websockets.sync.server import serve

        self.name = name

        def handler(ws):
            for msg in ws:
                ws.send(f"{name}:{msg}" if isinstance(msg, str) else msg)

        self.server = serve(handler, host, port)
        self.host, self.port = self.server.socket.getsockname()[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=f"ws-{name}")

    def start(self) -> "WsEchoBackend":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()


def http_exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the peer closes (bounded by timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk


class GrpcEchoBackend:
    """A grpcio server with raw-bytes methods of service ``mizzen.Echo``: ``Unary`` answers
    ``NAME:request`` with trailing metadata ``x-trailer: unary`` (request ``fail`` aborts
    with FAILED_PRECONDITION), ``ServerStream`` streams N messages ``0..N-1`` then the
    trailer ``x-trailer: stream``; ``Aborted`` is a unary method a fault rule answers."""

    def __init__(self, name: str, host: str, port: int):
        from concurrent import futures

        import grpc

        self.name = name
        self.calls: list[str] = []

        def unary(req: bytes, ctx):
            self.calls.append("Unary")
            if req == b"fail":
                ctx.set_trailing_metadata((("x-trailer", "failed"),))
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
            ctx.set_trailing_metadata((("x-trailer", "unary"),))
            return f"{name}:".encode() + req

        def stream(req: bytes, ctx):
            self.calls.append("ServerStream")
            for i in range(int(req)):
                yield str(i).encode()
            ctx.set_trailing_metadata((("x-trailer", "stream"),))

        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Aborted": grpc.unary_unary_rpc_method_handler(unary),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(stream)}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mizzen.Echo", handlers),))
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host

    def start(self) -> "GrpcEchoBackend":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)


class H2Backend:
    """A prior-knowledge h2c server (PyPI ``h2``) that records, per request, the ``:authority``
    and which TCP connection carried it; answers 200 with ``{"authority", "conn"}``."""

    def __init__(self, name: str, host: str, port: int = 0):
        import h2.config
        import h2.connection
        import h2.events

        self.name = name
        self.seen: list[tuple[str, int]] = []
        self._conns = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                with backend._lock:
                    backend._conns += 1
                    conn_id = backend._conns
                    backend._open.append(self.request)
                sock = self.request
                conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
                conn.initiate_connection()
                sock.sendall(conn.data_to_send())
                headers: dict[int, dict] = {}
                while True:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            headers[ev.stream_id] = {(k.decode() if isinstance(k, bytes) else k):
                                                     (v.decode() if isinstance(v, bytes) else v)
                                                     for k, v in ev.headers}
                        elif isinstance(ev, h2.events.DataReceived):
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if isinstance(ev, h2.events.StreamEnded):
                            h = headers.get(ev.stream_id, {})
                            auth = h.get(":authority") or h.get("host") or ""
                            with backend._lock:
                                backend.seen.append((auth, conn_id))
                            body = json.dumps({"authority": auth, "conn": conn_id, "name": backend.name}).encode()
                            conn.send_headers(ev.stream_id, [(":status", "200"), ("x-backend", backend.name),
                                                             ("content-length", str(len(body)))])
                            conn.send_data(ev.stream_id, body, end_stream=True)
                    sock.sendall(conn.data_to_send())

        self.server = _Server((host, port), Handler)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name=f"h2-{name}")

    def drop_connections(self) -> int:
        """Close every connection accepted so far (as a restarting server would)."""
        with self._lock:
            socks, self._open = self._open, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def start(self) -> "H2Backend":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
