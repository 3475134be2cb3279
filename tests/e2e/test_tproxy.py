"""TPROXY capture (``mizzen iptables -m TPROXY``, istio-iptables' ``-m TPROXY``) with the native
sidecar, in a network namespace this test creates.

As Istio's TPROXY sidecar: the proxy runs as root with group 1337 (the capture rules exempt
that group's outbound connections) and reports ``INTERCEPTION_MODE=TPROXY`` in its node
metadata, for which the pilot marks ``virtualOutbound`` / ``virtualInbound`` transparent. The
inbound capture is TPROXY (no NAT: the accepted socket's local address is the original
destination), the outbound one stays a REDIRECT (SO_ORIGINAL_DST).
"""

from __future__ import annotations

import subprocess
import uuid

from backend import Backend, port_free_on_all
from lib.native import NativeProxy
from lib.netns import NetNS
from lib.pilot import Pilot
from lib.procs import Proc, free_port, wait_until
from lib.router import CONFIGS, render, wait_acked
from test_pilot_envoy import CLUSTER_IP

APP = """\
apiVersion: v1
kind: Service
metadata: {name: sleep, namespace: default}
spec:
  selector: {app: sleep}
  ports: [{name: http, port: 80, targetPort: {{APP_PORT}}}]
"""


def test_tproxy_outbound_and_inbound_through_the_native_sidecar(require_root, mizzen_bin, tmp_path):
    ns = NetNS().create()
    backends: list[Backend] = []
    pilot = proxy = app = None
    try:
        v1_ip, v2_ip = ns.ip(11), ns.ip(12)
        ns.add_root_ip(v1_ip)
        ns.add_root_ip(v2_ip)
        port = port_free_on_all([v1_ip, v2_ip])
        backends = [Backend("reviews-v1", "v1", v1_ip, port).start(),
                    Backend("reviews-v2", "v2", v2_ip, port).start()]
        app_port = free_port("0.0.0.0")
        values = {"CLUSTER_IP": CLUSTER_IP, "REVIEWS_PORT": port, "REVIEWS_V1_IP": v1_ip,
                  "REVIEWS_V2_IP": v2_ip, "SLEEP_IP": ns.ns_ip}
        pilot = Pilot(mizzen_bin, tmp_path, {
            "reviews.yaml": render(CONFIGS / "sidecar" / "reviews.yaml.tmpl", values),
            "sleep.yaml": APP.replace("{{APP_PORT}}", str(app_port)),
        }, xds_host=ns.root_ip, name="pilot-tproxy").start()

        # The app inside the namespace, on the pod IP.
        app = Proc("sleep-app", ["ip", "netns", "exec", ns.name, str(mizzen_bin), "sample-app",
                                 "--listen-address", ns.ns_ip, "--port", str(app_port), "--name", "sleep"],
                   tmp_path / "sleep-app.log")
        ns.exec([str(mizzen_bin), "iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337",
                 "-m", "TPROXY", "-i", "*", "-b", "*", "-d", "15090,15021,15020"])

        # Root with group 1337, INTERCEPTION_MODE=TPROXY in the node metadata.
        wrapper = tmp_path / "mizzen-tproxy.sh"
        wrapper.write_text(f"#!/bin/sh\nexport ISTIO_META_INTERCEPTION_MODE=TPROXY\n"
                           f"exec setpriv --regid=1337 --clear-groups {mizzen_bin} \"$@\"\n")
        wrapper.chmod(0o755)
        proxy = NativeProxy(wrapper, "sidecar", pilot.xds_address, pod_name="sleep", namespace="default",
                            ip=ns.ns_ip, labels={"app": "sleep"}, workdir=tmp_path, netns=ns.name).start()
        assert wait_acked(pilot, proxy.node_id)["type"] == "sidecar"
        assert proxy.rejected() == {}
        listeners = {dl["name"]: dl["active_state"]["listener"] for c in proxy.config_dump()["configs"]
                     if c["@type"].endswith("ListenersConfigDump") for dl in c.get("dynamic_listeners", [])}
        assert listeners["virtualInbound"]["transparent"] and listeners["virtualOutbound"]["transparent"], listeners

        # Outbound: curl to the ClusterIP as root (group 0) inside the namespace.
        def curl_out():
            cp = ns.exec(["curl", "-sS", "-m", "5", "-D", "-", f"http://{CLUSTER_IP}/"], check=False, timeout=10)
            return cp.stdout if cp.returncode == 0 and " 200" in cp.stdout.split("\r\n", 1)[0] else None
        out = wait_until(curl_out, 15, interval=0.3, what=f"curl http://{CLUSTER_IP}/ from {ns.name}", proc=proxy.proc)
        assert "x-backend: reviews-v" in out.lower(), out

        # Inbound: from the root namespace to the pod IP, TPROXY'd to 15006, then to the app
        # from 127.0.0.6.
        tag = uuid.uuid4().hex
        path = f"/in/{tag}"

        def get_in():
            cp = subprocess.run(["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", f"http://{ns.ns_ip}:{app_port}{path}"],
                                capture_output=True, text=True, timeout=10)
            body, _, code = cp.stdout.rpartition("\n")
            return body if code == "200" else None
        body = wait_until(get_in, 15, interval=0.3, what=f"GET {ns.ns_ip}:{app_port}{path} from the root namespace",
                          proc=proxy.proc)
        assert "sleep" in body, body
        # The proxy served it on the inbound path: its access log names the inbound cluster.
        line = wait_until(lambda: next((ln for ln in proxy.proc.log_text().splitlines()
                                        if f" {path} HTTP/" in ln), None), 5, what="inbound access-log line")
        assert f"inbound|{app_port}||" in line, line
        assert proxy.rejected() == {}
    finally:
        if proxy is not None:
            proxy.stop()
        if app is not None:
            app.stop()
        if pilot is not None:
            pilot.stop()
        for b in backends:
            b.stop()
        ns.delete()
