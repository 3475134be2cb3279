"""The pilot, end to end, with real Envoy 1.40 as its data plane.

`mizzen pilot` reads a config directory; `mizzen proxy router|sidecar --envoy` bootstraps and
supervises a real Envoy that takes all its config from the pilot over ADS. Envoy must accept
every update (its own ``*update_rejected`` stats stay 0) and route real requests to real
backends exactly as the Istio config says. Nothing is mocked.

Configs live in ``configs/`` (``{{NAME}}`` placeholders are filled with this run's ports/IPs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from backend import Backend, port_free_on_all
from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.envoy import EnvoyProxy, resolve_envoy_elf
from lib.netns import NetNS
from lib.pilot import CDS, EDS, LDS, RDS, Pilot, dump_json, validate
from lib.procs import Proc, free_port, run, wait_until
from lib.traffic import Gateway, constant_load, echo, summarize

CONFIGS = Path(__file__).resolve().parent / "configs"
ROUTER_FILES = ["gateway", "web", "api", "vs-split", "vs-match", "vs-rewrite", "vs-redirect",
                "vs-fault", "vs-timeout", "vs-retry", "vs-edit", "tcp-echo", "vs-mirror-cors"]
ECHO_V1_IP, ECHO_V2_IP = "127.0.0.15", "127.0.0.16"
ROUTER_IP = "127.0.0.100"  # the gateway's identity (node id); nothing binds it
WEB_V1_IP, WEB_V2_IP, API_V1_IP, API_V2_IP = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"
WEB = "web.default.svc.cluster.local"
API = "api.internal.example"


def render(template: Path, values: dict) -> str:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    assert "{{" not in text, f"{template}: unfilled placeholder in\n{text}"
    return text


def wait_acked(pilot: Pilot, node_id: str, types=(CDS, LDS, RDS, EDS), timeout: float = 15.0) -> dict:
    """Wait until /debug/syncz shows the node with every type sent and ACKed (no NACK)."""
    def check():
        p = pilot.syncz_for(node_id)
        if p is None:
            return None
        res = p.get("resources") or {}
        for t in types:
            r = res.get(t)
            if not r or r.get("sent_version") in (None, "") or r.get("acked_version") != r.get("sent_version"):
                return None
            if r.get("nack") is not None:
                return None
        return p
    try:
        return wait_until(check, timeout, interval=0.2, what=f"{node_id} ACKed {', '.join(types)} in /debug/syncz")
    except AssertionError as e:
        raise AssertionError(f"{e}\n/debug/syncz: {dump_json(pilot.syncz())}") from None


# --------------------------------------------------------------------------------------------
# The router (ingress gateway) mesh, shared by the routing tests of this module.
# --------------------------------------------------------------------------------------------
class RouterMesh:
    def __init__(self, pilot: Pilot, proxy: EnvoyProxy, gw: Gateway, gateway_port: int,
                 backends: dict[str, Backend], values: dict):
        self.pilot, self.proxy, self.gw, self.gateway_port = pilot, proxy, gw, gateway_port
        self.b = backends
        self.values = values

    def render(self, name: str, **extra) -> str:
        return render(CONFIGS / "router" / f"{name}.yaml.tmpl", {**self.values, **extra})


@pytest.fixture(scope="module", params=["delta", "sotw"])
def mesh(request, mizzen_bin, envoy_bin, tmp_path_factory):
    """The router mesh, once with incremental (delta) ADS and once with state-of-the-world:
    the pilot serves both, and every routing test must pass over each."""
    xds_mode = request.param
    workdir = tmp_path_factory.mktemp(f"router-{xds_mode}")
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
        pilot = Pilot(mizzen_bin, workdir, files).start()
        proxy = EnvoyProxy(mizzen_bin, resolve_envoy_elf(str(envoy_bin)), "router", pilot.xds_address,
                           pod_name="ingress-gw-0", namespace="istio-system", ip=ROUTER_IP,
                           labels={"istio": "ingressgateway", "app": "istio-ingressgateway"},
                           workdir=workdir, extra_args=["--xds-mode", xds_mode]).start()
        gw = Gateway(gateway_port)
        # Ready means Envoy has its listeners; give routes a bounded moment to arrive too.
        wait_until(lambda: gw.get("split.example.com", "/", timeout=2).headers.get("x-backend")
                   in ("web-v1", "web-v2"), 15, what=f"split.example.com routed via 127.0.0.1:{gateway_port}",
                   proc=proxy.proc)
        m = RouterMesh(pilot, proxy, gw, gateway_port, backends, values)
        m.xds_mode = xds_mode
        m.tcp_gateway_port = tcp_gateway_port
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


def test_router_gets_all_config_with_zero_rejections(mesh: RouterMesh):
    p = wait_acked(mesh.pilot, mesh.proxy.node_id)
    assert p["type"] == "router"
    assert p["delta"] is (mesh.xds_mode == "delta"), "the stream variant the agent asked for"
    mesh.proxy.assert_no_rejected_updates()

    names = mesh.proxy.dynamic_names()
    port = mesh.gateway_port
    assert f"0.0.0.0_{port}" in names["listeners"], names["listeners"]
    assert f"http.{port}" in names["routes"], names["routes"]
    for c in (f"outbound|80||{WEB}", f"outbound|80|v1|{WEB}", f"outbound|80|v2|{WEB}",
              f"outbound|80||{API}", f"outbound|80|v1|{API}", f"outbound|80|v2|{API}"):
        assert c in names["clusters"], f"{c} not in {sorted(names['clusters'])}"
    assert f"http.{port}" in p["resources"][RDS]["names"]
    assert f"outbound|80|v1|{WEB}" in p["resources"][CDS]["names"]

    # The gateway listener binds the Gateway's server port on all addresses.
    listeners = [c for c in mesh.proxy.config_dump()["configs"] if c["@type"].endswith("ListenersConfigDump")]
    addrs = [dl["active_state"]["listener"]["address"]["socket_address"]
             for dl in listeners[0].get("dynamic_listeners", []) if dl["name"] == f"0.0.0.0_{port}"]
    assert addrs and addrs[0]["address"] == "0.0.0.0" and addrs[0]["port_value"] == port, addrs


def test_weighted_split_90_10(mesh: RouterMesh):
    counts: Counter[str] = Counter()
    for _ in range(1000):
        r = mesh.gw.get("split.example.com", "/split")
        assert r.status_code == 200, (r.status_code, r.text[:200])
        counts[r.headers.get("x-backend")] += 1
    assert set(counts) <= {"web-v1", "web-v2"}, counts
    assert 860 <= counts["web-v1"] <= 940, f"90/10 split off by more than 4%: {counts}"
    assert counts["web-v1"] + counts["web-v2"] == 1000


def test_header_prefix_and_regex_match(mesh: RouterMesh):
    cases = [
        ("/", {}, "web-v1"),
        ("/", {"x-user": "jason"}, "web-v2"),
        ("/", {"x-user": "jasonx"}, "web-v1"),           # exact, not prefix
        ("/api/orders", {}, "api-v1"),
        ("/api/orders", {"x-user": "jason"}, "web-v2"),  # first matching rule wins
        ("/apix", {}, "web-v1"),
        ("/items/42", {}, "api-v2"),
        ("/items/42x", {}, "web-v1"),                    # the regex matches the whole path
        ("/items/", {}, "web-v1"),
    ]
    got = [(path, hdrs, mesh.gw.backend("match.example.com", path, hdrs)) for path, hdrs, _ in cases]
    want = [(path, hdrs, exp) for path, hdrs, exp in cases]
    assert got == want
    e = echo(mesh.gw.get("match.example.com", "/api/orders?id=7"))
    assert (e["name"], e["path"]) == ("api-v1", "/api/orders?id=7")


def test_rewrite(mesh: RouterMesh):
    r = mesh.gw.get("rewrite.example.com", "/old/thing?a=1")
    assert r.status_code == 200, r.text[:200]
    e = echo(r)
    assert e["name"] == "web-v1"
    assert e["path"] == "/new/thing?a=1"
    assert mesh.b["web-v1"].count("/new/thing?a=1") >= 1
    assert mesh.b["web-v1"].count("/old/thing?a=1") == 0
    assert mesh.gw.get("rewrite.example.com", "/other").status_code == 404  # no matching route


def test_redirect(mesh: RouterMesh):
    before = mesh.b["web-v1"].total() + mesh.b["web-v2"].total()
    r = mesh.gw.get("redirect.example.com", "/go")
    assert r.status_code == 301, (r.status_code, r.text[:200])
    assert r.headers.get("location") == "http://new.example.com/landing"
    assert mesh.b["web-v1"].total() + mesh.b["web-v2"].total() == before


def test_fault_abort_always(mesh: RouterMesh):
    path = f"/abort/{uuid.uuid4().hex}"
    for _ in range(5):
        r = mesh.gw.get("fault.example.com", path)
        assert r.status_code == 418
        assert r.text == "fault filter abort"
    assert mesh.b["web-v1"].count(path) == 0


def test_fault_abort_percentage(mesh: RouterMesh):
    path = f"/sometimes/{uuid.uuid4().hex}"
    codes: Counter[int] = Counter(mesh.gw.get("fault.example.com", path).status_code for _ in range(500))
    assert set(codes) <= {200, 503}, codes
    assert 100 <= codes[503] <= 200, f"30% abort over 500 requests: {codes}"
    assert mesh.b["web-v1"].count(path) == codes[200], "aborted requests must not reach the backend"


def test_fault_delay(mesh: RouterMesh):
    t = time.monotonic()
    r = mesh.gw.get("fault.example.com", "/slow/x")
    took = time.monotonic() - t
    assert r.status_code == 200 and echo(r)["name"] == "web-v1"
    assert 0.95 <= took < 1.9, f"fixedDelay 1s, took {took:.2f}s"


def test_timeout_2s_answers_504(mesh: RouterMesh):
    t = time.monotonic()
    r = mesh.gw.get("timeout.example.com", "/delay/5")
    took = time.monotonic() - t
    assert r.status_code == 504
    assert r.text == "upstream request timeout"
    assert 1.9 <= took < 3.0, f"timeout 2s, answered after {took:.2f}s"
    r = mesh.gw.get("timeout.example.com", "/delay/0.5")
    assert r.status_code == 200 and echo(r)["path"] == "/delay/0.5"


def test_retries(mesh: RouterMesh):
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


def test_mirror_sends_a_copy_to_v2(mesh: RouterMesh):
    tag = uuid.uuid4().hex
    for i in range(5):
        r = mesh.gw.get("mirror.example.com", f"/m/{tag}/{i}")
        assert r.status_code == 200 and r.headers["x-backend"] == "web-v1", "v1 answers"
    # The mirror is fire and forget: its copies arrive asynchronously.
    wait_until(lambda: all(mesh.b["web-v2"].count(f"/m/{tag}/{i}") == 1 for i in range(5)), 5,
               what="every request mirrored to web-v2 exactly once")
    assert all(mesh.b["web-v1"].count(f"/m/{tag}/{i}") == 1 for i in range(5))


def test_cors_preflight_and_simple_request(mesh: RouterMesh):
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
    # An origin the policy does not allow gets no CORS headers.
    r = mesh.gw.get("mirror.example.com", "/c", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in r.headers


def test_tcp_route_through_gateway(mesh: RouterMesh):
    """A Gateway TCP server plus a VirtualService tcp route: bytes flow through Envoy's
    tcp_proxy to the subset the route names (v2), on a real TCP echo backend."""
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
    mesh.proxy.assert_no_rejected_updates()


def test_config_edit_under_load_switches_within_2s(mesh: RouterMesh):
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
        first_v2 = min(r.end for r in res if r.backend == "web-v2")
        assert first_v2 - t_edit <= 2.0
        mesh.proxy.assert_no_rejected_updates()
    finally:
        # Put the file back for whatever runs next; do not mask this test's own failure.
        mesh.pilot.write("vs-edit.yaml", mesh.render("vs-edit", EDIT_SUBSET="v1"))
        try:
            wait_until(lambda: mesh.gw.backend(host, "/") == "web-v1", 10, what="edit VS back to v1")
        except AssertionError:
            pass


def test_broken_files_reported_and_change_nothing_else(mesh: RouterMesh):
    stats_before = mesh.proxy.assert_no_rejected_updates()
    broken = ["bad-weights.yaml", "bad-regex.yaml", "not-yaml.yaml"]
    for f in broken:
        mesh.pilot.write(f, (CONFIGS / "broken" / f).read_text())
    try:
        def reported():
            errs = mesh.pilot.configz()["errors"]
            files = {Path(e.get("file") or "").name for e in errs}
            return errs if set(broken) <= files else None
        errors = wait_until(reported, 10, interval=0.2, what="/debug/configz errors naming the 3 broken files")

        def one(fname):
            es = [e for e in errors if Path(e.get("file") or "").name == fname]
            assert es, errors
            return es

        for fname, name, word in (("bad-weights.yaml", "bad-weights", "weight"),
                                  ("bad-regex.yaml", "bad-regex", "regex")):
            es = one(fname)
            assert any(e.get("kind") == "VirtualService" and e.get("namespace") == "default"
                       and e.get("name") == name for e in es), es
            assert any(word in f"{e.get('field')} {e.get('message')}".lower() and e.get("field") for e in es), es
        assert all(e.get("message") for e in one("not-yaml.yaml"))

        resources = {(r["kind"], r["namespace"], r["name"]) for r in mesh.pilot.configz()["resources"]}
        for good in (("VirtualService", "default", "split"), ("VirtualService", "default", "match"),
                     ("VirtualService", "shop", "rewrite"), ("Gateway", "default", "public-gw"),
                     ("ServiceEntry", "default", "api"), ("DestinationRule", "default", "web")):
            assert good in resources, f"{good} not in {sorted(resources)}"
        assert ("VirtualService", "default", "bad-weights") not in resources
        assert ("VirtualService", "default", "bad-regex") not in resources

        # Give a (wrong) push time to land, then check nothing changed in Envoy.
        time.sleep(1.5)
        assert mesh.gw.get("broken.example.com", "/").status_code == 404
        assert mesh.gw.get("broken2.example.com", "/items/1").status_code == 404
        assert mesh.gw.backend("match.example.com", "/items/42") == "api-v2"
        assert mesh.gw.backend("match.example.com", "/", {"x-user": "jason"}) == "web-v2"
        assert {mesh.gw.backend("split.example.com", "/") for _ in range(30)} <= {"web-v1", "web-v2"}
        assert mesh.proxy.rejected_updates() == {}
        node = mesh.pilot.syncz_for(mesh.proxy.node_id)
        assert node is not None
        assert all(r.get("nack") is None for r in node["resources"].values()), dump_json(node)
        assert mesh.proxy.stats()["listener_manager.lds.update_rejected"] == \
            stats_before["listener_manager.lds.update_rejected"] == 0
    finally:
        for f in broken:
            if mesh.pilot.path(f).exists():
                mesh.pilot.delete(f)
    wait_until(lambda: mesh.pilot.configz()["errors"] == [], 10, what="errors cleared after deleting the files")


# --------------------------------------------------------------------------------------------
# Envoy as a sidecar in a network namespace, with Istio's capture rules written by the test.
# --------------------------------------------------------------------------------------------
PROXY_UID = 1337
CLUSTER_IP = "10.96.0.10"

NS_CLIENT = r"""
import http.client, json, sys
url_host, n, headers = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
out = []
conn = http.client.HTTPConnection(url_host, 80, timeout=10)
for i in range(n):
    try:
        conn.request("GET", "/reviews/%d" % i, headers=headers)
        r = conn.getresponse()
        body = r.read()
        try:
            echo = json.loads(body)
        except ValueError:
            echo = None
        out.append([r.status, r.getheader("x-backend"), echo])
    except Exception as e:
        out.append([None, None, repr(e)])
        conn.close()
        conn = http.client.HTTPConnection(url_host, 80, timeout=10)
print(json.dumps(out))
"""


def ns_requests(ns: NetNS, n: int, headers: dict | None = None, target: str = CLUSTER_IP) -> list:
    """n GET requests from inside the namespace, as root (not the proxy's uid), one keep-alive
    connection to TARGET:80, so capture sends them through Envoy's 15001."""
    cp = ns.exec([sys.executable, "-c", NS_CLIENT, target, str(n), json.dumps(headers or {})],
                 timeout=60 + n * 0.05)
    return json.loads(cp.stdout)


@pytest.fixture
def uid_dir():
    """A directory the proxy's uid can enter (pytest's tmp dirs are 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="mizzen-e2e-sidecar-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def exec_as(uid: int, path: Path, into: Path) -> str:
    """path itself if uid can execute it, else a copy in into/ that it can."""
    ok = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "test", "-x", str(path)],
                        timeout=10).returncode == 0
    if ok:
        return str(path)
    dest = into / "bin" / Path(path).name
    dest.parent.mkdir(exist_ok=True)
    os.chmod(dest.parent, 0o755)
    shutil.copy2(path, dest)
    os.chmod(dest, 0o755)
    return str(dest)


def test_sidecar_in_netns_with_capture(require_root, mizzen_bin, envoy_bin, uid_dir):
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
                      xds_host=ns.root_ip, name="pilot-sidecar").start()

        apply_in_netns(ns, istio_outbound_redirect_rules(15001, 15006, PROXY_UID, PROXY_UID))
        proxy = EnvoyProxy(exec_as(PROXY_UID, mizzen_bin, uid_dir),
                           exec_as(PROXY_UID, Path(resolve_envoy_elf(str(envoy_bin))), uid_dir),
                           "sidecar", pilot.xds_address, pod_name="sleep", namespace="default",
                           ip=ns.ns_ip, labels={"app": "sleep"}, workdir=uid_dir,
                           netns=ns.name, uid=PROXY_UID).start()
        assert wait_acked(pilot, proxy.node_id)["type"] == "sidecar"
        proxy.assert_no_rejected_updates()
        assert "virtualOutbound" in proxy.dynamic_names()["listeners"]

        # Plain curl to the ClusterIP, as root inside the namespace: captured to 15001.
        def curl_ok():
            cp = ns.exec(["curl", "-sS", "-m", "5", "-D", "-", f"http://{CLUSTER_IP}/"], check=False, timeout=10)
            return cp.stdout if cp.returncode == 0 and " 200" in cp.stdout.split("\r\n", 1)[0] else None
        out = wait_until(curl_ok, 15, interval=0.3, what=f"curl http://{CLUSTER_IP}/ from {ns.name}", proc=proxy.proc)
        assert "x-backend: reviews-v" in out.lower(), out

        # 90/10 split across subsets.
        res = ns_requests(ns, 1000)
        assert all(r[0] == 200 for r in res), [r for r in res if r[0] != 200][:5]
        # Through Envoy, not straight to the backend: Envoy adds x-request-id upstream.
        assert all("x-request-id" in r[2]["headers"] for r in res), res[0]
        c = Counter(r[1] for r in res)
        assert set(c) <= {"reviews-v1", "reviews-v2"} and 860 <= c["reviews-v1"] <= 940, c

        # Header match goes to v2, with the request header set by the route.
        res = ns_requests(ns, 20, {"end-user": "jason"})
        assert {r[1] for r in res} == {"reviews-v2"}, res[:3]
        assert all(r[2]["headers"].get("x-mesh") == "mizzen" for r in res), res[0]

        # The service's FQDN as Host works the same way.
        res = ns_requests(ns, 20, {"Host": "reviews.default.svc.cluster.local", "end-user": "jason"})
        assert {r[1] for r in res} == {"reviews-v2"}, res[:3]

        # Envoy's own counters for the subset clusters saw the traffic.
        stats = proxy.stats()
        sent = sum(stats.get(f"cluster.outbound|80|{v}|reviews.default.svc.cluster.local.upstream_rq_total", 0)
                   for v in ("v1", "v2"))
        assert sent >= 1040, {k: v for k, v in stats.items() if k.endswith("upstream_rq_total")}
        assert backends[0].total() + backends[1].total() >= 1040
        proxy.assert_no_rejected_updates()

        # Outbound traffic policy: a destination outside the registry (a pod IP and port no
        # Service names) passes through with the default ALLOW_ANY ...
        direct = f"http://{v1_ip}:{port}/direct"
        def curl_direct():
            return ns.exec(["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", direct],
                           check=False, timeout=10)
        cp = curl_direct()
        assert cp.returncode == 0 and cp.stdout == "200", (cp.returncode, cp.stdout, cp.stderr)
        passthrough = proxy.stats().get("cluster.PassthroughCluster.upstream_cx_total", 0)
        assert passthrough >= 1, "went through Envoy's PassthroughCluster, not around it"
        # ... and is refused once a mesh-wide Sidecar says REGISTRY_ONLY, while the service
        # keeps working.
        pilot.write("registry-only.yaml", """apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: istio-system
spec:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
""")
        wait_until(lambda: curl_direct().returncode != 0 or None, 10, interval=0.3,
                   what="REGISTRY_ONLY blocks an unknown destination", proc=proxy.proc)
        assert proxy.stats().get("cluster.BlackHoleCluster.upstream_cx_none_healthy", 0) >= 1, \
            "refused by Envoy's BlackHoleCluster (no endpoints), not by the network"
        res = ns_requests(ns, 10)
        assert all(r[0] == 200 for r in res), res[:3]
        proxy.assert_no_rejected_updates()
    finally:
        if proxy is not None:
            proxy.stop()
        if pilot is not None:
            pilot.stop()
        for b in backends:
            b.stop()
        ns.delete()


# --------------------------------------------------------------------------------------------
# mizzen validate
# --------------------------------------------------------------------------------------------
def test_every_shared_sample_validates(mizzen_bin, shared_testdata):
    cp = validate(mizzen_bin, shared_testdata)
    assert cp.returncode == 0, f"mizzen validate {shared_testdata} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}"


def test_validate_example_and_tmpl_files(mizzen_bin, tmp_path):
    cp = validate(mizzen_bin, CONFIGS / "example")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    (tmp_path / "ok.yaml").write_text((CONFIGS / "example" / "hello.yaml").read_text())
    (tmp_path / "x.yaml.tmpl").write_text("{{ .Values }}: [\n  not yaml\n")
    cp = validate(mizzen_bin, tmp_path)
    assert cp.returncode == 0, "a .tmpl file must not be read\n" + cp.stdout + cp.stderr


def test_validate_reports_file_resource_and_field(mizzen_bin, tmp_path):
    for f in ("bad-weights.yaml", "bad-regex.yaml", "not-yaml.yaml"):
        shutil.copy(CONFIGS / "broken" / f, tmp_path / f)
    (tmp_path / "good.yaml").write_text((CONFIGS / "example" / "hello.yaml").read_text())
    cp = validate(mizzen_bin, tmp_path)
    out = (cp.stdout + cp.stderr).splitlines()
    assert cp.returncode == 1, f"rc={cp.returncode}\n" + "\n".join(out)

    def line_with(*words):
        hits = [ln for ln in out if all(w.lower() in ln.lower() for w in words)]
        assert hits, f"no line has all of {words}:\n" + "\n".join(out)
        return hits

    line_with("bad-weights.yaml", "VirtualService", "default", "bad-weights", "weight")
    line_with("bad-regex.yaml", "VirtualService", "default", "bad-regex", "regex")
    line_with("not-yaml.yaml")
    assert not [ln for ln in out if "good.yaml" in ln], "a valid file must not be reported"

    # Files given one by one: only the broken one fails.
    assert validate(mizzen_bin, tmp_path / "good.yaml").returncode == 0
    assert validate(mizzen_bin, tmp_path / "bad-regex.yaml").returncode == 1


def test_harness_backend_is_real(tmp_path):
    """The backend itself answers on a real socket with the documented echo (harness check)."""
    with Backend("probe", "v9", "127.0.0.21", 0) as b:
        cp = run(["curl", "-sS", "-m", "5", "-D", "-", "-H", "x-test: 1", f"http://{b.address}/status/418/a?b=c"])
        head, _, body = cp.stdout.partition("\n\n")  # text mode: CRLF read as LF
        assert head.startswith("HTTP/1.1 418")
        assert "x-backend: probe" in head
        e = json.loads(body)
        assert (e["name"], e["version"], e["method"], e["path"], e["headers"]["x-test"]) == \
            ("probe", "v9", "GET", "/status/418/a?b=c", "1")
        assert b.count("/status/418/a?b=c") == 1
