"""TLS in the native Mizzen proxy, end to end with real TLS peers.

- Gateway SIMPLE and MUTUAL (serverCertificate / privateKey / caCertificates files) terminated
  by the native router, checked with curl: the chain verifies against our CA, SNI picks the
  filter chain, ALPN negotiates h2 or http/1.1, MUTUAL refuses a client without a certificate
  or with one from another CA.
- TLS origination (DestinationRule SIMPLE with caCertificates and sni) to an external TLS
  backend (Python's ssl server): the backend sees TLS with the configured SNI; a DestinationRule
  trusting the wrong CA gets 503 UF.
- A Gateway naming a certificate file that does not exist is NACKed with the path in the
  reason, and the other listeners keep serving.

The sidecar-to-sidecar mTLS with Envoy (ISTIO_MUTUAL, SDS `default` / `ROOTCA` from the
pilot's CA) is in test_native_mtls_interop below.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend import Backend
from lib.native import NativeProxy
from lib.pilot import Pilot, dump_json
from lib.procs import free_port, wait_until
from lib.router import wait_acked

ROUTER_IP = "127.0.0.100"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=d)


def make_leaf(d: Path, ca: str, name: str, sans: list[str], usage: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage={usage}\n"
                   "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}-key.pem",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


class TlsBackend:
    """An HTTPS server recording the SNI and path of every request it serves."""

    def __init__(self, certs: Path, require_client_cert: bool = False):
        self.seen: list[dict] = []
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "server.pem", certs / "server-key.pem")
        if require_client_cert:
            ctx.load_verify_locations(certs / "ca.pem")
            ctx.verify_mode = ssl.CERT_REQUIRED
        sni: dict[int, str | None] = {}

        def on_sni(sock, name, _ctx):
            sni[id(sock)] = name

        ctx.sni_callback = on_sni
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({"path": self.path, "tls": True}).encode()
                peer = self.connection.getpeercert() or {}
                uris = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
                with backend._lock:
                    backend.seen.append({"path": self.path, "sni": sni.get(id(self.connection)),
                                         "version": self.connection.version(), "client": uris})
                self.send_response(200)
                self.send_header("x-backend", "tls-backend")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        with self._lock:
            return [s["path"] for s in self.seen]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CONFIG = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: tls-gw
  namespace: default
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: {{HTTP_PORT}}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: {{SIMPLE_PORT}}, name: https-simple, protocol: HTTPS}
    hosts: [simple.example.com]
    tls:
      mode: SIMPLE
      serverCertificate: {{CERTS}}/server.pem
      privateKey: {{CERTS}}/server-key.pem
  - port: {number: {{MUTUAL_PORT}}, name: https-mutual, protocol: HTTPS}
    hosts: [mtls.example.com]
    tls:
      mode: MUTUAL
      serverCertificate: {{CERTS}}/server.pem
      privateKey: {{CERTS}}/server-key.pem
      caCertificates: {{CERTS}}/ca.pem
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: app
  namespace: default
spec:
  hosts: [app.internal.example]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http: {{APP_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: app
  namespace: default
spec:
  hosts: [simple.example.com, mtls.example.com]
  gateways: [tls-gw]
  http:
  - route:
    - destination: {host: app.internal.example}
---
# TLS origination: plain HTTP in, TLS to an external server trusted through caCertificates.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: secure
  namespace: default
spec:
  hosts: [secure.internal.example, badca.internal.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 443, name: http-tls, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http-tls: {{TLS_BACKEND_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: secure
  namespace: default
spec:
  host: secure.internal.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {{CERTS}}/ca.pem
      sni: secure.internal.example
      subjectAltNames: [secure.internal.example]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: badca
  namespace: default
spec:
  host: badca.internal.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {{CERTS}}/other-ca.pem
      sni: secure.internal.example
---
# MUTUAL origination: our client certificate from files, to a server that requires one.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: mutual
  namespace: default
spec:
  hosts: [mutual.internal.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 443, name: http-tls, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http-tls: {{MUTUAL_BACKEND_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: mutual
  namespace: default
spec:
  host: mutual.internal.example
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: {{CERTS}}/client.pem
      privateKey: {{CERTS}}/client-key.pem
      caCertificates: {{CERTS}}/ca.pem
      sni: secure.internal.example
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: origination
  namespace: default
spec:
  hosts: [origin.example.com, badca.example.com, mutual.example.com]
  gateways: [tls-gw]
  http:
  - match:
    - authority: {exact: mutual.example.com}
    route:
    - destination: {host: mutual.internal.example, port: {number: 443}}
  - match:
    - authority: {exact: badca.example.com}
    route:
    - destination: {host: badca.internal.example, port: {number: 443}}
  - route:
    - destination: {host: secure.internal.example, port: {number: 443}}
"""


def render(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    assert "{{" not in text, text
    return text


class Mesh:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def curl(self, host: str, port: int, path: str = "/", *args: str) -> subprocess.CompletedProcess:
        """curl https://HOST:PORT/PATH resolved to loopback; prints status and HTTP version."""
        return subprocess.run(
            ["curl", "-sS", "-m", "10", "--resolve", f"{host}:{port}:127.0.0.1", "-o", "/dev/null",
             "-w", "%{http_code} %{http_version}", *args, f"https://{host}:{port}{path}"],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def mesh(mizzen_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("native-tls")
    certs = work / "certs"
    certs.mkdir()
    make_ca(certs, "ca")
    make_ca(certs, "other-ca")
    make_leaf(certs, "ca", "server", ["DNS:simple.example.com", "DNS:mtls.example.com",
                                      "DNS:secure.internal.example"], "serverAuth")
    make_leaf(certs, "ca", "client", ["URI:spiffe://cluster.local/ns/default/sa/curl"], "clientAuth")
    make_leaf(certs, "other-ca", "intruder", ["URI:spiffe://cluster.local/ns/default/sa/curl"],
              "clientAuth")
    app = Backend("app", "v1", "127.0.0.1", 0).start()
    tls_backend = TlsBackend(certs)
    mutual_backend = TlsBackend(certs, require_client_cert=True)
    pilot = proxy = None
    try:
        values = {"HTTP_PORT": free_port("0.0.0.0"), "SIMPLE_PORT": free_port("0.0.0.0"),
                  "MUTUAL_PORT": free_port("0.0.0.0"), "CERTS": certs, "APP_PORT": app.port,
                  "TLS_BACKEND_PORT": tls_backend.port, "MUTUAL_BACKEND_PORT": mutual_backend.port}
        pilot = Pilot(mizzen_bin, work, {"tls.yaml": render(CONFIG, values)}, name="pilot-tls").start()
        proxy = NativeProxy(mizzen_bin, "router", pilot.xds_address, "ingress-tls-0", "istio-system",
                            ROUTER_IP, {"istio": "ingressgateway"}, work).start()
        wait_acked(pilot, proxy.node_id)
        m = Mesh(work=work, certs=certs, app=app, tls_backend=tls_backend, mutual_backend=mutual_backend,
                 pilot=pilot, proxy=proxy,
                 **{k.lower(): v for k, v in values.items() if k.endswith("_PORT")})
        wait_until(lambda: m.curl("simple.example.com", m.simple_port, "/",
                                  "--cacert", str(certs / "ca.pem")).stdout.startswith("200"),
                   15, what="simple.example.com served over TLS", proc=proxy.proc)
        yield m
    finally:
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        app.stop()
        tls_backend.stop()
        mutual_backend.stop()


def test_gateway_simple_tls_verifies_and_negotiates_alpn(mesh):
    ca = str(mesh.certs / "ca.pem")
    r = mesh.curl("simple.example.com", mesh.simple_port, "/simple/h2", "--cacert", ca, "--http2")
    assert r.stdout == "200 2", (r.stdout, r.stderr)
    r = mesh.curl("simple.example.com", mesh.simple_port, "/simple/h1", "--cacert", ca, "--http1.1")
    assert r.stdout == "200 1.1", (r.stdout, r.stderr)
    assert mesh.app.count("/simple/h2") == 1 and mesh.app.count("/simple/h1") == 1
    # The certificate chains to our CA only: a client trusting another CA refuses it.
    r = mesh.curl("simple.example.com", mesh.simple_port, "/x", "--cacert", str(mesh.certs / "other-ca.pem"))
    assert r.returncode != 0 and mesh.app.count("/x") == 0, (r.returncode, r.stdout, r.stderr)
    # The chain matches server_names: an SNI no server lists gets no chain (connection closed).
    r = mesh.curl("unknown.example.com", mesh.simple_port, "/unknown", "-k")
    assert r.returncode != 0 and mesh.app.count("/unknown") == 0, (r.returncode, r.stdout, r.stderr)
    # Plaintext on the TLS port matches no chain either.
    r = subprocess.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                        f"http://127.0.0.1:{mesh.simple_port}/plain"], capture_output=True, text=True, timeout=15)
    assert r.stdout in ("000", "") and mesh.app.count("/plain") == 0, (r.stdout, r.stderr)


def test_gateway_mutual_tls_requires_a_client_certificate_from_the_ca(mesh):
    ca = str(mesh.certs / "ca.pem")
    ok = mesh.curl("mtls.example.com", mesh.mutual_port, "/mutual/ok", "--cacert", ca,
                   "--cert", str(mesh.certs / "client.pem"), "--key", str(mesh.certs / "client-key.pem"))
    assert ok.stdout.startswith("200"), (ok.stdout, ok.stderr)
    none = mesh.curl("mtls.example.com", mesh.mutual_port, "/mutual/none", "--cacert", ca)
    assert not none.stdout.startswith("200"), (none.stdout, none.stderr)
    intruder = mesh.curl("mtls.example.com", mesh.mutual_port, "/mutual/intruder", "--cacert", ca,
                         "--cert", str(mesh.certs / "intruder.pem"),
                         "--key", str(mesh.certs / "intruder-key.pem"))
    assert not intruder.stdout.startswith("200"), (intruder.stdout, intruder.stderr)
    assert mesh.app.count("/mutual/ok") == 1
    assert mesh.app.count("/mutual/none") == 0 and mesh.app.count("/mutual/intruder") == 0


def test_tls_origination_to_an_external_tls_backend(mesh):
    import requests
    r = requests.get(f"http://127.0.0.1:{mesh.http_port}/originate", headers={"host": "origin.example.com"},
                     timeout=10)
    assert r.status_code == 200 and r.headers.get("x-backend") == "tls-backend", (r.status_code, r.text[:300])
    seen = [s for s in mesh.tls_backend.seen if s["path"] == "/originate"]
    assert len(seen) == 1 and seen[0]["sni"] == "secure.internal.example", mesh.tls_backend.seen
    # Trusting the wrong CA: the handshake fails and the request is a connect failure.
    r = requests.get(f"http://127.0.0.1:{mesh.http_port}/badca", headers={"host": "badca.example.com"},
                     timeout=10)
    assert r.status_code == 503, (r.status_code, r.text[:300])
    assert "/badca" not in mesh.tls_backend.paths()
    # MUTUAL: the backend requires a client certificate from our CA and gets the file one.
    r = requests.get(f"http://127.0.0.1:{mesh.http_port}/mutual", headers={"host": "mutual.example.com"},
                     timeout=10)
    assert r.status_code == 200 and r.headers.get("x-backend") == "tls-backend", (r.status_code, r.text[:300])
    seen = [s for s in mesh.mutual_backend.seen if s["path"] == "/mutual"]
    assert len(seen) == 1 and seen[0]["client"] == ["spiffe://cluster.local/ns/default/sa/curl"], \
        mesh.mutual_backend.seen


def test_missing_certificate_file_is_nacked_and_the_rest_keeps_serving(mesh):
    port = free_port("0.0.0.0")
    mesh.pilot.write("broken.yaml", f"""
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata:
          name: broken-gw
          namespace: default
        spec:
          selector:
            istio: ingressgateway
          servers:
          - port: {{number: {port}, name: https-broken, protocol: HTTPS}}
            hosts: [broken.example.com]
            tls:
              mode: SIMPLE
              serverCertificate: {mesh.certs}/missing.pem
              privateKey: {mesh.certs}/server-key.pem
        """)
    try:
        def nack():
            p = mesh.pilot.syncz_for(mesh.proxy.node_id) or {}
            for r in (p.get("resources") or {}).values():
                n = r.get("nack")
                if n and "missing.pem" in json.dumps(n):
                    return n
            return None
        n = wait_until(nack, 15, what="NACK naming missing.pem",
                       proc=mesh.proxy.proc)
        assert f"0.0.0.0_{port}" in json.dumps(n), dump_json(n)
        r = mesh.curl("simple.example.com", mesh.simple_port, "/after-nack", "--cacert", str(mesh.certs / "ca.pem"))
        assert r.stdout.startswith("200"), (r.stdout, r.stderr)
    finally:
        mesh.pilot.delete("broken.yaml")


# ============================================================================================
# Interop: an Envoy sidecar and a native Mizzen sidecar in mesh mTLS, both directions
# ============================================================================================
#
#     root ns: pilot (xDS + CA on A's veth address)
#       | veth                                    | veth
#     ns A: "front" app + Envoy sidecar  ==link==  ns B: "back" app + native Mizzen sidecar
#           inbound + outbound capture                   inbound + outbound capture
#
# Each side calls the other's service VIP; the calling sidecar originates Istio mTLS (auto mTLS:
# the pods carry security.istio.io/tlsMode=istio), the called one terminates it. A raw packet
# tap on A's end of the link shows what crosses it.

import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402

from lib.capture import apply_in_netns, istio_outbound_redirect_rules  # noqa: E402
from lib.envoy import EnvoyProxy, resolve_envoy_elf  # noqa: E402
from lib.netns import NetNS, _used_10_233  # noqa: E402
from lib.procs import Proc, run  # noqa: E402

PROXY_UID = 1337
APP_PORT = 8080
FRONT_VIP, BACK_VIP, FRONT_H2_VIP = "10.96.0.40", "10.96.0.41", "10.96.0.42"
FRONT_TCP_VIP, BACK_TCP_VIP = "10.96.0.43", "10.96.0.44"
H2_PORT = 8081
TCP_PORT = 8082
FRONT_ID = "spiffe://cluster.local/ns/default/sa/front"
BACK_ID = "spiffe://cluster.local/ns/default/sa/back"
HERE = Path(__file__).resolve().parent

# Reads every frame on one interface until told to stop (a line on stdin) or 30 s pass, then
# prints what it saw. Needs no tcpdump: an AF_PACKET socket inside the namespace.
TAP = r"""
import json, select, socket, sys, time
iface, markers = sys.argv[1], [m.encode() for m in sys.argv[2:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((iface, 0))
print("ready", flush=True)
seen = {m.decode(): 0 for m in markers}
frames = tls = http = 0
end = time.monotonic() + 30
while time.monotonic() < end:
    r, _, _ = select.select([s, sys.stdin], [], [], 0.2)
    if sys.stdin in r:
        break
    if s in r:
        f = s.recv(65535)
        frames += 1
        for m in markers:
            if m in f:
                seen[m.decode()] += 1
        if b"HTTP/1.1" in f:
            http += 1
        if b"\x17\x03\x03" in f or b"\x16\x03\x01" in f:
            tls += 1
print(json.dumps({"frames": frames, "markers": seen, "http": http, "tls": tls}), flush=True)
"""


def mesh_rules() -> str:
    """Istio's outbound REDIRECT capture plus inbound capture of the app port."""
    rules = istio_outbound_redirect_rules(15001, 15006, PROXY_UID, PROXY_UID)
    head, _, rest = rules.partition("-A ISTIO_INBOUND")
    return (head + "-A PREROUTING -p tcp -j ISTIO_INBOUND\n"
            f"-A ISTIO_INBOUND -p tcp --dport {APP_PORT} -j ISTIO_IN_REDIRECT\n"
            f"-A ISTIO_INBOUND -p tcp --dport {H2_PORT} -j ISTIO_IN_REDIRECT\n"
            f"-A ISTIO_INBOUND -p tcp --dport {TCP_PORT} -j ISTIO_IN_REDIRECT\n-A ISTIO_INBOUND" + rest)


def interop_config(front_ip: str, back_ip: str) -> str:
    out = []
    for name, ip, vip in (("front", front_ip, FRONT_VIP), ("back", back_ip, BACK_VIP)):
        out.append(f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: {name}, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: {name}
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]
status: {{podIP: {ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8000, targetPort: {APP_PORT}}}]
""")
    # An http2 port next to the Envoy sidecar: native -> Envoy is HTTP/2 inside mTLS.
    out.append(f"""
apiVersion: v1
kind: Service
metadata: {{name: front-h2, namespace: default}}
spec:
  clusterIP: {FRONT_H2_VIP}
  selector: {{app: front}}
  ports: [{{name: http2, port: 8001, targetPort: {H2_PORT}}}]
""")
    # The same apps behind TCP ports: tcp_proxy on both sides, still in mesh mTLS.
    for name, vip in (("front", FRONT_TCP_VIP), ("back", BACK_TCP_VIP)):
        out.append(f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}-tcp, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: {name}}}
  ports: [{{name: tcp, port: 8002, targetPort: {TCP_PORT}}}]
""")
    return "---".join(out)


class SecurePilot(Pilot):
    """The pilot with its CA: plaintext xDS and the TLS port (CSR API, xDS over TLS) on a
    root-side veth address both namespaces reach."""

    def __init__(self, mizzen_bin, workdir: Path, host: str):
        super().__init__(mizzen_bin, workdir, xds_host=host, name="pilot-interop")
        self.ca_dir = Path(workdir) / "ca"
        self.secure_port = free_port(host)

    @property
    def secure_address(self) -> str:
        return f"{self.xds_host}:{self.secure_port}"

    def start(self, ready_timeout: float = 20.0) -> "SecurePilot":
        argv = [self.mizzen_bin, "pilot", "--config-dir", str(self.config_dir),
                "--xds-addr", self.xds_address, "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}",
                "--ca-dir", str(self.ca_dir), "--secure-xds-addr", self.secure_address]
        self.proc = Proc(self.name, argv, self.workdir / f"{self.name}.log", env=dict(os.environ, NO_COLOR="1"))
        wait_until(lambda: self._get("/ready").status_code == 200, ready_timeout, what="pilot /ready",
                   proc=self.proc)
        wait_until(lambda: (self.ca_dir / "root-cert.pem").exists(), 10, what="root-cert.pem", proc=self.proc)
        os.chmod(self.ca_dir, 0o755)
        os.chmod(self.ca_dir / "root-cert.pem", 0o644)
        return self

    def token(self, sa: str, path: Path) -> Path:
        out = run([self.mizzen_bin, "pilot", "token", "--ca-dir", str(self.ca_dir),
                   "--namespace", "default", "--service-account", sa, "--ttl", "1h"])
        path.write_text(out.stdout)
        os.chmod(path, 0o644)
        return path


class Interop:
    def __init__(self, base: Path):
        self.base = base
        self.a = self.b = None
        self.procs: list = []

    def link(self) -> None:
        """A veth pair straight between A and B (the root namespace does not forward)."""
        used = _used_10_233()
        z = random.choice([x for x in range(10, 250) if x not in used and x not in (self.a.x, self.b.x)])
        suffix = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.link_a, link_b = f"mzia{suffix}"[:15], f"mzib{suffix}"[:15]
        run(["ip", "link", "add", self.link_a, "netns", self.a.name, "type", "veth",
             "peer", "name", link_b, "netns", self.b.name])
        self.front_ip, self.back_ip = f"10.233.{z}.1", f"10.233.{z}.2"
        self.a.exec(["ip", "addr", "add", f"{self.front_ip}/24", "dev", self.link_a])
        self.a.exec(["ip", "link", "set", self.link_a, "up"])
        self.b.exec(["ip", "addr", "add", f"{self.back_ip}/24", "dev", link_b])
        self.b.exec(["ip", "link", "set", link_b, "up"])

    def get(self, ns: NetNS, url: str, timeout: float = 5) -> tuple[int, dict | str]:
        """curl as root inside ns: captured to that namespace's sidecar."""
        cp = ns.exec(["curl", "-sS", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}", url],
                     check=False, timeout=timeout + 5)
        body, _, code = cp.stdout.rpartition("\n")
        try:
            parsed: dict | str = json.loads(body)
        except ValueError:
            parsed = body or cp.stderr
        return (int(code) if code.isdigit() else 0), parsed

    def tap(self) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.a.name, sys.executable, "-c", TAP, self.link_a,
                              *self.markers], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    def close(self):
        for p in reversed(self.procs):
            p.stop()
        for ns in (self.a, self.b):
            if ns is not None:
                ns.delete()


def plaintext_to_back(m: Interop, path: str) -> str:
    """A request straight to B's app port from A as the proxy uid (not captured on A's side):
    plaintext on the wire, into B's inbound capture."""
    cp = m.a.exec(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                   "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                   f"http://{m.back_ip}:{APP_PORT}{path}"], check=False, timeout=15)
    return cp.stdout


def installed_serials(m: Interop) -> list[str]:
    log = re.sub(r"\x1b\[[0-9;]*m", "", m.native.proc.log_text())
    return re.findall(r"workload certificate installed.*?serial=(\w+)", log)


def stop_tap(p: subprocess.Popen) -> dict:
    out, _ = p.communicate("stop\n", timeout=40)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interop(mizzen_bin, envoy_bin, require_root):
    base = Path(tempfile.mkdtemp(prefix="mizzen-e2e-interop-"))
    os.chmod(base, 0o755)
    m = Interop(base)
    try:
        m.a, m.b = NetNS("mzia").create(), NetNS("mzib").create()
        m.link()
        host = m.a.root_ip
        m.pilot = SecurePilot(mizzen_bin, base, host)
        m.pilot.write("interop.yaml", interop_config(m.front_ip, m.back_ip))
        m.pilot.start()
        m.procs.append(m.pilot)
        for ns, name in ((m.a, "front"), (m.b, "back")):
            m.procs.append(Proc(f"app-{name}", ["ip", "netns", "exec", ns.name, sys.executable,
                                                str(HERE / "backend.py"), "--name", name, "--host", "0.0.0.0",
                                                "--port", str(APP_PORT)], base / f"app-{name}.log"))
            apply_in_netns(ns, mesh_rules())
            m.procs.append(Proc(f"app-{name}-tcp", ["ip", "netns", "exec", ns.name, sys.executable,
                                                    str(HERE / "backend.py"), "--name", f"{name}-tcp",
                                                    "--host", "0.0.0.0", "--port", str(TCP_PORT)],
                                base / f"app-{name}-tcp.log"))
        # An http2 port: the app speaks HTTP/2 (prior knowledge) and HTTP/1.1 on one port and
        # says which one it got.
        m.procs.append(Proc("app-front-h2", ["ip", "netns", "exec", m.a.name, str(mizzen_bin), "sample-app",
                                             "--name", "front-h2", "--listen-address", "0.0.0.0",
                                             "--port", str(H2_PORT)], base / "app-front-h2.log"))
        mizzen = exec_as_copy(mizzen_bin, base)
        envoy = exec_as_copy(Path(resolve_envoy_elf(str(envoy_bin))), base)
        root = str(m.pilot.ca_dir / "root-cert.pem")

        def identity(sa: str) -> list[str]:
            return ["--service-account", sa, "--ca-address", m.pilot.secure_address,
                    "--token-file", str(m.pilot.token(sa, base / f"{sa}.token")), "--root-cert", root]
        agent_dir = base / "front-agent"
        agent_dir.mkdir()
        os.chown(agent_dir, PROXY_UID, PROXY_UID)  # the agent (proxy uid) writes its SDS socket here
        m.envoy = EnvoyProxy(mizzen, envoy, "sidecar", m.pilot.secure_address, "front", "default", m.front_ip,
                             {"app": "front", "security.istio.io/tlsMode": "istio"}, base, netns=m.a.name,
                             uid=PROXY_UID, extra_args=identity("front") + ["--config-path", str(base / "front-agent")])
        m.procs.append(m.envoy)
        m.envoy.start()
        # xDS on the TLS port too (CA address = discovery address, as for the agent).
        m.native = NativeProxy(mizzen, "sidecar", m.pilot.secure_address, "back", "default", m.back_ip,
                               {"app": "back", "security.istio.io/tlsMode": "istio"}, base,
                               extra_args=identity("back") + ["--cert-rotation-interval", "2s"],
                               netns=m.b.name, uid=PROXY_UID)
        m.procs.append(m.native)
        m.native.start()
        wait_acked(m.pilot, m.native.node_id)
        for ns, vip, name in ((m.a, BACK_VIP, "back"), (m.b, FRONT_VIP, "front")):
            wait_until(lambda: m.get(ns, f"http://{vip}:8000/warmup")[0] == 200 or None, 30, interval=0.3,
                       what=f"{name} reachable through both sidecars", proc=m.native.proc)
        yield m
    finally:
        m.close()
        shutil.rmtree(base, ignore_errors=True)


def exec_as_copy(path: Path, into: Path) -> str:
    """A copy of path the proxy uid can execute (pytest's tmp dirs are 0700)."""
    dest = into / "bin" / Path(path).name
    dest.parent.mkdir(exist_ok=True)
    os.chmod(dest.parent, 0o755)
    shutil.copy2(path, dest)
    os.chmod(dest, 0o755)
    return str(dest)


def test_envoy_and_native_sidecars_talk_mtls_both_ways(interop):
    m = interop
    there, back_again = f"/interop/{uuid.uuid4().hex}", f"/interop/{uuid.uuid4().hex}"
    control = f"/control/{uuid.uuid4().hex}"
    m.markers = [there, back_again, control]
    tap = m.tap()
    try:
        # Envoy (A) -> native (B) and native (B) -> Envoy (A), HTTP through both sidecars.
        code, body = m.get(m.a, f"http://{BACK_VIP}:8000{there}")
        assert code == 200 and body["name"] == "back", (code, body)
        # The native inbound tells the app who called, as Envoy does (APPEND_FORWARD).
        xfcc = body["headers"].get("x-forwarded-client-cert", "")
        assert xfcc.startswith(f"By={BACK_ID};Hash=") and xfcc.endswith(f";URI={FRONT_ID}"), body["headers"]
        code, body = m.get(m.b, f"http://{FRONT_VIP}:8000{back_again}")
        assert code == 200 and body["name"] == "front", (code, body)
        # Envoy's inbound names the caller it verified: the native sidecar's SPIFFE id.
        xfcc = body["headers"].get("x-forwarded-client-cert", "")
        assert f"URI={BACK_ID}" in xfcc, body["headers"]
        # Control: the same tap does see cleartext HTTP on the link (the proxy uid is not
        # captured, so this request crosses in plaintext to B's inbound, PERMISSIVE by default).
        assert plaintext_to_back(m, control) == "200"
    finally:
        seen = stop_tap(tap)
    assert seen["markers"][control] > 0, seen
    assert seen["markers"][there] == 0 and seen["markers"][back_again] == 0, seen
    assert seen["tls"] > 0, seen
    # Both took every resource the pilot sent, the TLS contexts included.
    assert m.native.rejected() == {}
    m.envoy.assert_no_rejected_updates()


def test_native_sidecar_strips_a_forged_client_cert_header_from_plaintext(interop):
    m = interop
    cp = m.a.exec(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                   "curl", "-sS", "-m", "5", "-H", f"x-forwarded-client-cert: By=x;URI={FRONT_ID}",
                   f"http://{m.back_ip}:{APP_PORT}/forged"], check=False, timeout=15)
    seen = json.loads(cp.stdout)["headers"]
    assert seen["x-request-id"] and "x-forwarded-client-cert" not in seen, seen


def test_native_metrics_carry_the_security_policy_and_principals(interop):
    m = interop
    path = f"/metrics-check/{uuid.uuid4().hex}"
    for ns, vip in ((m.a, BACK_VIP), (m.b, FRONT_VIP)):
        code, _ = m.get(ns, f"http://{vip}:8000{path}")
        assert code == 200
    text = m.native.prometheus()
    lines = [l for l in text.splitlines() if l.startswith("istio_requests_total{")]
    inbound = [l for l in lines if 'reporter="destination"' in l]
    outbound = [l for l in lines if 'reporter="source"' in l and "front.default.svc.cluster.local" in l]
    assert any('connection_security_policy="mutual_tls"' in l and f'source_principal="{FRONT_ID}"' in l
               and f'destination_principal="{BACK_ID}"' in l for l in inbound), "\n".join(lines)
    assert any(f'source_principal="{BACK_ID}"' in l and f'destination_principal="{FRONT_ID}"' in l
               for l in outbound), "\n".join(lines)
    # The control request above came in plaintext: reported as such.
    assert any('connection_security_policy="none"' in l for l in inbound), "\n".join(lines)


def test_native_rotates_its_certificate_without_dropping_requests(interop):
    """The native sidecar renews every 2 s here; traffic through it in both directions keeps
    succeeding across several renewals (new handshakes take the new certificate, open
    connections are left alone)."""
    m = interop
    before = installed_serials(m)
    codes = []
    deadline = time.monotonic() + 30
    while len(set(installed_serials(m)) - set(before)) < 2 and time.monotonic() < deadline:
        codes.append(m.get(m.a, f"http://{BACK_VIP}:8000/rotation")[0])
        codes.append(m.get(m.b, f"http://{FRONT_VIP}:8000/rotation")[0])
    new = set(installed_serials(m)) - set(before)
    assert len(new) >= 2, (before, installed_serials(m))
    assert codes and all(c == 200 for c in codes), codes


def test_native_proxy_is_not_ready_without_its_certificate(interop, tmp_path):
    """Readiness waits for the workload certificate as well as the config (Envoy's listeners
    warm until their SDS secret arrives): a proxy whose CSR the CA refuses (its token names
    another service account) gets its whole config over xDS and still answers 503 on
    /healthz/ready, so no traffic is sent to a sidecar that cannot do mesh mTLS yet."""
    m = interop
    os.chmod(tmp_path, 0o755)
    token = m.pilot.token("someone-else", tmp_path / "someone-else.token")
    lost = NativeProxy(m.native.mizzen_bin, "router", m.pilot.secure_address, "lost", "default", "127.0.0.1",
                       {"app": "lost"}, tmp_path,
                       extra_args=["--service-account", "lost", "--ca-address", m.pilot.secure_address,
                                   "--token-file", str(token), "--root-cert", str(m.pilot.ca_dir / "root-cert.pem")])
    lost.start(wait_ready=False)
    try:
        # Its config is complete (over the TLS port, which needs no client certificate) ...
        wait_until(lambda: "first complete config" in lost.proc.log_text() or None, 15, interval=0.3,
                   what="the proxy's complete config", proc=lost.proc)
        wait_until(lambda: "workload certificate request failed" in lost.proc.log_text() or None, 15,
                   interval=0.3, what="the CA refusing the CSR in the proxy's log", proc=lost.proc)
        # ... yet it is not ready without its certificate.
        assert lost.get(lost.status_port, "/healthz/ready").status_code == 503
        assert m.native.ready()  # the one with its own token is
    finally:
        lost.stop()


def test_strict_peer_authentication_refuses_plaintext_at_the_native_sidecar(interop):
    m = interop
    m.pilot.write("strict.yaml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: default}
        spec:
          mtls: {mode: STRICT}
        """)
    try:
        wait_until(lambda: plaintext_to_back(m, "/strict-plain") != "200", 15,
                   what="plaintext refused by the native sidecar under STRICT", proc=m.native.proc)
        code, body = m.get(m.a, f"http://{BACK_VIP}:8000/strict-mtls")
        assert code == 200 and body["name"] == "back", (code, body)
        assert m.native.rejected() == {}
    finally:
        m.pilot.delete("strict.yaml")


def test_http2_over_mesh_mtls_from_native_to_envoy_keeps_the_authority(interop):
    """native -> Envoy on an http2 port: HTTP/2 inside Istio mTLS (Envoy's stats say so),
    with the request's host as :authority, not the endpoint address; Envoy's inbound cluster
    of an http2 port speaks HTTP/2 to the app too, as istiod configures it."""
    m = interop
    code, body = m.get(m.b, f"http://{FRONT_H2_VIP}:8001/headers")
    assert code == 200, (code, body)
    assert body["protocol"] == "HTTP/2.0", body
    assert body["headers"]["Host"] == f"{FRONT_H2_VIP}:8001", body
    h2 = {k: v for k, v in m.envoy.stats().items() if "inbound_0.0.0.0_8081" in k and k.endswith("downstream_rq_http2_total")}
    assert h2 and all(v >= 1 for v in h2.values()), h2
    lines = [l for l in m.native.prometheus().splitlines()
             if l.startswith("istio_requests_total{") and "front-h2" in l]
    assert any(f'destination_principal="{FRONT_ID}"' in l for l in lines), lines


def test_tcp_over_mesh_mtls_both_ways(interop):
    """TCP ports (tcp_proxy) between the two sidecars: still Istio mTLS, both directions; the
    bytes are the apps' own HTTP, so the app answers and the tap sees none of it."""
    m = interop
    a_to_b, b_to_a = f"/tcp/{uuid.uuid4().hex}", f"/tcp/{uuid.uuid4().hex}"
    m.markers = [a_to_b, b_to_a]
    tap = m.tap()
    try:
        code, body = m.get(m.a, f"http://{BACK_TCP_VIP}:8002{a_to_b}")
        assert code == 200 and body["name"] == "back-tcp" and body["path"] == a_to_b, (code, body)
        code, body = m.get(m.b, f"http://{FRONT_TCP_VIP}:8002{b_to_a}")
        assert code == 200 and body["name"] == "front-tcp" and body["path"] == b_to_a, (code, body)
    finally:
        seen = stop_tap(tap)
    assert seen["markers"] == {a_to_b: 0, b_to_a: 0} and seen["tls"] > 0, seen
