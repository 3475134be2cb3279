"""The native Mizzen proxy (``mizzen proxy router|sidecar`` without ``--envoy``), end to end, for
what only it shows: the routing scenarios it shares with Envoy are in test_routing.py.

A resource it cannot honour is NACKed with a precise reason (visible in the pilot's
``/debug/syncz``) while traffic keeps flowing on the previous config; Istio's metrics on its
stats port; a sidecar in a network namespace behind capture; pilot restart; SIGTERM drain.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter

import pytest

from backend import Backend, port_free_on_all
from lib.native import NativeProxy
from lib.pilot import CDS, EDS, LDS, RDS, Pilot, dump_json
from lib.procs import free_port, wait_until
from lib.router import API, CONFIGS, WEB_V1_IP, WEB_V2_IP, RouterMesh, render, router_mesh, wait_acked
from lib.traffic import Gateway, constant_load, summarize
# The netns sidecar helpers, shared with the Envoy sidecar test on purpose.
from test_pilot_envoy import CLUSTER_IP, PROXY_UID, exec_as, ns_requests, uid_dir
from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.netns import NetNS

assert uid_dir  # a fixture, used by name below

def p521_request_authentication() -> str:
    """A RequestAuthentication on the gateway whose only key is P-521 (ES512): Envoy takes it,
    the native proxy's verifier (ring) cannot, so it must NACK the listeners carrying it while
    everything else keeps working."""
    import base64
    import json

    from cryptography.hazmat.primitives.asymmetric import ec

    nums = ec.generate_private_key(ec.SECP521R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(66, "big")).rstrip(b"=").decode()
    jwks = json.dumps({"keys": [{"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "p521",
                                 "x": b64(nums.x), "y": b64(nums.y)}]})
    return f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: p521
  namespace: istio-system
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  jwtRules:
  - issuer: p521.example.com
    jwks: '{jwks}'
"""


@pytest.fixture(scope="module")
def mesh(mizzen_bin, tmp_path_factory):
    """The shared router mesh (lib/router.py) on the native proxy, for what only it shows."""
    with router_mesh("native", "delta", mizzen_bin, None, tmp_path_factory.mktemp("native-router")) as m:
        yield m


def test_istio_metrics_on_the_stats_port(mesh: RouterMesh):
    for _ in range(3):
        assert mesh.gw.get("match.example.com", "/items/7").status_code == 200
    assert mesh.gw.get("fault.example.com", f"/abort/{uuid.uuid4().hex}").status_code == 418
    text = mesh.proxy.prometheus()
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    # destination_cluster is the destination's cluster ID, as in Istio (not Envoy's cluster name):
    # ServiceEntry addresses run no known workload, so it is unknown like the workload itself.
    api = [ln for ln in lines if f'destination_service="{API}"' in ln and 'response_code="200"' in ln]
    assert api, "\n".join(lines)
    for label in ('reporter="source"', 'destination_service_name="api.internal.example"',
                  'request_protocol="http"', 'response_flags="-"', 'destination_cluster="unknown"',
                  'destination_workload="unknown"', 'grpc_response_status=""'):
        assert label in api[0], api[0]
    assert float(api[0].rsplit(" ", 1)[1]) >= 3
    assert any('response_code="418"' in ln and 'response_flags="FI"' in ln for ln in lines), "\n".join(lines)
    assert "istio_request_duration_milliseconds_bucket{" in text


def test_admin_logging_changes_levels_at_run_time(mesh: RouterMesh):
    """Envoy's admin ``/logging`` (curl, as operators use it): GET lists the loggers, POST
    ``?<logger>=debug`` turns one up, which the proxy's own log then shows (a refused
    upgrade is logged at debug level by the http logger); POST ``?level=info`` turns all back."""
    admin = f"http://127.0.0.1:{mesh.proxy.admin_port}/logging"

    def curl(*args: str) -> tuple[int, str]:
        p = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=10)
        body, _, code = p.stdout.rpartition("\n")
        return int(code), body

    code, text = curl(admin)
    assert code == 200 and "active loggers:" in text, text
    assert "  http: info" in text and "  cluster: info" in text, text
    assert curl(admin + "?http=debug")[0] == 405, "changes need a POST"
    assert curl("-X", "POST", admin + "?nosuch=debug")[0] == 404
    assert curl("-X", "POST", admin + "?http=loud")[0] == 404

    def upgrade_logged(tag: str) -> bool:
        # The tag only in the Upgrade header: the access log (path, status) must not match.
        r = mesh.gw.get("split.example.com", "/log", headers={"Connection": "Upgrade", "Upgrade": tag})
        assert r.status_code == 403
        return tag in mesh.proxy.proc.log_text()

    quiet = uuid.uuid4().hex
    assert not upgrade_logged(quiet), "debug lines are off at info level"
    code, text = curl("-X", "POST", admin + "?http=debug")
    assert code == 200 and "  http: debug" in text and "  cluster: info" in text, text
    loud = uuid.uuid4().hex
    wait_until(lambda: upgrade_logged(loud) or None, 5, what="the http logger's debug line in the proxy log",
               proc=mesh.proxy.proc)
    code, text = curl("-X", "POST", admin + "?level=info")
    assert code == 200 and "  http: info" in text, text
    again = uuid.uuid4().hex
    assert not upgrade_logged(again)


def test_unsupported_feature_is_nacked_and_previous_config_keeps_serving(mesh: RouterMesh):
    node = mesh.proxy.node_id
    wait_acked(mesh.pilot, node)
    rejected_before = mesh.proxy.stats()["listener_manager.lds.update_rejected"]
    listeners_before = mesh.proxy.dynamic_names()["listeners"]
    mesh.pilot.write("p521.yaml", p521_request_authentication())
    try:
        def nacked():
            p = mesh.pilot.syncz_for(node)
            nack = ((p or {}).get("resources") or {}).get(LDS, {}).get("nack")
            return nack if nack and "P-521" in (nack.get("message") or "") else None
        try:
            nack = wait_until(nacked, 10, interval=0.2, what="LDS NACK naming the P-521 key")
        except AssertionError as e:
            raise AssertionError(f"{e}\n/debug/syncz: {dump_json(mesh.pilot.syncz())}") from None
        msg = nack["message"]
        # The reason names the listener, the filter and the field.
        assert msg.startswith("listener ") and "http_filters[" in msg and "local_jwks.keys[0].crv" in msg, msg
        assert mesh.proxy.stats()["listener_manager.lds.update_rejected"] > rejected_before
        assert mesh.proxy.dynamic_names()["listeners"] == listeners_before

        # Everything keeps working on the config in force (no token needed, as before).
        counts = Counter(mesh.gw.get("split.example.com", "/").headers.get("x-backend") for _ in range(50))
        assert set(counts) <= {"web-v1", "web-v2"} and sum(counts.values()) == 50, counts
        assert mesh.gw.backend("match.example.com", "/items/1") == "api-v2"
    finally:
        mesh.pilot.delete("p521.yaml")
    # Once the pilot stops sending it, the next version is ACKed again.
    wait_acked(mesh.pilot, node, types=(CDS, LDS, RDS, EDS))
    assert mesh.gw.backend("split.example.com", "/") in ("web-v1", "web-v2")


# --------------------------------------------------------------------------------------------
# The native proxy as a sidecar in a network namespace, with Istio's capture rules.
# --------------------------------------------------------------------------------------------
def test_sidecar_in_netns_with_capture(require_root, mizzen_bin, uid_dir):
    ns = NetNS().create()
    backends: list[Backend] = []
    pilot = proxy = None
    try:
        v1_ip, v2_ip = ns.ip(11), ns.ip(12)
        ns.add_root_ip(v1_ip)
        ns.add_root_ip(v2_ip)
        port = port_free_on_all([v1_ip, v2_ip])
        backends = [Backend("reviews-v1", "v1", v1_ip, port).start(),
                    Backend("reviews-v2", "v2", v2_ip, port).start()]
        values = {"CLUSTER_IP": CLUSTER_IP, "REVIEWS_PORT": port, "REVIEWS_V1_IP": v1_ip,
                  "REVIEWS_V2_IP": v2_ip, "SLEEP_IP": ns.ns_ip}
        pilot = Pilot(mizzen_bin, uid_dir, {"reviews.yaml": render(CONFIGS / "sidecar" / "reviews.yaml.tmpl", values)},
                      xds_host=ns.root_ip, name="pilot-native-sidecar").start()

        apply_in_netns(ns, istio_outbound_redirect_rules(15001, 15006, PROXY_UID, PROXY_UID))
        proxy = NativeProxy(exec_as(PROXY_UID, mizzen_bin, uid_dir), "sidecar", pilot.xds_address,
                            pod_name="sleep", namespace="default", ip=ns.ns_ip, labels={"app": "sleep"},
                            workdir=uid_dir, netns=ns.name, uid=PROXY_UID).start()
        assert wait_acked(pilot, proxy.node_id)["type"] == "sidecar"
        assert proxy.rejected() == {}
        assert "virtualOutbound" in proxy.dynamic_names()["listeners"]

        # Plain curl to the ClusterIP, as root inside the namespace: captured to 15001, handed
        # to the 0.0.0.0_80 listener by its original destination.
        def curl_ok():
            cp = ns.exec(["curl", "-sS", "-m", "5", "-D", "-", f"http://{CLUSTER_IP}/"], check=False, timeout=10)
            return cp.stdout if cp.returncode == 0 and " 200" in cp.stdout.split("\r\n", 1)[0] else None
        out = wait_until(curl_ok, 15, interval=0.3, what=f"curl http://{CLUSTER_IP}/ from {ns.name}", proc=proxy.proc)
        assert "x-backend: reviews-v" in out.lower(), out

        res = ns_requests(ns, 1000)
        assert all(r[0] == 200 for r in res), [r for r in res if r[0] != 200][:5]
        assert all("x-request-id" in r[2]["headers"] for r in res), res[0]
        c = Counter(r[1] for r in res)
        assert set(c) <= {"reviews-v1", "reviews-v2"} and 860 <= c["reviews-v1"] <= 940, c

        res = ns_requests(ns, 20, {"end-user": "jason"})
        assert {r[1] for r in res} == {"reviews-v2"}, res[:3]
        assert all(r[2]["headers"].get("x-mesh") == "mizzen" for r in res), res[0]

        res = ns_requests(ns, 20, {"Host": "reviews.default.svc.cluster.local", "end-user": "jason"})
        assert {r[1] for r in res} == {"reviews-v2"}, res[:3]

        # The proxy's own metrics saw the traffic, per subset cluster.
        text = proxy.get(proxy.stats_port, "/stats/prometheus").text
        sent = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("istio_requests_total{") and "reviews.default.svc.cluster.local" in ln
                   and 'response_code="200"' in ln)
        assert sent >= 1040, text[:2000]
        assert backends[0].total() + backends[1].total() >= 1040
        assert proxy.rejected() == {}
    finally:
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        for b in backends:
            b.stop()
        ns.delete()


# --------------------------------------------------------------------------------------------
# Life cycle: the pilot going away and coming back; SIGTERM with a request in flight.
# --------------------------------------------------------------------------------------------
SMALL_FILES = ["gateway", "web", "vs-split", "vs-edit"]


class SmallMesh:
    """web v1/v2 behind the gateway, a pilot and one native router; torn down by close()."""

    def __init__(self, mizzen_bin, workdir, xds_mode: str = "delta"):
        web_port = port_free_on_all([WEB_V1_IP, WEB_V2_IP])
        self.backends = {"web-v1": Backend("web-v1", "v1", WEB_V1_IP, web_port),
                         "web-v2": Backend("web-v2", "v2", WEB_V2_IP, web_port)}
        self.pilot = self.proxy = self.gw = None
        for b in self.backends.values():
            b.start()
        self.gateway_port = free_port("0.0.0.0")
        self.values = {"GATEWAY_PORT": self.gateway_port, "TCP_GATEWAY_PORT": free_port("0.0.0.0"),
                       "WEB_PORT": web_port, "WEB_V1_IP": WEB_V1_IP, "WEB_V2_IP": WEB_V2_IP,
                       "EDIT_SUBSET": "v1"}
        files = {f"{n}.yaml": render(CONFIGS / "router" / f"{n}.yaml.tmpl", self.values) for n in SMALL_FILES}
        self.pilot = Pilot(mizzen_bin, workdir, files, name="pilot-small").start()
        self.proxy = NativeProxy(mizzen_bin, "router", self.pilot.xds_address, pod_name="ingress-gw-1",
                                 namespace="istio-system", ip="127.0.0.101", labels={"istio": "ingressgateway"},
                                 workdir=workdir, extra_args=["--xds-mode", xds_mode,
                                                              "--drain-duration", "5s"]).start()
        self.gw = Gateway(self.gateway_port)
        wait_until(lambda: self.gw.backend("edit.example.com", "/") == "web-v1", 15,
                   what="edit.example.com routed to web-v1", proc=self.proxy.proc)

    def close(self):
        if self.gw is not None:
            self.gw.close()
        for p in (self.proxy, self.pilot):
            if p is not None:
                p.stop()
        for b in self.backends.values():
            b.stop()


@pytest.mark.parametrize("xds_mode", ["delta", "sotw"])
def test_pilot_restart_loses_no_request_and_resyncs(mizzen_bin, tmp_path, xds_mode):
    m = SmallMesh(mizzen_bin, tmp_path, xds_mode)
    try:
        load = constant_load(m.gateway_port, "edit.example.com", "/load", rps=100, duration=4.0, workers=8,
                             during=m.pilot.stop, during_at=1.0)
        assert len(load.results) == 400
        failures = load.failures()
        assert not failures, f"{len(failures)} failed requests with the pilot gone: {summarize(failures)}"
        assert {r.backend for r in load.results} == {"web-v1"}
        assert m.proxy.stats()["mizzen.xds.connected"] == 0

        # Changed while the pilot was away; the restarted pilot must bring the proxy up to date.
        m.pilot.write("vs-edit.yaml", render(CONFIGS / "router" / "vs-edit.yaml.tmpl",
                                             {**m.values, "EDIT_SUBSET": "v2"}))
        m.pilot.start()
        wait_until(lambda: m.gw.backend("edit.example.com", "/") == "web-v2", 20,
                   what="edit.example.com -> web-v2 after the pilot restart", proc=m.proxy.proc)
        wait_acked(m.pilot, m.proxy.node_id)
        assert m.proxy.stats()["mizzen.xds.connected"] == 1
        assert m.proxy.rejected() == {}
    finally:
        m.close()


def test_sigterm_finishes_the_request_in_flight(mizzen_bin, tmp_path):
    import signal
    import threading

    m = SmallMesh(mizzen_bin, tmp_path)
    try:
        result = {}

        def slow():
            t = time.monotonic()
            try:
                r = Gateway(m.gateway_port).get("edit.example.com", "/delay/1.5")
                result["status"], result["body"] = r.status_code, r.text
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = repr(e)
            result["took"] = time.monotonic() - t

        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.4)
        m.proxy.proc.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: the listener is closed, no new connection is accepted.
        import socket
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", m.gateway_port), timeout=1).close()
        th.join(10)
        assert result.get("status") == 200, result
        assert echo_path(result["body"]) == "/delay/1.5"
        assert m.proxy.proc.popen.wait(timeout=6) == 0, m.proxy.proc.log_tail()
    finally:
        m.close()


def echo_path(body: str) -> str:
    import json
    return json.loads(body)["path"]
