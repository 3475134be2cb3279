"""The pilot, end to end, with real Envoy 1.40 as its data plane (the routing scenarios through
the gateway are in test_routing.py, shared with the native proxy).

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
from collections import Counter
from pathlib import Path

import pytest

from backend import Backend, port_free_on_all
from lib.capture import apply_in_netns, istio_outbound_redirect_rules
from lib.envoy import EnvoyProxy, resolve_envoy_elf
from lib.netns import NetNS
from lib.pilot import Pilot, validate
from lib.procs import run, wait_until
from lib.router import CONFIGS, render, wait_acked

# The router scenario (routing through the gateway) is the shared suite in test_routing.py, run
# through Envoy and the native proxy alike.


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
