"""AuthorizationPolicy on peer identities (principals, namespaces, source.principal) through
two real Envoy sidecars talking Istio mTLS with certificates from the pilot's CA.

The two-sidecar mesh is test_mtls.py's (sleep in namespace A calls httpbin in namespace B;
both ``default`` namespace, service accounts ``sleep`` and ``httpbin``); this module gets its
own instance of it. A client without a sidecar (root namespace, plaintext, allowed by the
default PERMISSIVE mode) has no peer identity at all.
"""

from __future__ import annotations

import requests

from lib.procs import wait_until
from test_mtls import APP_PORT, HTTPBIN_VIP, client_get, mesh, no_nacks  # noqa: F401 - mesh is a fixture

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
    no_nacks(m)
    m.pilot.delete("authz-identity.yaml")
