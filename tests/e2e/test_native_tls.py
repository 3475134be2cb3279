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

    def __init__(self, certs: Path):
        self.seen: list[dict] = []
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "server.pem", certs / "server-key.pem")
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
                with backend._lock:
                    backend.seen.append({"path": self.path, "sni": sni.get(id(self.connection)),
                                         "version": self.connection.version()})
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
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: origination
  namespace: default
spec:
  hosts: [origin.example.com, badca.example.com]
  gateways: [tls-gw]
  http:
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
    pilot = proxy = None
    try:
        values = {"HTTP_PORT": free_port("0.0.0.0"), "SIMPLE_PORT": free_port("0.0.0.0"),
                  "MUTUAL_PORT": free_port("0.0.0.0"), "CERTS": certs, "APP_PORT": app.port,
                  "TLS_BACKEND_PORT": tls_backend.port}
        pilot = Pilot(mizzen_bin, work, {"tls.yaml": render(CONFIG, values)}, name="pilot-tls").start()
        proxy = NativeProxy(mizzen_bin, "router", pilot.xds_address, "ingress-tls-0", "istio-system",
                            ROUTER_IP, {"istio": "ingressgateway"}, work).start()
        wait_acked(pilot, proxy.node_id)
        m = Mesh(work=work, certs=certs, app=app, tls_backend=tls_backend, pilot=pilot, proxy=proxy,
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
