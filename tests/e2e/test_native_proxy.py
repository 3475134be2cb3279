"""The native Mizzen proxy, end to end: the router scenarios of test_pilot_envoy.py, through
``mizzen proxy router`` without ``--envoy``.

Same pilot, same config files (``configs/router``), same backends and the same expected results
as with Envoy: a difference is a bug in one of the two data planes. Plus what only the native
proxy can show: a resource it cannot honour is NACKed with a precise reason (visible in the
pilot's ``/debug/syncz``) while traffic keeps flowing on the previous config.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from backend import Backend, port_free_on_all
from lib.native import NativeProxy
from lib.pilot import CDS, EDS, LDS, RDS, Pilot, dump_json
from lib.procs import Proc, free_port, wait_until
from lib.traffic import Gateway, constant_load, echo, summarize
# The router scenario's constants and helpers, shared with the Envoy run on purpose.
from test_pilot_envoy import (API, API_V1_IP, API_V2_IP, CLUSTER_IP, CONFIGS, ECHO_V1_IP, ECHO_V2_IP,
                              PROXY_UID, ROUTER_FILES, ROUTER_IP, WEB, WEB_V1_IP, WEB_V2_IP, exec_as,
                              ns_requests, render, uid_dir, wait_acked)
from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.netns import NetNS

assert uid_dir  # a fixture, used by name below

HASHED = """\
# Consistent-hash load balancing (RING_HASH) is not implemented by the native proxy yet: the
# cluster must be NACKed while everything else keeps working.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: hashed
  namespace: default
spec:
  hosts:
  - hashed.internal.example
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  endpoints:
  - address: {{WEB_V1_IP}}
    ports:
      http: {{WEB_PORT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: hashed
  namespace: default
spec:
  host: hashed.internal.example
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: hashed
  namespace: default
spec:
  hosts:
  - hashed.example.com
  gateways:
  - public-gw
  http:
  - route:
    - destination:
        host: hashed.internal.example
"""


class NativeMesh:
    def __init__(self, pilot: Pilot, proxy: NativeProxy, gw: Gateway, gateway_port: int,
                 backends: dict[str, Backend], values: dict):
        self.pilot, self.proxy, self.gw, self.gateway_port = pilot, proxy, gw, gateway_port
        self.b = backends
        self.values = values

    def render(self, name: str, **extra) -> str:
        return render(CONFIGS / "router" / f"{name}.yaml.tmpl", {**self.values, **extra})


@pytest.fixture(scope="module", params=["delta", "sotw"])
def mesh(request, mizzen_bin, tmp_path_factory):
    """The router mesh over incremental (delta) ADS and over state of the world."""
    xds_mode = request.param
    workdir = tmp_path_factory.mktemp(f"native-router-{xds_mode}")
    web_port = port_free_on_all([WEB_V1_IP, WEB_V2_IP])
    backends = {
        "web-v1": Backend("web-v1", "v1", WEB_V1_IP, web_port),
        "web-v2": Backend("web-v2", "v2", WEB_V2_IP, web_port),
        "api-v1": Backend("api-v1", "v1", API_V1_IP, 0),
        "api-v2": Backend("api-v2", "v2", API_V2_IP, 0),
    }
    pilot = proxy = gw = None
    echo_procs = []
    try:
        for b in backends.values():
            b.start()
        gateway_port = free_port("0.0.0.0")
        tcp_gateway_port = free_port("0.0.0.0")
        echo_port = port_free_on_all([ECHO_V1_IP, ECHO_V2_IP])
        for ip, version in ((ECHO_V1_IP, "v1"), (ECHO_V2_IP, "v2")):
            echo_procs.append(Proc(f"tcp-echo-{version}", [mizzen_bin, "sample-app", "--listen-address", ip,
                                                          "--tcp-echo-port", str(echo_port), "--version", version],
                                   workdir / f"tcp-echo-{version}.log"))
        values = {
            "GATEWAY_PORT": gateway_port, "WEB_PORT": web_port,
            "WEB_V1_IP": WEB_V1_IP, "WEB_V2_IP": WEB_V2_IP,
            "API_V1_IP": API_V1_IP, "API_V1_PORT": backends["api-v1"].port,
            "API_V2_IP": API_V2_IP, "API_V2_PORT": backends["api-v2"].port,
            "EDIT_SUBSET": "v1",
            "TCP_GATEWAY_PORT": tcp_gateway_port, "ECHO_PORT": echo_port,
            "ECHO_V1_IP": ECHO_V1_IP, "ECHO_V2_IP": ECHO_V2_IP,
        }
        files = {f"{n}.yaml": render(CONFIGS / "router" / f"{n}.yaml.tmpl", values) for n in ROUTER_FILES}
        pilot = Pilot(mizzen_bin, workdir, files, name="pilot-native").start()
        proxy = NativeProxy(mizzen_bin, "router", pilot.xds_address, pod_name="ingress-gw-0",
                            namespace="istio-system", ip=ROUTER_IP,
                            labels={"istio": "ingressgateway", "app": "istio-ingressgateway"},
                            workdir=workdir, extra_args=["--xds-mode", xds_mode]).start()
        gw = Gateway(gateway_port)
        wait_until(lambda: gw.get("split.example.com", "/", timeout=2).headers.get("x-backend")
                   in ("web-v1", "web-v2"), 15, what=f"split.example.com routed via 127.0.0.1:{gateway_port}",
                   proc=proxy.proc)
        m = NativeMesh(pilot, proxy, gw, gateway_port, backends, values)
        m.tcp_gateway_port = tcp_gateway_port
        m.xds_mode = xds_mode
        yield m
    finally:
        if gw is not None:
            gw.close()
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        for b in backends.values():
            b.stop()
        for p in echo_procs:
            p.stop()


def test_router_gets_all_config_with_zero_rejections(mesh: NativeMesh):
    p = wait_acked(mesh.pilot, mesh.proxy.node_id)
    assert p["type"] == "router"
    assert p["delta"] is (mesh.xds_mode == "delta"), "the stream variant the proxy asked for"
    assert mesh.proxy.rejected() == {}
    names = mesh.proxy.dynamic_names()
    port = mesh.gateway_port
    assert f"0.0.0.0_{port}" in names["listeners"], names["listeners"]
    assert f"http.{port}" in names["routes"], names["routes"]
    for c in (f"outbound|80||{WEB}", f"outbound|80|v1|{WEB}", f"outbound|80|v2|{WEB}",
              f"outbound|80||{API}", f"outbound|80|v1|{API}", f"outbound|80|v2|{API}"):
        assert c in names["clusters"], f"{c} not in {sorted(names['clusters'])}"
    listeners = [c for c in mesh.proxy.config_dump()["configs"] if c["@type"].endswith("ListenersConfigDump")]
    addrs = [dl["active_state"]["listener"]["address"]["socket_address"]
             for dl in listeners[0]["dynamic_listeners"] if dl["name"] == f"0.0.0.0_{port}"]
    assert addrs == [{"address": "0.0.0.0", "port_value": port}], addrs


def test_weighted_split_90_10(mesh: NativeMesh):
    counts: Counter[str] = Counter()
    for _ in range(1000):
        r = mesh.gw.get("split.example.com", "/split")
        assert r.status_code == 200, (r.status_code, r.text[:200])
        counts[r.headers.get("x-backend")] += 1
    assert set(counts) <= {"web-v1", "web-v2"}, counts
    assert 860 <= counts["web-v1"] <= 940, f"90/10 split off by more than 4%: {counts}"
    assert counts["web-v1"] + counts["web-v2"] == 1000


def test_header_prefix_and_regex_match(mesh: NativeMesh):
    cases = [
        ("/", {}, "web-v1"),
        ("/", {"x-user": "jason"}, "web-v2"),
        ("/", {"x-user": "jasonx"}, "web-v1"),
        ("/api/orders", {}, "api-v1"),
        ("/api/orders", {"x-user": "jason"}, "web-v2"),
        ("/apix", {}, "web-v1"),
        ("/items/42", {}, "api-v2"),
        ("/items/42x", {}, "web-v1"),
        ("/items/", {}, "web-v1"),
    ]
    got = [(path, hdrs, mesh.gw.backend("match.example.com", path, hdrs)) for path, hdrs, _ in cases]
    assert got == cases
    e = echo(mesh.gw.get("match.example.com", "/api/orders?id=7"))
    assert (e["name"], e["path"]) == ("api-v1", "/api/orders?id=7")
    # Proxied, not passed through: the proxy adds a request id upstream.
    assert "x-request-id" in e["headers"], e["headers"]


def test_rewrite(mesh: NativeMesh):
    r = mesh.gw.get("rewrite.example.com", "/old/thing?a=1")
    assert r.status_code == 200, r.text[:200]
    e = echo(r)
    assert e["name"] == "web-v1"
    assert e["path"] == "/new/thing?a=1"
    assert mesh.b["web-v1"].count("/new/thing?a=1") >= 1
    assert mesh.b["web-v1"].count("/old/thing?a=1") == 0
    assert mesh.gw.get("rewrite.example.com", "/other").status_code == 404


def test_redirect(mesh: NativeMesh):
    before = mesh.b["web-v1"].total() + mesh.b["web-v2"].total()
    r = mesh.gw.get("redirect.example.com", "/go")
    assert r.status_code == 301, (r.status_code, r.text[:200])
    assert r.headers.get("location") == "http://new.example.com/landing"
    assert mesh.b["web-v1"].total() + mesh.b["web-v2"].total() == before


def test_fault_abort_always(mesh: NativeMesh):
    path = f"/abort/{uuid.uuid4().hex}"
    for _ in range(5):
        r = mesh.gw.get("fault.example.com", path)
        assert r.status_code == 418
        assert r.text == "fault filter abort"
    assert mesh.b["web-v1"].count(path) == 0


def test_fault_abort_percentage(mesh: NativeMesh):
    path = f"/sometimes/{uuid.uuid4().hex}"
    codes: Counter[int] = Counter(mesh.gw.get("fault.example.com", path).status_code for _ in range(500))
    assert set(codes) <= {200, 503}, codes
    assert 100 <= codes[503] <= 200, f"30% abort over 500 requests: {codes}"
    assert mesh.b["web-v1"].count(path) == codes[200], "aborted requests must not reach the backend"


def test_fault_delay(mesh: NativeMesh):
    t = time.monotonic()
    r = mesh.gw.get("fault.example.com", "/slow/x")
    took = time.monotonic() - t
    assert r.status_code == 200 and echo(r)["name"] == "web-v1"
    assert 0.95 <= took < 1.9, f"fixedDelay 1s, took {took:.2f}s"


def test_timeout_2s_answers_504(mesh: NativeMesh):
    t = time.monotonic()
    r = mesh.gw.get("timeout.example.com", "/delay/5")
    took = time.monotonic() - t
    assert r.status_code == 504
    assert r.text == "upstream request timeout"
    assert 1.9 <= took < 3.0, f"timeout 2s, answered after {took:.2f}s"
    r = mesh.gw.get("timeout.example.com", "/delay/0.5")
    assert r.status_code == 200 and echo(r)["path"] == "/delay/0.5"


def test_retries(mesh: NativeMesh):
    tag = uuid.uuid4().hex
    r = mesh.gw.get("retry.example.com", f"/status/503/{tag}")
    assert r.status_code == 503
    assert mesh.b["web-v1"].count(f"/status/503/{tag}") == 4, "attempts: 3 means 1 try + 3 retries"

    r = mesh.gw.get("retry.example.com", f"/none/status/503/{tag}")
    assert r.status_code == 503
    assert mesh.b["web-v1"].count(f"/none/status/503/{tag}") == 1, "attempts: 0 means no retry"

    r = mesh.gw.get("retry.example.com", f"/status/200/{tag}")
    assert r.status_code == 200
    assert mesh.b["web-v1"].count(f"/status/200/{tag}") == 1


def test_istio_metrics_on_the_stats_port(mesh: NativeMesh):
    for _ in range(3):
        assert mesh.gw.get("match.example.com", "/items/7").status_code == 200
    assert mesh.gw.get("fault.example.com", f"/abort/{uuid.uuid4().hex}").status_code == 418
    text = mesh.proxy.prometheus()
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    api_v2 = [ln for ln in lines if f'destination_cluster="outbound|80|v2|{API}"' in ln
              and 'response_code="200"' in ln]
    assert api_v2, "\n".join(lines)
    for label in ('reporter="source"', f'destination_service="{API}"', 'request_protocol="http"',
                  'response_flags="-"'):
        assert label in api_v2[0], api_v2[0]
    assert float(api_v2[0].rsplit(" ", 1)[1]) >= 3
    assert any('response_code="418"' in ln and 'response_flags="FI"' in ln for ln in lines), "\n".join(lines)
    assert "istio_request_duration_milliseconds_bucket{" in text


def test_tcp_route_through_gateway(mesh: NativeMesh):
    """The Gateway's TCP server: tcp_proxy to the subset the tcp route names (v2)."""
    import socket

    def roundtrip(line: str) -> str:
        with socket.create_connection(("127.0.0.1", mesh.tcp_gateway_port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(line.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.decode().strip()

    answer = wait_until(lambda: roundtrip("hello") or None, 10, what="tcp echo through the gateway")
    assert answer == "v2 hello", answer
    for i in range(5):
        assert roundtrip(f"line {i}") == f"v2 line {i}"
    assert mesh.proxy.rejected() == {}


def test_config_edit_under_load_switches_within_2s(mesh: NativeMesh):
    host = "edit.example.com"
    assert mesh.gw.backend(host, "/") == "web-v1"
    edit = {}

    def do_edit():
        mesh.pilot.write("vs-edit.yaml", mesh.render("vs-edit", EDIT_SUBSET="v2"))
        edit["t"] = time.monotonic()

    try:
        load = constant_load(mesh.gateway_port, host, "/load", rps=200, duration=8.0, workers=16,
                             during=do_edit, during_at=3.0)
        res = load.results
        assert len(res) == 1600
        failures = load.failures()
        assert not failures, f"{len(failures)} failed requests: {summarize(failures)}"
        t_edit = edit["t"]
        before = Counter(r.backend for r in res if r.end < t_edit)
        late = Counter(r.backend for r in res if r.start >= t_edit + 2.0)
        assert before and set(before) == {"web-v1"}, f"before the edit: {before}"
        assert sum(late.values()) >= 500, f"too few requests after edit+2s: {late}"
        assert set(late) == {"web-v2"}, f"more than 2 s after the edit: {late}"
        assert mesh.proxy.rejected() == {}
    finally:
        mesh.pilot.write("vs-edit.yaml", mesh.render("vs-edit", EDIT_SUBSET="v1"))
        try:
            wait_until(lambda: mesh.gw.backend(host, "/") == "web-v1", 10, what="edit VS back to v1")
        except AssertionError:
            pass


def test_unsupported_feature_is_nacked_and_previous_config_keeps_serving(mesh: NativeMesh):
    node = mesh.proxy.node_id
    cluster = "outbound|80||hashed.internal.example"
    wait_acked(mesh.pilot, node)
    rejected_before = mesh.proxy.stats()["cluster_manager.cds.update_rejected"]
    text = HASHED
    for k, v in mesh.values.items():
        text = text.replace("{{" + k + "}}", str(v))
    mesh.pilot.write("hashed.yaml", text)
    try:
        def nacked():
            p = mesh.pilot.syncz_for(node)
            nack = ((p or {}).get("resources") or {}).get(CDS, {}).get("nack")
            return nack if nack and cluster in (nack.get("message") or "") else None
        try:
            nack = wait_until(nacked, 10, interval=0.2, what=f"CDS NACK naming {cluster}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n/debug/syncz: {dump_json(mesh.pilot.syncz())}") from None
        msg = nack["message"]
        assert f"cluster {cluster}: lb_policy: RING_HASH is not supported yet" in msg, msg
        assert mesh.proxy.stats()["cluster_manager.cds.update_rejected"] > rejected_before
        assert cluster not in mesh.proxy.dynamic_names()["clusters"]

        # Everything else keeps working; the route to the rejected cluster answers 503 (NC),
        # as Envoy does for a cluster it does not have.
        counts = Counter(mesh.gw.get("split.example.com", "/").headers.get("x-backend") for _ in range(50))
        assert set(counts) <= {"web-v1", "web-v2"} and sum(counts.values()) == 50, counts
        assert mesh.gw.backend("match.example.com", "/items/1") == "api-v2"
        wait_until(lambda: mesh.gw.get("hashed.example.com", "/").status_code == 503, 10,
                   what="hashed.example.com -> 503 (cluster rejected)")
    finally:
        mesh.pilot.delete("hashed.yaml")
    # Once the pilot stops sending it, the next version is ACKed again.
    wait_acked(mesh.pilot, node, types=(CDS, LDS, RDS, EDS))
    assert mesh.gw.backend("split.example.com", "/") in ("web-v1", "web-v2")


def test_mirror_sends_a_copy_to_v2(mesh: NativeMesh):
    tag = uuid.uuid4().hex
    for i in range(5):
        r = mesh.gw.get("mirror.example.com", f"/m/{tag}/{i}")
        assert r.status_code == 200 and r.headers["x-backend"] == "web-v1", "v1 answers"
    wait_until(lambda: all(mesh.b["web-v2"].count(f"/m/{tag}/{i}") == 1 for i in range(5)), 5,
               what="every request mirrored to web-v2 exactly once")
    assert all(mesh.b["web-v1"].count(f"/m/{tag}/{i}") == 1 for i in range(5))


def test_cors_preflight_and_simple_request(mesh: NativeMesh):
    pre = mesh.gw.session.options(f"http://127.0.0.1:{mesh.gateway_port}/c", timeout=10, headers={
        "Host": "mirror.example.com", "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-custom"})
    assert pre.status_code == 200, pre.text
    assert pre.headers.get("access-control-allow-origin") == "https://app.example.com"
    assert "POST" in pre.headers.get("access-control-allow-methods", "")
    assert pre.headers.get("access-control-allow-credentials") == "true"
    assert pre.headers.get("access-control-max-age") == "86400"
    r = mesh.gw.get("mirror.example.com", "/c", headers={"Origin": "https://dev.example.org"})
    assert r.headers.get("access-control-allow-origin") == "https://dev.example.org"
    assert r.headers.get("access-control-expose-headers") == "x-backend"
    r = mesh.gw.get("mirror.example.com", "/c", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in r.headers


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
