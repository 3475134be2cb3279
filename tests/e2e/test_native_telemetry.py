"""Istio's telemetry between two native sidecars, each in its own network namespace behind
real capture, with the pilot's CA (mesh mTLS) and one service whose DestinationRule turns TLS
off (plaintext between the sidecars).

- HTTP: both reporters label the request with both workloads (`source_workload`/`_app`/
  `_version` from the caller's metadata-exchange headers on the server side,
  `destination_*` from the answer's on the client side); neither app ever sees those headers.
- TCP: `istio_tcp_*` on both sides (destination workload from the pilot's EDS metadata on the
  client side, the caller's principal on the server side) and one access-log line per
  connection in the pilot's format, with `-` where Envoy prints it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from lib.capture import apply_in_netns
from lib.native import NativeProxy
from lib.netns import NetNS
from lib.procs import Proc, wait_until
from lib.router import wait_acked
from test_native_tls import APP_PORT, HERE, TCP_PORT, Interop, SecurePilot, exec_as_copy, mesh_rules
from test_pilot_envoy import PROXY_UID

BACK_VIP, PLAIN_VIP, TCP_VIP = "10.96.0.50", "10.96.0.51", "10.96.0.52"
BACK_SVC = "back.default.svc.cluster.local"
FRONT_ID = "spiffe://cluster.local/ns/default/sa/front"
BACK_ID = "spiffe://cluster.local/ns/default/sa/back"
LABELS = {"front": {"app": "front", "version": "v1"}, "back": {"app": "back", "version": "v2"}}


def config(front_ip: str, back_ip: str) -> str:
    out = []
    for name, ip in (("front", front_ip), ("back", back_ip)):
        labels = ", ".join(f"{k}: {v}" for k, v in LABELS[name].items())
        out.append(f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{{labels}, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: {name}
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: {APP_PORT}}}]}}]
status: {{podIP: {ip}}}
""")
    out.append(f"""
apiVersion: v1
kind: Service
metadata: {{name: back, namespace: default}}
spec:
  clusterIP: {BACK_VIP}
  selector: {{app: back}}
  ports: [{{name: http, port: 8000, targetPort: {APP_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: back-plain, namespace: default}}
spec:
  clusterIP: {PLAIN_VIP}
  selector: {{app: back}}
  ports: [{{name: http, port: 8003, targetPort: {APP_PORT}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: back-plain, namespace: default}}
spec:
  host: back-plain.default.svc.cluster.local
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: back-tcp, namespace: default}}
spec:
  clusterIP: {TCP_VIP}
  selector: {{app: back}}
  ports: [{{name: tcp, port: 8002, targetPort: {TCP_PORT}}}]
""")
    return "---".join(out)


@pytest.fixture(scope="module")
def pair(mizzen_bin, require_root):
    base = Path(tempfile.mkdtemp(prefix="mizzen-e2e-telemetry-"))
    os.chmod(base, 0o755)
    m = Interop(base)
    try:
        m.a, m.b = NetNS("mzta").create(), NetNS("mztb").create()
        m.link()
        m.pilot = SecurePilot(mizzen_bin, base, m.a.root_ip)
        m.pilot.write("telemetry.yaml", config(m.front_ip, m.back_ip))
        m.pilot.start()
        m.procs.append(m.pilot)
        mizzen = exec_as_copy(mizzen_bin, base)
        root = str(m.pilot.ca_dir / "root-cert.pem")
        m.sidecars = {}
        for ns, name, ip in ((m.a, "front", m.front_ip), (m.b, "back", m.back_ip)):
            for port in (APP_PORT, TCP_PORT):
                m.procs.append(Proc(f"app-{name}-{port}", ["ip", "netns", "exec", ns.name, sys.executable,
                                                           str(HERE / "backend.py"), "--name", name, "--host",
                                                           "0.0.0.0", "--port", str(port)],
                                    base / f"app-{name}-{port}.log"))
            apply_in_netns(ns, mesh_rules())
            token = m.pilot.token(name, base / f"{name}.token")
            p = NativeProxy(mizzen, "sidecar", m.pilot.secure_address, name, "default", ip,
                            {**LABELS[name], "security.istio.io/tlsMode": "istio"}, base,
                            extra_args=["--service-account", name, "--ca-address", m.pilot.secure_address,
                                        "--token-file", str(token), "--root-cert", root],
                            netns=ns.name, uid=PROXY_UID)
            m.procs.append(p)
            p.start()
            wait_acked(m.pilot, p.node_id)
            m.sidecars[name] = p
        wait_until(lambda: m.get(m.a, f"http://{BACK_VIP}:8000/warmup")[0] == 200 or None, 30, interval=0.3,
                   what="back reachable from front through both sidecars", proc=m.sidecars["back"].proc)
        yield m
    finally:
        m.close()
        shutil.rmtree(base, ignore_errors=True)


def series(p: NativeProxy, metric: str, *want: str) -> list[str]:
    return [ln for ln in p.prometheus().splitlines()
            if ln.startswith(metric + "{") and all(w in ln for w in want)]


def value(line: str) -> float:
    return float(line.rsplit(" ", 1)[1])


FRONT_AS_SOURCE = ('source_workload="front"', 'source_app="front"', 'source_version="v1"',
                   'source_workload_namespace="default"', 'source_canonical_service="front"',
                   'source_canonical_revision="v1"', 'source_cluster="Kubernetes"')
BACK_AS_DESTINATION = ('destination_workload="back"', 'destination_app="back"', 'destination_version="v2"',
                       'destination_workload_namespace="default"', 'destination_canonical_service="back"',
                       'destination_canonical_revision="v2"', 'destination_cluster="Kubernetes"')


@pytest.mark.parametrize("vip,port,policy", [(BACK_VIP, 8000, "mutual_tls"), (PLAIN_VIP, 8003, "none")],
                         ids=["mtls", "plaintext"])
def test_http_workload_labels_on_both_reporters(pair, vip, port, policy):
    m = pair
    path = f"/telemetry/{uuid.uuid4().hex}"
    # -D -: the response headers as the calling app gets them, then the body.
    cp = m.a.exec(["curl", "-sS", "-m", "5", "-D", "-", f"http://{vip}:{port}{path}"], check=False, timeout=15)
    head, _, body = cp.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), cp.stdout + cp.stderr
    assert "x-envoy-peer-metadata" not in head.lower(), head
    seen = json.loads(body)
    assert seen["path"] == path, seen
    assert not [h for h in seen["headers"] if h.lower().startswith("x-envoy-peer-metadata")], seen["headers"]

    src = series(m.sidecars["front"], "istio_requests_total", 'reporter="source"', 'response_code="200"',
                 *FRONT_AS_SOURCE, *BACK_AS_DESTINATION, 'request_protocol="http"')
    svc = BACK_SVC if port == 8000 else "back-plain.default.svc.cluster.local"
    src = [ln for ln in src if f'destination_service="{svc}"' in ln]
    assert src and value(src[0]) >= 1, "\n".join(series(m.sidecars["front"], "istio_requests_total"))
    if policy == "mutual_tls":
        assert f'destination_principal="{BACK_ID}"' in src[0], src[0]
    dst = series(m.sidecars["back"], "istio_requests_total", 'reporter="destination"', 'response_code="200"',
                 *FRONT_AS_SOURCE, *BACK_AS_DESTINATION, f'connection_security_policy="{policy}"')
    assert dst and value(dst[0]) >= 1, "\n".join(series(m.sidecars["back"], "istio_requests_total"))
    if policy == "mutual_tls":
        # The caller used the VIP: the service comes from the mesh SNI, not the Host header.
        assert f'source_principal="{FRONT_ID}"' in dst[0] and f'destination_service="{BACK_SVC}"' in dst[0], dst[0]
    assert series(m.sidecars["back"], "istio_response_bytes_bucket", 'reporter="destination"', *FRONT_AS_SOURCE)


def test_forged_exchange_headers_from_the_app_are_replaced(pair):
    """The calling app cannot speak for its sidecar: what it sets is replaced on the way out."""
    m = pair
    cp = m.a.exec(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                   "-H", "x-envoy-peer-metadata: Zm9yZ2Vk", "-H", "x-envoy-peer-metadata-id: forged",
                   f"http://{BACK_VIP}:8000/forged"], check=False, timeout=15)
    assert cp.stdout == "200", cp.stdout + cp.stderr
    lines = series(m.sidecars["back"], "istio_requests_total", 'reporter="destination"')
    assert lines and all('source_workload="front"' in ln for ln in lines), "\n".join(lines)


def test_tcp_metrics_and_access_log_on_both_sides(pair):
    m = pair
    path = f"/tcp/{uuid.uuid4().hex}"
    code, body = m.get(m.a, f"http://{TCP_VIP}:8002{path}")
    assert code == 200 and body["path"] == path, (code, body)
    front, back = m.sidecars["front"], m.sidecars["back"]
    # Closed (and the bytes counted) once curl's connection is gone on both hops.
    wait_until(lambda: series(front, "istio_tcp_connections_closed_total", 'reporter="source"')
               and series(back, "istio_tcp_connections_closed_total", 'reporter="destination"') or None,
               10, interval=0.2, what="tcp connections closed on both sidecars")
    src = series(front, "istio_tcp_sent_bytes_total", 'reporter="source"', *FRONT_AS_SOURCE,
                 *BACK_AS_DESTINATION, 'destination_service="back-tcp.default.svc.cluster.local"',
                 f'destination_principal="{BACK_ID}"', 'response_flags="-"')
    assert src and value(src[0]) > len(path), "\n".join(series(front, "istio_tcp_sent_bytes_total"))
    assert series(front, "istio_tcp_connections_opened_total", 'reporter="source"', *BACK_AS_DESTINATION)
    dst = series(back, "istio_tcp_received_bytes_total", 'reporter="destination"',
                 'connection_security_policy="mutual_tls"', f'source_principal="{FRONT_ID}"',
                 'destination_workload="back"', 'destination_service="back-tcp.default.svc.cluster.local"')
    assert dst and value(dst[0]) > len(path), "\n".join(series(back, "istio_tcp_received_bytes_total"))
    # One line per connection, Envoy's TCP shape: no method/path/protocol, code 0.
    pat = re.compile(r'^\[[^]]+\] "- - -" 0 - .* (\d+) (\d+) \d+ - "-" "-" "-" "-" "[0-9.]+:\d+" (\S+) ')
    for p, cluster in ((front, "outbound|8002||back-tcp.default.svc.cluster.local"),
                       (back, f"inbound|{TCP_PORT}||")):
        def logged():
            for ln in p.proc.log_text().splitlines():
                mt = pat.match(ln)
                if mt and mt.group(3) == cluster and int(mt.group(1)) > len(path) and int(mt.group(2)) > 0:
                    return ln
            return None
        line = wait_until(logged, 10, interval=0.2, what=f"a TCP access-log line for {cluster}", proc=p.proc)
        if p is back:
            assert "connection_security_policy=mutual_tls" in line and f"downstream_peer={FRONT_ID}" in line, line
