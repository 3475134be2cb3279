"""AuthorizationPolicy on peer identities (principals, namespaces, source.principal) through
two sidecars talking Istio mTLS with certificates from the pilot's CA, once with two Envoy
sidecars and once with two native ones (the same policies, the same expected answers).

The two-sidecar mesh is test_mtls.py's (sleep in namespace A calls httpbin in namespace B;
both ``default`` namespace, service accounts ``sleep`` and ``httpbin``), built here once per
proxy kind. A client without a sidecar (root namespace, plaintext, allowed by the default
PERMISSIVE mode) has no peer identity at all.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.envoy import EnvoyProxy, resolve_envoy_elf
from lib.native import NativeProxy
from lib.netns import NetNS
from lib.procs import Proc, free_port, wait_until
from test_mtls import (APP_PORT, HERE, HTTPBIN_VIP, PROXY_UID, Mesh, SecureMeshPilot, client_get, exec_as,
                       inbound_rules, make_certs, mesh_config)

PROXY_KINDS = ("envoy", "native")
ECHO_VIP = "10.96.0.30"
ECHO_PORT = 9009

# A TCP service on httpbin's pod (Istio's tcp-echo), for network RBAC on peer identities.
ECHO_SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {ECHO_VIP}
  selector: {{app: httpbin}}
  ports: [{{name: tcp-echo, port: 9000, targetPort: {ECHO_PORT}}}]
"""

DENIED = "RBAC: access denied"

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-identity, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {paths: ["/sleep-only*"]}}]
  - from: [{source: {namespaces: ["default"]}}]
    to: [{operation: {paths: ["/ns-default*"]}}]
  - from: [{source: {namespaces: ["other"]}}]
    to: [{operation: {paths: ["/ns-other*"]}}]
  - from: [{source: {serviceAccounts: ["sleep"]}}]
    to: [{operation: {paths: ["/sa-sleep*"]}}]
  - to: [{operation: {paths: ["/other-sa*"]}}]
    when: [{key: source.principal, values: ["cluster.local/ns/default/sa/other"]}]
  # No peer identity at all: only a plaintext caller.
  - from: [{source: {notPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/plain*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from: [{source: {principals: ["*/sa/sleep"]}}]
    to: [{operation: {paths: ["/sleep-only/denied"]}}]
"""


@pytest.fixture(scope="module", params=PROXY_KINDS)
def mesh(request, mizzen_bin, envoy_bin):
    """test_mtls's two-sidecar mesh with both sidecars of one kind (no peek / TLS echo
    servers: their services stay configured, unreachable)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, iptables)")
    kind = request.param
    base = Path(tempfile.mkdtemp(prefix=f"mizzen-e2e-authz-mtls-{kind}-"))
    os.chmod(base, 0o755)
    m = Mesh(base)
    try:
        m.a, m.b = NetNS("mza").create(), NetNS("mzb").create()
        m.link_namespaces()
        host = m.a.root_ip
        m.certs = make_certs(base / "certs")
        m.pilot = SecureMeshPilot(mizzen_bin, base, host)
        m.pilot.write("mesh.yaml", mesh_config(m.a_ip, m.b_ip, host, free_port(host), free_port(host), m.certs))
        m.pilot.start()
        m.procs.append(m.pilot)
        m.app = Proc("httpbin", ["ip", "netns", "exec", m.b.name, sys.executable, str(HERE / "backend.py"),
                                 "--name", "httpbin", "--host", "0.0.0.0", "--port", str(APP_PORT)],
                     base / "httpbin.log")
        m.procs.append(m.app)
        m.procs.append(Proc("echo", ["ip", "netns", "exec", m.b.name, str(mizzen_bin), "sample-app",
                                     "--listen-address", "0.0.0.0", "--tcp-echo-port", str(ECHO_PORT)],
                            base / "echo.log"))
        m.pilot.write("echo.yaml", ECHO_SERVICE)
        apply_in_netns(m.b, inbound_rules(APP_PORT))
        m.b.exec(["iptables", "-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", str(ECHO_PORT),
                  "-j", "ISTIO_IN_REDIRECT"])
        apply_in_netns(m.a, istio_outbound_redirect_rules(15001, 15006, PROXY_UID, PROXY_UID))
        mizzen = exec_as(PROXY_UID, mizzen_bin, base)
        envoy = exec_as(PROXY_UID, Path(resolve_envoy_elf(str(envoy_bin))), base) if kind == "envoy" else None
        root = m.pilot.ca_dir / "root-cert.pem"
        m.proxies = {}
        for ns, pod_name, ip, app in ((m.a, "sleep", m.a_ip, "sleep"), (m.b, "httpbin", m.b_ip, "httpbin")):
            token = m.pilot.token(pod_name, base / f"{pod_name}.token")
            labels = {"app": app, "security.istio.io/tlsMode": "istio"}
            identity = ["--service-account", pod_name, "--ca-address", m.pilot.secure_address,
                        "--token-file", str(token), "--root-cert", str(root)]
            if kind == "envoy":
                p = EnvoyProxy(mizzen, envoy, "sidecar", m.pilot.secure_address, pod_name, "default", ip, labels,
                               base, netns=ns.name, uid=PROXY_UID,
                               extra_args=identity + ["--config-path", str(base / f"sidecar-{pod_name}-home" / "agent")])
            else:
                p = NativeProxy(mizzen, "sidecar", m.pilot.secure_address, pod_name, "default", ip, labels, base,
                                extra_args=identity, netns=ns.name, uid=PROXY_UID)
            m.procs.append(p)
            m.proxies[pod_name] = p.start()
        yield m
    finally:
        m.close()
        shutil.rmtree(base, ignore_errors=True)


def rejected_none(m) -> None:
    """No sidecar NACKed an update (the policies are enforced, not a previous listener)."""
    for p in m.proxies.values():
        if isinstance(p, NativeProxy):
            assert "listener_manager.lds.update_rejected" in p.stats()
            assert p.rejected() == {}, (p.name, p.rejected())
        else:
            p.assert_no_rejected_updates()


def plain(m, path: str) -> tuple[int, str] | None:
    try:
        r = requests.get(f"http://{m.b.ns_ip}:{APP_PORT}{path}", timeout=3)
        return r.status_code, r.text
    except requests.RequestException:
        return None


def test_principals_and_namespaces_over_mtls(mesh):
    m = mesh
    m.pilot.write("authz-identity.yaml", POLICY)
    want_sidecar = {
        "/sleep-only": 200, "/ns-default": 200, "/sa-sleep": 200,
        "/ns-other": 403, "/other-sa": 403, "/plain": 403, "/sleep-only/denied": 403,
    }
    want_plain = {"/plain": 200, "/sleep-only": 403, "/ns-default": 403, "/sa-sleep": 403}
    last: dict = {}

    def matrix():
        got = {}
        for path, want in want_sidecar.items():
            code, body = client_get(m, f"http://{HTTPBIN_VIP}:8000{path}")
            got[("sleep", path)] = (code, body[:40])
            if code != want or (want == 403 and body != DENIED):
                last.update(got)
                return None
        for path, want in want_plain.items():
            r = plain(m, path)
            got[("plaintext", path)] = r
            if r is None or r[0] != want or (want == 403 and r[1] != DENIED):
                last.update(got)
                return None
        return got
    try:
        wait_until(matrix, 25, interval=0.5, what="identity-based authorization matrix")
    except AssertionError as e:
        raise AssertionError(f"{e}\nlast answers: {last}") from None
    # The server side's access log says why (Envoy: no response flag, the details name the
    # deciding DENY policy, or `none` when no ALLOW policy matched).
    log = m.proxies["httpbin"].proc
    want = [r'"GET /sleep-only/denied HTTP/1.1" 403 - rbac_access_denied_matched_policy\[ns\[default\]-policy\[deny-sleep\]-rule\[0\]\] ',
            r'"GET /ns-other HTTP/1.1" 403 - rbac_access_denied_matched_policy\[none\] ']
    wait_until(lambda: all(re.search(w, log.log_text()) for w in want) or None, 10, interval=0.3,
               what="RBAC denials in the server sidecar's access log", proc=log)
    rejected_none(m)
    m.pilot.delete("authz-identity.yaml")


ECHO_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
try:
    s.sendall(b"ping\n")
    print(s.recv(100).decode(errors="replace").strip() or "CLOSED")
except (ConnectionResetError, BrokenPipeError, socket.timeout):
    print("CLOSED")
"""


def echo_from(m, ns, host: str, port: int) -> str:
    """One TCP echo exchange from ``ns`` (captured to its sidecar when it has one): the answer,
    or CLOSED."""
    cp = ns.exec([sys.executable, "-c", ECHO_CLIENT, host, str(port)], check=False, timeout=15)
    return cp.stdout.strip() or "CLOSED"


def test_tcp_policies_on_peer_identity(mesh):
    """Network RBAC (before tcp_proxy) on the mTLS peer's principal: the sleep sidecar's
    connections are allowed or closed by identity; a plaintext caller has none."""
    m = mesh

    def policy(sa: str) -> str:
        return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: tcp-identity, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/default/sa/{sa}"]}}}}]
    to: [{{operation: {{ports: ["{ECHO_PORT}"]}}}}]
"""
    wait_until(lambda: echo_from(m, m.a, ECHO_VIP, 9000) != "CLOSED" or None, 25, interval=0.5,
               what="tcp echo through both sidecars before any policy")
    m.pilot.write("authz-tcp-identity.yaml", policy("sleep"))
    try:
        def sleep_allowed_plain_closed():
            via_sidecar = echo_from(m, m.a, ECHO_VIP, 9000)
            plain = echo_plain(m.b.ns_ip, ECHO_PORT)
            return (via_sidecar != "CLOSED" and plain == "CLOSED") or None
        wait_until(sleep_allowed_plain_closed, 25, interval=0.5,
                   what="TCP: the sleep identity allowed, a plaintext caller closed")
        m.pilot.write("authz-tcp-identity.yaml", policy("other"))
        wait_until(lambda: echo_from(m, m.a, ECHO_VIP, 9000) == "CLOSED" or None, 25, interval=0.5,
                   what="TCP: the sleep identity closed once the policy names another one")
        rejected_none(m)
    finally:
        m.pilot.delete("authz-tcp-identity.yaml")


def echo_plain(host: str, port: int) -> str:
    """From the root namespace, no sidecar: plaintext into the inbound capture."""
    import socket
    try:
        s = socket.create_connection((host, port), timeout=3)
    except OSError:
        return "CLOSED"
    try:
        s.sendall(b"ping\n")
        return s.recv(100).decode(errors="replace").strip() or "CLOSED"
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        return "CLOSED"
    finally:
        s.close()
