"""Mesh mTLS end to end between two real Envoy sidecars, each in its own network namespace
behind Istio's capture rules, with the pilot's CA issuing their certificates.

Topology (one module-scoped mesh, shared by the tests in order):

    root ns: pilot (xDS + CA on A's veth address), "peek" and TLS test servers
      | veth                                  | veth
    ns A: sleep (client) + Envoy sidecar  ==direct veth==  ns B: httpbin + Envoy sidecar
          outbound capture -> 15001          10.233.Z.1 / .2       inbound capture -> 15006

What is shown: auto mTLS (the client's Envoy originates Istio mTLS to endpoints labelled
``security.istio.io/tlsMode=istio``; the bytes on the wire are a TLS ClientHello with Istio's
SNI and ALPN, not HTTP), DestinationRule TLS overriding it (DISABLE; MUTUAL origination with
files to an external TLS server, with a SAN that is checked), PeerAuthentication (PERMISSIVE
by default, namespace STRICT refusing a plaintext client, a workload's port-level DISABLE,
each pushed live), and the peer identity in ``x-forwarded-client-cert`` and the access log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import requests

from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.envoy import EnvoyProxy, resolve_envoy_elf
from lib.netns import NetNS, _used_10_233
from lib.pilot import Pilot
from lib.procs import Proc, free_port, run, wait_until

PROXY_UID = 1337
HTTPBIN_VIP = "10.96.0.20"
PEEK_VIP = "10.96.0.21"
PEEK_PLAIN_VIP = "10.96.0.22"
EXTERNAL_VIP = "10.96.0.23"
APP_PORT = 8080
TD = "cluster.local"
SLEEP_ID = f"spiffe://{TD}/ns/default/sa/sleep"
HTTPBIN_ID = f"spiffe://{TD}/ns/default/sa/httpbin"
HERE = Path(__file__).resolve().parent


def exec_as(uid: int, path: Path, into: Path) -> str:
    """A copy of path in into/bin that uid can execute (pytest's tmp dirs are 0700)."""
    dest = into / "bin" / Path(path).name
    dest.parent.mkdir(exist_ok=True)
    os.chmod(dest.parent, 0o755)
    shutil.copy2(path, dest)
    os.chmod(dest, 0o755)
    return str(dest)


# --------------------------------------------------------------------------------------------
# Test servers in the root namespace
# --------------------------------------------------------------------------------------------
class Peek:
    """A TCP server that records the first bytes of each connection and closes it: what a
    sidecar really puts on the wire."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with c:
                c.settimeout(2)
                try:
                    self.seen.append(c.recv(4096))
                except OSError:
                    self.seen.append(b"")

    def stop(self):
        self._stop.set()
        self._t.join(timeout=3)
        self.sock.close()


class TlsEcho:
    """HTTPS server requiring a client certificate from the test CA; answers with the client
    certificate's subject CN and the TLS SNI it was asked for."""

    def __init__(self, host: str, certs: dict[str, Path]):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs["server_cert"], certs["server_key"])
        ctx.load_verify_locations(certs["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda s, name, c: self.sni.append(name)
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            raw.settimeout(5)
            with self.ctx.wrap_socket(raw, server_side=True) as c:
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = c.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                cn = dict(x[0] for x in c.getpeercert()["subject"]).get("commonName", "")
                body = json.dumps({"client_cn": cn, "sni": self.sni[-1] if self.sni else None,
                                   "tls": c.version()}).encode()
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                          b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except (OSError, ssl.SSLError):
            pass

    def stop(self):
        self._stop.set()
        self._t.join(timeout=3)
        self.sock.close()


def make_certs(d: Path) -> dict[str, Path]:
    """A test CA, a server cert for api.external.test and a client cert (CN mesh-client)."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*a):
        run(["openssl", *a], timeout=30)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=e2e-ca",
         "-keyout", d / "ca.key", "-out", d / "ca.pem")
    for name, cn, ext in (("server", "api.external.test", "subjectAltName=DNS:api.external.test"),
                          ("client", "mesh-client", "subjectAltName=DNS:mesh-client")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")
        (d / f"{name}.ext").write_text(ext + "\n")
        ossl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")
    for f in d.iterdir():
        os.chmod(f, 0o644)  # Envoy runs as the proxy uid
    return {"ca": d / "ca.pem", "server_cert": d / "server.pem", "server_key": d / "server.key",
            "client_cert": d / "client.pem", "client_key": d / "client.key"}


# --------------------------------------------------------------------------------------------
# The mesh
# --------------------------------------------------------------------------------------------
def inbound_rules(port: int) -> str:
    """Istio's inbound REDIRECT capture (``istio-iptables -b PORT``) for the app port."""
    return f"""*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport {port} -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
COMMIT
"""


def pod(name: str, sa: str, ip: str, app: str) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: {app}, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: {sa}
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]
status: {{podIP: {ip}}}
---"""


def mesh_config(a_ip: str, b_ip: str, peek_host: str, peek_port: int, tls_port: int, certs) -> str:
    return f"""{pod("sleep", "sleep", a_ip, "sleep")}
{pod("httpbin", "httpbin", b_ip, "httpbin")}
apiVersion: v1
kind: Service
metadata: {{name: httpbin, namespace: default}}
spec:
  clusterIP: {HTTPBIN_VIP}
  selector: {{app: httpbin}}
  ports: [{{name: http, port: 8000, targetPort: {APP_PORT}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: peek, namespace: default}}
spec:
  hosts: [peek.mesh.test]
  addresses: [{PEEK_VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9000, name: http, protocol: HTTP, targetPort: {peek_port}}}]
  endpoints:
  - address: {peek_host}
    serviceAccount: peek
    labels: {{security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: peek-plain, namespace: default}}
spec:
  hosts: [peek-plain.mesh.test]
  addresses: [{PEEK_PLAIN_VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9001, name: http, protocol: HTTP, targetPort: {peek_port}}}]
  endpoints:
  - address: {peek_host}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: default}}
spec:
  hosts: [api.external.test]
  addresses: [{EXTERNAL_VIP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]
  endpoints:
  - address: {peek_host}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external-api, namespace: default}}
spec:
  host: api.external.test
  trafficPolicy:
    tls:
      mode: MUTUAL
      caCertificates: {certs["ca"]}
      clientCertificate: {certs["client_cert"]}
      privateKey: {certs["client_key"]}
      sni: api.external.test
      subjectAltNames: [api.external.test]
"""


class SecureMeshPilot(Pilot):
    """A pilot with its CA on, both ports on a root-side veth address both namespaces reach."""

    def __init__(self, mizzen_bin, workdir: Path, host: str):
        super().__init__(mizzen_bin, workdir, xds_host=host, name="pilot-mtls")
        self.ca_dir = Path(workdir) / "ca"
        self.secure_port = free_port(host)

    @property
    def secure_address(self) -> str:
        return f"{self.xds_host}:{self.secure_port}"

    def start(self, ready_timeout: float = 20.0) -> "SecureMeshPilot":
        argv = [self.mizzen_bin, "pilot", "--config-dir", str(self.config_dir),
                "--xds-addr", self.xds_address, "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}",
                "--ca-dir", str(self.ca_dir), "--secure-xds-addr", self.secure_address]
        self.proc = Proc(self.name, argv, self.workdir / f"{self.name}.log",
                         env=dict(os.environ, NO_COLOR="1"))
        wait_until(lambda: self._get("/ready").status_code == 200, ready_timeout,
                   what="pilot /ready", proc=self.proc)
        wait_until(lambda: (self.ca_dir / "root-cert.pem").exists(), 10, what="root-cert.pem",
                   proc=self.proc)
        os.chmod(self.ca_dir, 0o755)
        os.chmod(self.ca_dir / "root-cert.pem", 0o644)
        return self

    def token(self, sa: str, path: Path) -> Path:
        out = run([self.mizzen_bin, "pilot", "token", "--ca-dir", str(self.ca_dir),
                   "--namespace", "default", "--service-account", sa, "--ttl", "1h"])
        path.write_text(out.stdout)
        os.chmod(path, 0o644)
        return path


class Mesh:
    def __init__(self, base: Path):
        self.base = base
        self.a = self.b = None
        self.link = None
        self.procs: list = []
        self.servers: list = []

    def link_namespaces(self):
        """A veth pair straight between A and B (the root namespace does not forward)."""
        used = _used_10_233()
        free = [x for x in range(10, 250) if x not in used and x not in (self.a.x, self.b.x)]
        self.z = random.choice(free)
        suffix = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.link = (f"mzla{suffix}"[:15], f"mzlb{suffix}"[:15])
        run(["ip", "link", "add", self.link[0], "netns", self.a.name, "type", "veth",
             "peer", "name", self.link[1], "netns", self.b.name])
        self.a_ip, self.b_ip = f"10.233.{self.z}.1", f"10.233.{self.z}.2"
        self.a.exec(["ip", "addr", "add", f"{self.a_ip}/24", "dev", self.link[0]])
        self.a.exec(["ip", "link", "set", self.link[0], "up"])
        self.b.exec(["ip", "addr", "add", f"{self.b_ip}/24", "dev", self.link[1]])
        self.b.exec(["ip", "link", "set", self.link[1], "up"])

    def close(self):
        for p in reversed(self.procs):
            p.stop()
        for s in self.servers:
            s.stop()
        for ns in (self.a, self.b):
            if ns is not None:
                ns.delete()


@pytest.fixture(scope="module")
def mesh(mizzen_bin, envoy_bin):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, iptables)")
    base = Path(tempfile.mkdtemp(prefix="mizzen-e2e-mtls-"))
    os.chmod(base, 0o755)
    m = Mesh(base)
    try:
        m.a, m.b = NetNS("mza").create(), NetNS("mzb").create()
        m.link_namespaces()
        host = m.a.root_ip  # root side: reachable from both namespaces
        m.certs = make_certs(base / "certs")
        m.peek = Peek(host)
        m.tls = TlsEcho(host, m.certs)
        m.servers += [m.peek, m.tls]
        m.pilot = SecureMeshPilot(mizzen_bin, base, host)
        m.pilot.write("mesh.yaml", mesh_config(m.a_ip, m.b_ip, host, m.peek.port, m.tls.port, m.certs))
        m.pilot.start()
        m.procs.append(m.pilot)

        # httpbin: the app on 0.0.0.0:8080 inside B, behind inbound capture.
        m.app = Proc("httpbin", ["ip", "netns", "exec", m.b.name, sys.executable, str(HERE / "backend.py"),
                                 "--name", "httpbin", "--host", "0.0.0.0", "--port", str(APP_PORT)],
                     base / "httpbin.log")
        m.procs.append(m.app)
        apply_in_netns(m.b, inbound_rules(APP_PORT))
        apply_in_netns(m.a, istio_outbound_redirect_rules(15001, 15006, PROXY_UID, PROXY_UID))

        mizzen = exec_as(PROXY_UID, mizzen_bin, base)
        envoy = exec_as(PROXY_UID, Path(resolve_envoy_elf(str(envoy_bin))), base)
        root = m.pilot.ca_dir / "root-cert.pem"
        m.proxies = {}
        for ns, pod_name, ip, app in ((m.a, "sleep", m.a_ip, "sleep"), (m.b, "httpbin", m.b_ip, "httpbin")):
            token = m.pilot.token(pod_name, base / f"{pod_name}.token")
            home = base / f"sidecar-{pod_name}-home"
            p = EnvoyProxy(mizzen, envoy, "sidecar", m.pilot.secure_address, pod_name, "default", ip,
                           {"app": app, "security.istio.io/tlsMode": "istio"}, base, netns=ns.name,
                           uid=PROXY_UID,
                           extra_args=["--service-account", pod_name, "--ca-address", m.pilot.secure_address,
                                       "--token-file", str(token), "--root-cert", str(root),
                                       "--config-path", str(home / "agent")])
            m.procs.append(p)
            m.proxies[pod_name] = p.start()
        yield m
    finally:
        m.close()
        shutil.rmtree(base, ignore_errors=True)


def client_get(m: Mesh, url: str, headers: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    """curl from the client app in A (root, so captured to A's sidecar)."""
    argv = ["curl", "-sS", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    cp = m.a.exec(argv + [url], check=False, timeout=timeout + 5)
    body, _, code = cp.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def httpbin(m: Mesh) -> dict | None:
    code, body = client_get(m, f"http://{HTTPBIN_VIP}:8000/mtls")
    return json.loads(body) if code == 200 else None


def plaintext_from_root(m: Mesh) -> int | None:
    """A client without sidecar: straight to B's address from the root namespace."""
    try:
        return requests.get(f"http://{m.b.ns_ip}:{APP_PORT}/plain", timeout=3).status_code
    except requests.RequestException:
        return None


def no_nacks(m: Mesh):
    for p in m.proxies.values():
        p.assert_no_rejected_updates()


# --------------------------------------------------------------------------------------------
# Tests (module order matters: PeerAuthentication is changed live along the way)
# --------------------------------------------------------------------------------------------
def test_auto_mtls_between_sidecars_is_tls_on_the_wire(mesh):
    m = mesh
    # A plaintext peer of a tlsMode=istio endpoint sees a TLS ClientHello carrying Istio's SNI
    # and ALPN, never the HTTP request.
    before = len(m.peek.seen)
    client_get(m, f"http://{PEEK_VIP}:9000/secret-path")
    wait_until(lambda: len(m.peek.seen) > before, 10, what="the peek server got a connection")
    hello = m.peek.seen[-1]
    assert hello[:1] == b"\x16" and hello[1:2] == b"\x03", hello[:64]
    assert b"outbound_.9000_._.peek.mesh.test" in hello, hello
    assert b"istio-peer-exchange" in hello and b"secret-path" not in hello, hello
    # An endpoint without the label gets plaintext.
    before = len(m.peek.seen)
    client_get(m, f"http://{PEEK_PLAIN_VIP}:9001/plain-path")
    wait_until(lambda: len(m.peek.seen) > before, 10, what="the peek server got a connection")
    assert m.peek.seen[-1].startswith(b"GET /plain-path "), m.peek.seen[-1][:64]

    # Sidecar to sidecar: served, and the server side saw the client's SPIFFE identity.
    echo = wait_until(lambda: httpbin(m), 20, interval=0.3, what="sleep -> httpbin through both sidecars")
    xfcc = echo["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={SLEEP_ID}" in xfcc and f"By={HTTPBIN_ID}" in xfcc, echo["headers"]
    stats = m.proxies["httpbin"].stats()
    assert stats.get("listener.0.0.0.0_15006.ssl.versions.TLSv1.3", 0) >= 1, \
        {k: v for k, v in stats.items() if "ssl" in k and "15006" in k}
    assert stats.get("listener.0.0.0.0_15006.ssl.handshake", 0) >= 1
    client_stats = m.proxies["sleep"].stats()
    assert client_stats.get("cluster.outbound|8000||httpbin.default.svc.cluster.local.ssl.handshake", 0) >= 1
    # The access logs name the connection's security and the peers.
    wait_until(lambda: f"connection_security_policy=mutual_tls downstream_peer={SLEEP_ID}"
               in m.proxies["httpbin"].proc.log_text(), 10, what="httpbin's access log line")
    wait_until(lambda: f"upstream_peer={HTTPBIN_ID}" in m.proxies["sleep"].proc.log_text(), 10,
               what="sleep's access log names httpbin's identity")
    # Default PERMISSIVE: a client without sidecar is served too, and logged as such.
    assert plaintext_from_root(m) == 200
    wait_until(lambda: "connection_security_policy=none" in m.proxies["httpbin"].proc.log_text(), 10,
               what="plaintext access log line")
    no_nacks(m)


def test_auto_mtls_checks_the_destination_identity(mesh):
    """The client accepts only the service accounts the registry says the service runs as: if
    httpbin's pod claimed another one, its real certificate (sa/httpbin) is refused."""
    m = mesh
    text = m.pilot.path("mesh.yaml").read_text()
    wrong = text.replace("serviceAccountName: httpbin", "serviceAccountName: impostor")
    assert wrong != text
    m.pilot.write("mesh.yaml", wrong)
    try:
        wait_until(lambda: client_get(m, f"http://{HTTPBIN_VIP}:8000/mtls", timeout=3)[0] == 503, 15,
                   interval=0.5, what="httpbin refused: its certificate is not sa/impostor")
        san = "cluster.outbound|8000||httpbin.default.svc.cluster.local.ssl.fail_verify_san"
        assert m.proxies["sleep"].stats().get(san, 0) >= 1, "refused for another reason than the SAN"
    finally:
        m.pilot.write("mesh.yaml", text)
    wait_until(lambda: httpbin(m), 15, interval=0.5, what="served again with the right identity")
    no_nacks(m)


def test_destination_rule_disable_overrides_auto_mtls(mesh):
    m = mesh
    m.pilot.write("peek-dr.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: peek, namespace: default}
        spec:
          host: peek.mesh.test
          trafficPolicy: {tls: {mode: DISABLE}}
        """)

    def plaintext_seen():
        before = len(m.peek.seen)
        client_get(m, f"http://{PEEK_VIP}:9000/after-disable", timeout=3)
        wait_until(lambda: len(m.peek.seen) > before, 5, what="a peek connection")
        return m.peek.seen[-1].startswith(b"GET /after-disable ")
    wait_until(plaintext_seen, 15, interval=0.5, what="DISABLE makes the sidecar send plaintext")
    m.pilot.delete("peek-dr.yaml")
    no_nacks(m)


def test_destination_rule_mutual_tls_origination_to_external_service(mesh):
    m = mesh

    def call():
        code, body = client_get(m, f"http://{EXTERNAL_VIP}/api")
        return json.loads(body) if code == 200 else None
    out = wait_until(call, 15, interval=0.3, what="TLS origination to api.external.test")
    assert out["client_cn"] == "mesh-client" and out["sni"] == "api.external.test", out
    # The server's SAN is checked: another expected name fails the handshake.
    m.pilot.write("mesh.yaml", m.pilot.path("mesh.yaml").read_text().replace(
        "subjectAltNames: [api.external.test]", "subjectAltNames: [other.external.test]"))
    wait_until(lambda: client_get(m, f"http://{EXTERNAL_VIP}/api", timeout=3)[0] == 503, 15,
               interval=0.5, what="a SAN mismatch refused")
    m.pilot.write("mesh.yaml", m.pilot.path("mesh.yaml").read_text().replace(
        "subjectAltNames: [other.external.test]", "subjectAltNames: [api.external.test]"))
    wait_until(call, 15, interval=0.3, what="origination works again")
    no_nacks(m)


def test_peer_authentication_strict_namespace_and_port_level_override(mesh):
    m = mesh
    # Mesh PERMISSIVE, namespace STRICT: the namespace wins; a plaintext client is refused,
    # the mesh client is still served over mTLS.
    m.pilot.write("pa-mesh.yaml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: PERMISSIVE}}
        """)
    m.pilot.write("pa-ns.yaml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: default}
        spec: {mtls: {mode: STRICT}}
        """)
    wait_until(lambda: plaintext_from_root(m) is None, 15, interval=0.5,
               what="STRICT refuses a client without sidecar")
    echo = httpbin(m)
    assert echo and f"URI={SLEEP_ID}" in echo["headers"].get("x-forwarded-client-cert", ""), echo

    # A workload policy (mode UNSET: inherits STRICT) turns mTLS off on port 8080: plaintext is
    # served, and the client's auto mTLS follows (sends plaintext, no client cert to forward).
    m.pilot.write("pa-httpbin.yaml", f"""
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: httpbin, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          portLevelMtls:
            "{APP_PORT}": {{mode: DISABLE}}
        """)
    wait_until(lambda: plaintext_from_root(m) == 200, 15, interval=0.5,
               what="port-level DISABLE serves plaintext")
    echo = wait_until(lambda: (e := httpbin(m)) and "x-forwarded-client-cert" not in e["headers"] and e,
                      15, interval=0.5, what="the mesh client switches to plaintext")
    assert echo["name"] == "httpbin"

    # Back to the namespace's STRICT when the workload policy goes.
    m.pilot.delete("pa-httpbin.yaml")
    wait_until(lambda: plaintext_from_root(m) is None, 15, interval=0.5, what="STRICT again")
    assert httpbin(m) is not None
    # Mesh-wide STRICT alone (root namespace) applies to every namespace; removing it
    # restores the PERMISSIVE default.
    m.pilot.delete("pa-ns.yaml")
    m.pilot.write("pa-mesh.yaml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
        """)
    wait_until(lambda: plaintext_from_root(m) is None, 15, interval=0.5, what="mesh-wide STRICT")
    assert httpbin(m) is not None
    m.pilot.delete("pa-mesh.yaml")
    wait_until(lambda: plaintext_from_root(m) == 200, 15, interval=0.5, what="PERMISSIVE again")
    no_nacks(m)
