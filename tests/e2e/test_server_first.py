"""A server-first protocol (MySQL-like: the server sends its greeting before the client says
anything) through the outbound capture path of a sidecar, once through Envoy and once through
the native proxy.

The client runs in a network namespace whose outbound TCP is captured by ``mizzen iptables``
to the sidecar's 15001; the sidecar hands the connection to the listener of its original
destination. Two Services front the same server: one port declared TCP (``tcp-mysql``), one
named ``db`` (protocol unknown: the proxy waits a short time for an HTTP request line or an
HTTP/2 preface, gets nothing, and proxies plain TCP, as Istio's sniffing does).
"""

from __future__ import annotations

import socketserver
import struct
import sys
import threading
from pathlib import Path

import pytest

from backend import port_free_on_all
from lib.envoy import resolve_envoy_elf
from lib.netns import NetNS
from lib.pilot import Pilot
from lib.procs import wait_until
from lib.router import CONFIGS, PROXY_KINDS, render, start_proxy, wait_acked
from test_pilot_envoy import PROXY_UID, exec_as, uid_dir

assert uid_dir  # a fixture, used by name below

TCP_CLUSTER_IP, AUTO_CLUSTER_IP = "10.96.0.21", "10.96.0.22"
GREETING = b"\x0a8.0.36-mizzen\x00"


def packet(seq: int, payload: bytes) -> bytes:
    """A MySQL wire packet: 3-byte little-endian length, sequence id, payload."""
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


class MySqlLike:
    """Sends a greeting packet on accept, then answers each packet ``Q`` with ``OK:<name>:Q``."""

    def __init__(self, name: str, host: str, port: int):
        self.name = name
        self.accepted = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer.accepted += 1
                s = self.request
                s.settimeout(10)
                try:
                    s.sendall(packet(0, GREETING))
                    f = s.makefile("rb")
                    while True:
                        head = f.read(4)
                        if len(head) < 4:
                            return
                        n = int.from_bytes(head[:3], "little")
                        q = f.read(n)
                        s.sendall(packet(head[3] + 1, b"OK:" + outer.name.encode() + b":" + q))
                except OSError:
                    return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "MySqlLike":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CLIENT = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
def read_packet():
    head = f.read(4)
    n = int.from_bytes(head[:3], "little")
    return head[3], f.read(n)
seq, greeting = read_packet()          # the server speaks first
out = {"greeting": greeting.hex(), "answers": []}
for i in range(3):
    q = ("SELECT %d" % i).encode()
    s.sendall(len(q).to_bytes(3, "little") + bytes([0]) + q)
    seq, a = read_packet()
    out["answers"].append(a.decode())
print(json.dumps(out))
"""


@pytest.mark.parametrize("proxy_kind", PROXY_KINDS)
def test_server_first_tcp_through_outbound_capture(require_root, mizzen_bin, envoy_bin, uid_dir, proxy_kind):
    import json

    ns = NetNS().create()
    db = pilot = proxy = None
    try:
        db_ip = ns.ip(21)
        ns.add_root_ip(db_ip)
        db_port = port_free_on_all([db_ip])
        db = MySqlLike("mysql-0", db_ip, db_port).start()
        values = {"TCP_CLUSTER_IP": TCP_CLUSTER_IP, "AUTO_CLUSTER_IP": AUTO_CLUSTER_IP, "DB_PORT": db_port,
                  "DB_IP": db_ip, "CLIENT_IP": ns.ns_ip}
        pilot = Pilot(mizzen_bin, uid_dir,
                      {"db.yaml": render(CONFIGS / "protocols" / "server-first.yaml.tmpl", values)},
                      xds_host=ns.root_ip, name=f"pilot-server-first-{proxy_kind}").start()
        # Istio's capture, by our own CLI: outbound only (-b ''), the proxy's uid excluded.
        ns.exec([str(mizzen_bin), "iptables", "-p", "15001", "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT",
                 "-i", "*", "-x", "", "-b", "", "-d", "15090,15021,15020"])
        proxy = start_proxy(proxy_kind, exec_as(PROXY_UID, mizzen_bin, uid_dir),
                            exec_as(PROXY_UID, Path(resolve_envoy_elf(str(envoy_bin))), uid_dir)
                            if proxy_kind == "envoy" else None,
                            "sidecar", pilot.xds_address, pod_name="client", namespace="default", ip=ns.ns_ip,
                            labels={"app": "client"}, workdir=uid_dir, netns=ns.name, uid=PROXY_UID)
        wait_acked(pilot, proxy.node_id)
        assert proxy.rejected() == {}

        def talk(ip: str, port: int):
            cp = ns.exec([sys.executable, "-c", CLIENT, ip, str(port)], check=False, timeout=30)
            return json.loads(cp.stdout) if cp.returncode == 0 else None

        before = db.accepted
        for ip, port in ((TCP_CLUSTER_IP, 3306), (AUTO_CLUSTER_IP, 3307)):
            got = wait_until(lambda: talk(ip, port), 20, interval=0.5,
                             what=f"MySQL-like exchange with {ip}:{port} from {ns.name}", proc=proxy.proc)
            assert bytes.fromhex(got["greeting"]) == GREETING, got
            assert got["answers"] == [f"OK:mysql-0:SELECT {i}" for i in range(3)], got
        assert db.accepted >= before + 2
        # Through the sidecar (its listeners for both ports), not around it: the ClusterIPs
        # exist nowhere but in the proxy's config.
        names = proxy.dynamic_names()["listeners"]
        assert "virtualOutbound" in names, names
        assert proxy.rejected() == {}
    finally:
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        if db is not None:
            db.stop()
        try:
            ns.exec([str(mizzen_bin), "iptables", "--cleanup-only"], check=False)
        finally:
            ns.delete()


