"""AuthorizationPolicy and RequestAuthentication, end to end through both data planes: a real
Envoy sidecar (``mizzen proxy sidecar --envoy``) and the native one (``mizzen proxy sidecar``),
with the same policies and the same expected answers (the module runs once per proxy kind).

One workload ``web`` (namespace ``foo``) runs in its own network namespace: an HTTP app and a
TCP echo server behind the sidecar with inbound capture (nat PREROUTING to 15006, as
istio-iptables' ISTIO_INBOUND does). Clients in the root namespace
call the pod IP from two different source addresses of the veth (for ipBlocks). The pilot turns
the policies into Envoy's RBAC and jwt_authn filters; the proxy must accept every update (no
NACK) and answer exactly as Istio would: 403 ``RBAC: access denied`` for denied HTTP, a closed
connection for denied TCP, 401 for a bad token.

Tokens are RS256 JWTs signed here with ``cryptography``; the JWKS is served by a small HTTP
server on loopback that the pilot (not Envoy) fetches, as Istio's default
PILOT_JWT_ENABLE_REMOTE_JWKS=false does.

Peer principals / namespaces need mTLS between two sidecars; they are covered by the unit tests
of the generated config (crates/xds/src/gen/rbac/tests.rs), not here.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lib.envoy import EnvoyProxy, resolve_envoy_elf
from lib.native import NativeProxy
from lib.netns import NetNS
from lib.pilot import Pilot
from lib.procs import Proc, wait_until
from lib.router import wait_acked

PROXY_UID = 1337
HERE = Path(__file__).resolve().parent
DENIED_BODY = "RBAC: access denied"

ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("echo listening", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(b"echo:" + d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

WORKLOAD = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  clusterIP: 10.96.7.7
  selector: {app: web}
  ports:
  - {name: http, port: 8080, targetPort: APP_PORT}
  - {name: tcp-echo, port: 9000, targetPort: ECHO_PORT}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: foo
  labels: {app: web}
spec:
  containers: [{name: web, image: mizzen/e2e-backend}]
status: {phase: Running, podIP: POD_IP}
"""


# ------------------------------------------------------------------ JWT helpers

def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Signer:
    """An RSA key with a kid: its public JWK and RS256 tokens signed with it."""

    def __init__(self, kid: str):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        n = self.key.public_key().public_numbers()
        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                "n": b64u(n.n.to_bytes(256, "big")), "e": b64u(n.e.to_bytes(3, "big"))}

    def token(self, **claims) -> str:
        now = int(time.time())
        body = {"iat": now, "exp": now + 3600, **claims}
        head = b64u(json.dumps({"alg": "RS256", "typ": "JWT", "kid": self.kid}).encode())
        signing_input = f"{head}.{b64u(json.dumps(body).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64u(sig)}"


class JwksServer:
    """Serves ``/jwks`` on loopback; the test swaps the keys or makes it fail."""

    def __init__(self):
        self.status = 200
        self.body = json.dumps({"keys": []})
        self.hits = 0
        server = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.hits += 1
                data = server.body.encode()
                self.send_response(server.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"

    def serve(self, *signers: Signer, status: int = 200) -> None:
        self.body = json.dumps({"keys": [s.jwk() for s in signers]})
        self.status = status

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ the mesh

PROXY_KINDS = ("envoy", "native")


class Mesh:
    def __init__(self, kind: str, ns: NetNS, pilot: Pilot, proxy: EnvoyProxy | NativeProxy, app_port: int,
                 echo_port: int, src_a: str, src_b: str, jwks: JwksServer):
        self.kind = kind
        self.ns, self.pilot, self.proxy = ns, pilot, proxy
        self.app_port, self.echo_port = app_port, echo_port
        self.src_a, self.src_b = src_a, src_b
        self.jwks = jwks
        self.files: list[str] = []

    def http(self, src: str, method: str, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
        """One request on a new connection from ``src`` to the pod: (status, body, echo)."""
        conn = http.client.HTTPConnection(self.ns.ns_ip, self.app_port, timeout=5, source_address=(src, 0))
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            echo = json.loads(body)
        except ValueError:
            echo = {}
        return r.status, body, echo

    def tcp(self, src: str, payload: bytes = b"ping") -> bytes | None:
        """Echo over the TCP port from ``src``: the answer, or None if the connection closed."""
        s = socket.socket()
        s.settimeout(3)
        try:
            s.bind((src, 0))
            s.connect((self.ns.ns_ip, self.echo_port))
            s.sendall(payload)
            data = s.recv(100)
            return data or None
        except (ConnectionResetError, BrokenPipeError, socket.timeout):
            return None
        finally:
            s.close()

    def apply(self, name: str, text: str) -> None:
        self.pilot.write(name, text)
        self.files.append(name)

    def clear(self) -> None:
        for f in self.files:
            self.pilot.delete(f)
        self.files = []

    def expect(self, cases: list, what: str, timeout: float = 20) -> None:
        """Poll until every (src, method, path, headers, status) case answers as expected
        (the pilot pushes asynchronously); fail with the cases that still differ."""
        last: list = []

        def check():
            bad = []
            for src, method, path, headers, want in cases:
                got, body, _ = self.http(src, method, path, headers)
                # A bare 403 means RBAC's denial; (status, body) pins another body.
                want_status, want_body = want if isinstance(want, tuple) else (want, DENIED_BODY if want == 403 else None)
                if got != want_status or (want_body is not None and body != want_body):
                    bad.append((src, method, path, headers, want, got, body[:80]))
            last[:] = bad
            return True if not bad else None

        try:
            wait_until(check, timeout, interval=0.3, what=what, proc=self.proxy.proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\nstill different (src, method, path, headers, want, got, body): {last}") from None

    def rejected(self) -> None:
        """No update NACKed (so the policies are enforced, not the previous listener)."""
        if isinstance(self.proxy, EnvoyProxy):
            self.proxy.assert_no_rejected_updates()
        else:
            stats = self.proxy.stats()
            assert "listener_manager.lds.update_rejected" in stats, sorted(stats)
            assert self.proxy.rejected() == {}, self.proxy.rejected()
        wait_acked(self.pilot, self.proxy.node_id)


@pytest.fixture(scope="module", params=PROXY_KINDS)
def mesh(request, require_root, mizzen_bin, envoy_bin):
    kind = request.param
    # The proxy's uid must enter it (pytest's tmp dirs are 0700); removed afterwards.
    work = Path(tempfile.mkdtemp(prefix="mizzen-e2e-authz-"))
    os.chmod(work, 0o755)
    ns = NetNS("mza").create()
    procs: list[Proc] = []
    pilot = proxy = None
    jwks = JwksServer()
    old_env = os.environ.get("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL")
    try:
        src_a, src_b = ns.root_ip, ns.ip(21)
        ns.add_root_ip(src_b)
        # A fresh namespace: every port is free in it (and nothing in the root one binds these).
        app_port = random.randint(20000, 29998)
        echo_port = app_port + 1
        backend = HERE / "backend.py"
        procs.append(Proc("authz-app", ["ip", "netns", "exec", ns.name, sys.executable, backend,
                                        "--name", "web", "--host", ns.ns_ip, "--port", app_port],
                          work / "app.log"))
        procs.append(Proc("authz-echo", ["ip", "netns", "exec", ns.name, sys.executable, "-c", ECHO_SERVER,
                                         ns.ns_ip, echo_port], work / "echo.log"))

        def direct_ok():
            c = http.client.HTTPConnection(ns.ns_ip, app_port, timeout=2)
            try:
                c.request("GET", "/")
                return c.getresponse().status == 200
            finally:
                c.close()
        wait_until(direct_ok, 15, interval=0.2, what="app reachable in the namespace", proc=procs[0])
        # istio-iptables' inbound capture, reduced to the workload's two ports.
        ns.exec(["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-m", "multiport",
                 "--dports", f"{app_port},{echo_port}", "-j", "REDIRECT", "--to-ports", "15006"])

        os.environ["PILOT_JWT_PUB_KEY_REFRESH_INTERVAL"] = "1s"
        workload = (WORKLOAD.replace("APP_PORT", str(app_port)).replace("ECHO_PORT", str(echo_port))
                    .replace("POD_IP", ns.ns_ip))
        pilot = Pilot(mizzen_bin, work, {"workload.yaml": workload}, xds_host=ns.root_ip,
                      name="pilot-authz").start()
        from test_pilot_envoy import exec_as  # the same helper the sidecar test uses
        if kind == "envoy":
            proxy = EnvoyProxy(exec_as(PROXY_UID, mizzen_bin, work),
                               exec_as(PROXY_UID, Path(resolve_envoy_elf(str(envoy_bin))), work),
                               "sidecar", pilot.xds_address, pod_name="web-1", namespace="foo",
                               ip=ns.ns_ip, labels={"app": "web"}, workdir=work, netns=ns.name,
                               uid=PROXY_UID).start()
        else:
            proxy = NativeProxy(exec_as(PROXY_UID, mizzen_bin, work), "sidecar", pilot.xds_address,
                                pod_name="web-1", namespace="foo", ip=ns.ns_ip, labels={"app": "web"},
                                workdir=work, netns=ns.name, uid=PROXY_UID).start()
        wait_acked(pilot, proxy.node_id)
        m = Mesh(kind, ns, pilot, proxy, app_port, echo_port, src_a, src_b, jwks)

        def via_sidecar():
            st, _, echo = m.http(src_a, "GET", "/")
            # The sidecar adds x-request-id (a direct request would not have one).
            return st == 200 and "x-request-id" in echo.get("headers", {})
        wait_until(via_sidecar, 20, interval=0.3, what="GET through the inbound sidecar", proc=proxy.proc)
        assert m.tcp(src_a) == b"echo:ping"
        yield m
    finally:
        if old_env is None:
            os.environ.pop("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL", None)
        else:
            os.environ["PILOT_JWT_PUB_KEY_REFRESH_INTERVAL"] = old_env
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        for p in procs:
            p.stop()
        jwks.stop()
        ns.delete()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def m(mesh):
    """The shared mesh, with this test's policy files removed afterwards."""
    yield mesh
    mesh.clear()
    # Back to no policy: everything allowed again before the next test starts.
    mesh.expect([(mesh.src_a, "GET", "/admin/x", {}, 200)], "policies removed")


def test_http_allow_and_deny_matrix(m):
    a, b = m.src_a, m.src_b
    m.apply("authz-http.yaml", f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin*"]}}}}]
  - when: [{{key: "request.headers[x-evil]", values: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - to: [{{operation: {{methods: [GET], paths: ["/api/*", "*.css", "/exact"]}}}}]
  - from: [{{source: {{ipBlocks: ["{b}/32"]}}}}]
    to: [{{operation: {{methods: [POST]}}}}]
  - when: [{{key: "request.headers[x-token]", values: ["secret"]}}]
  - from: [{{source: {{remoteIpBlocks: ["192.0.2.0/24"]}}}}]
---
# Mesh-wide (root namespace, no selector): applies to web too.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-deny, namespace: istio-system}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/mesh-denied"]}}}}]}}]
---
# Another namespace, and a selector that matches nothing here: neither may apply.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all, namespace: bar}}
spec:
  action: DENY
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-other-app, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: other}}}}
  action: DENY
  rules: [{{}}]
""")
    secret = {"x-token": "secret"}
    m.expect([
        (a, "GET", "/api/x", {}, 200),
        (a, "GET", "/style.css", {}, 200),
        (a, "GET", "/exact", {}, 200),
        (a, "GET", "/exact?q=1", {}, 200),          # paths ignore the query string
        (a, "GET", "/exact/more", {}, 403),
        (a, "GET", "/other", {}, 403),               # an ALLOW policy applies and nothing matched
        (a, "POST", "/api/x", {}, 403),              # POST only from b's address
        (b, "POST", "/api/x", {}, 200),
        (b, "GET", "/other", {}, 403),
        (a, "GET", "/other", secret, 200),
        (a, "GET", "/other", {"x-token": "wrong"}, 403),
        (a, "GET", "/admin/panel", secret, 403),     # DENY beats ALLOW
        (b, "POST", "/admin", {}, 403),
        (a, "GET", "/api/x", {"x-evil": "1"}, 403),
        (a, "GET", "/mesh-denied", secret, 403),     # root-namespace policy
        (a, "GET", "/other", {"x-forwarded-for": "192.0.2.7"}, 200),  # remoteIpBlocks: XFF
        (a, "GET", "/other", {"x-forwarded-for": "198.51.100.7"}, 403),
    ], "HTTP authorization matrix")
    m.rejected()


def test_allow_nothing_allow_all_audit_dry_run_and_custom(m):
    a = m.src_a
    # An ALLOW policy without rules allows nothing.
    m.apply("allow-nothing.yaml", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
""")
    m.expect([(a, "GET", "/", {}, 403), (a, "POST", "/x", {}, 403)], "allow-nothing")
    assert m.tcp(a) is None, "allow-nothing closes TCP connections too"
    # Adding a rule `{}` (allow all) in another policy opens everything again.
    m.apply("allow-all.yaml", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-api, namespace: foo}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/audited/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: try-deny-put
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [PUT]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{to: [{operation: {paths: ["/custom"]}}]}]
""")
    m.expect([(a, "GET", "/audited/1", {}, 200), (a, "PUT", "/x", {}, 200), (a, "GET", "/custom", {}, 200)],
             "allow-all; AUDIT, dry-run DENY and CUSTOM do not block")
    assert m.tcp(a) == b"echo:ping"
    # AUDIT is Envoy's LOG action (never blocks; flags matches for access logs) with per-rule
    # counters: the audit rule counts the requests it matched, and only those.
    rule = "rbac.istio_audit_.policy.ns[foo]-policy[audit-api]-rule[0].allowed"
    stats = m.proxy.stats()
    key = next((k for k in stats if k.endswith(rule)), None)
    assert key is not None, sorted(k for k in stats if "rbac" in k)
    before = stats[key]
    assert before >= 1
    assert m.http(a, "GET", "/not-audited")[0] == 200
    assert m.proxy.stats()[key] == before
    assert m.http(a, "GET", "/audited/2")[0] == 200
    assert m.proxy.stats()[key] == before + 1
    # The dry-run DENY is evaluated as a shadow policy: it would have denied the PUT.
    shadow = sum(v for k, v in stats.items() if "istio_dry_run_deny_" in k and k.endswith("shadow_denied"))
    assert shadow >= 1, {k: v for k, v in stats.items() if "rbac" in k}
    # CUSTOM is reported as not enforced, in /debug/authorizationz and the pilot's log.
    dbg = m.pilot._get_json("/debug/authorizationz")
    assert any("foo/ext" in u and "CUSTOM" in u and "NOT enforced" in u for u in dbg["unsupported"]), dbg
    assert "my-ext-authz" in m.pilot.proc.log_text()
    m.rejected()


def test_tcp_policies(m):
    a, b = m.src_a, m.src_b
    m.apply("authz-tcp.yaml", f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: tcp-allow, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - from: [{{source: {{ipBlocks: ["{b}"]}}}}]
    to: [{{operation: {{ports: ["{m.echo_port}"]}}}}]
  # HTTP-only: on the TCP port this rule can never match (Istio drops it there).
  - to: [{{operation: {{methods: [GET], ports: ["{m.echo_port}"]}}}}]
""")

    def tcp_state():
        return (m.tcp(a), m.tcp(b)) == (None, b"echo:ping") or None
    wait_until(tcp_state, 20, interval=0.3, what="TCP: b allowed, a's connection closed", proc=m.proxy.proc)
    # The HTTP port is governed by the same ALLOW policy: no rule for it, so 403.
    assert m.http(b, "GET", "/")[0] == 403
    # A DENY rule with an HTTP-only field (methods) on a TCP port ignores that field: it now
    # refuses every connection to the port, as Istio documents.
    m.apply("authz-tcp-deny.yaml", f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: tcp-deny, namespace: foo}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{methods: [POST], ports: ["{m.echo_port}"]}}}}]}}]
""")
    wait_until(lambda: m.tcp(b) is None or None, 20, interval=0.3, what="DENY with methods closes TCP",
               proc=m.proxy.proc)
    m.rejected()


def test_jwt_request_authentication(m):
    a = m.src_a
    iss = "https://issuer.mizzen.test"
    k1, k2, stranger = Signer("k1"), Signer("k2"), Signer("k1")
    m.jwks.serve(k1)
    m.apply("jwt.yaml", f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: {iss}
    audiences: [web]
    jwksUri: {m.jwks.uri}
    fromHeaders: [{{name: x-jwt, prefix: "Token "}}]
    fromParams: [access_token]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-alice, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - to: [{{operation: {{notPaths: ["/secure*", "/admins", "/nested", "/aud"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{iss}/alice"]}}}}]
    to: [{{operation: {{paths: ["/secure*"]}}}}]
  - to: [{{operation: {{paths: ["/admins"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [admin]}}]
  - to: [{{operation: {{paths: ["/nested"]}}}}]
    when: [{{key: "request.auth.claims[org][role]", values: [owner]}}]
  - to: [{{operation: {{paths: ["/aud"]}}}}]
    when: [{{key: "request.auth.audiences", values: [extra]}}]
""")
    tok = lambda s, **c: {"x-jwt": "Token " + s.token(**{"iss": iss, "aud": "web", **c})}  # noqa: E731
    alice = tok(k1, sub="alice")
    now = int(time.time())
    m.expect([
        (a, "GET", "/open", {}, 200),                          # no token: passes jwt_authn
        (a, "GET", "/secure", {}, 403),                        # ... but the policy wants alice
        (a, "GET", "/secure", alice, 200),
        (a, "GET", "/secure", tok(k1, sub="bob"), 403),
        (a, "GET", "/open", tok(k1, sub="alice", exp=now - 60, iat=now - 120), 401),   # expired
        (a, "GET", "/open", tok(k1, sub="alice", iss="https://evil.test"), 401),      # wrong issuer
        # Wrong audience: Envoy's jwt_authn answers 403 (as under Istio), with its own text.
        (a, "GET", "/open", tok(k1, sub="alice", aud="other"), (403, "Audiences in Jwt are not allowed")),
        (a, "GET", "/open", tok(stranger, sub="alice"), 401),                         # bad signature
        (a, "GET", "/open", {"x-jwt": "Token not.a.jwt"}, 401),
        (a, "GET", "/admins", tok(k1, sub="carol", groups=["dev", "admin"]), 200),    # claim in a list
        (a, "GET", "/admins", tok(k1, sub="carol", groups=["dev"]), 403),
        (a, "GET", "/nested", tok(k1, sub="carol", org={"role": "owner"}), 200),         # nested claim
        (a, "GET", "/nested", tok(k1, sub="carol", org={"role": "dev"}), 403),
        (a, "GET", "/aud", tok(k1, sub="carol", aud=["web", "extra"]), 200),            # audiences
        (a, "GET", "/aud", tok(k1, sub="carol"), 403),
        (a, "GET", f"/secure?access_token={k1.token(iss=iss, aud='web', sub='alice')}", {}, 200),  # fromParams
    ], "JWT matrix")
    # The app got the original token (forwardOriginalToken) and the payload header.
    _, _, echo = m.http(a, "GET", "/secure", alice)
    h = echo["headers"]
    assert h.get("x-jwt", "").startswith("Token "), h
    payload = json.loads(base64.urlsafe_b64decode(h["x-jwt-payload"] + "=="))
    assert payload["sub"] == "alice" and payload["iss"] == iss, payload
    assert h.get("x-jwt-sub") == "alice", h  # outputClaimToHeaders
    # A client cannot forge the outputs: they are cleared before verification.
    _, _, echo = m.http(a, "GET", "/open", {"x-jwt-sub": "mallory", "x-jwt-payload": "e30"})
    assert "x-jwt-sub" not in echo["headers"] and "x-jwt-payload" not in echo["headers"], echo
    # Envoy's www-authenticate on a refused token: the request's URI as realm.
    conn = http.client.HTTPConnection(m.ns.ns_ip, m.app_port, timeout=5, source_address=(a, 0))
    try:
        conn.request("GET", "/open?q=1", headers=tok(k1, sub="alice", exp=now - 120, iat=now - 180))
        r = conn.getresponse()
        assert (r.status, r.read().decode()) == (401, "Jwt is expired")
        assert r.getheader("www-authenticate") == \
            f'Bearer realm="http://{m.ns.ns_ip}:{m.app_port}/open?q=1", error="invalid_token"', r.getheaders()
    finally:
        conn.close()
    # The default Authorization header is not a token source once fromHeaders is set.
    assert m.http(a, "GET", "/secure", {"authorization": "Bearer " + k1.token(iss=iss, aud="web", sub="alice")})[0] == 403
    m.rejected()

    # Key rotation at the jwksUri: the pilot refreshes (1s here) and pushes the new keys.
    m.jwks.serve(k2)
    m.expect([(a, "GET", "/secure", tok(k2, sub="alice"), 200),
              (a, "GET", "/secure", alice, 401)], "rotated key accepted, old one refused")
    # A failing jwksUri keeps the last good keys (and says so in /debug/authorizationz).
    m.jwks.serve(k1, status=500)
    hits = m.jwks.hits
    wait_until(lambda: m.jwks.hits >= hits + 2 or None, 15, interval=0.2, what="two refreshes against the failing jwksUri")

    def reported():
        e = m.pilot._get_json("/debug/authorizationz")["jwks"].get(m.jwks.uri, {})
        return e.get("has_keys") and "500" in (e.get("error") or "") or None
    wait_until(reported, 10, interval=0.3, what="fetch failure reported with last good keys kept")
    assert m.http(a, "GET", "/secure", tok(k2, sub="alice"))[0] == 200
    assert "JWKS fetch failed" in m.pilot.proc.log_text()
    m.rejected()


@pytest.mark.parametrize("kind", PROXY_KINDS)
def test_gateway_enforces_policies_selecting_it(kind, mizzen_bin, envoy_bin, tmp_path):
    """An ingress gateway (Envoy or native router) with a RequestAuthentication and
    AuthorizationPolicies in the root namespace selecting ``istio: ingressgateway``, as Istio
    users protect ingress."""
    from lib.router import router_mesh
    iss = "https://gw-issuer.mizzen.test"
    signer, stranger = Signer("g1"), Signer("g1")
    jwks = JwksServer()
    jwks.serve(signer)
    request_authn = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: gw-jwt, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules: [{{issuer: "{iss}", jwksUri: "{jwks.uri}"}}]
---"""
    policy = request_authn + f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: gw-deny, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/blocked*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: gw-allow, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  rules:
  - to: [{{operation: {{hosts: ["split.example.com"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{iss}/*"]}}}}]
"""
    try:
        with router_mesh(kind, "delta", mizzen_bin, envoy_bin, tmp_path,
                         extra_files={"gw-authz.yaml": policy}) as rm:
            token = {"authorization": "Bearer " + signer.token(iss=iss, sub="u1")}
            bad = {"authorization": "Bearer " + stranger.token(iss=iss, sub="u1")}

            def status(host, path, headers=None):
                r = rm.gw.get(host, path, headers)
                return r.status_code, r.text

            assert status("split.example.com", "/")[0] == 200
            assert status("split.example.com", "/blocked") == (403, DENIED_BODY)
            assert status("match.example.com", "/") == (403, DENIED_BODY)  # no principal
            # hosts match the authority in any case and with a port (whatever routing does then).
            assert status("SPLIT.example.com:80", "/")[0] != 403
            assert status("match.example.com", "/", token)[0] not in (401, 403)
            assert status("match.example.com", "/blocked", token) == (403, DENIED_BODY)
            assert status("split.example.com", "/", bad)[0] == 401
            rm.assert_no_rejections()
    finally:
        jwks.stop()
