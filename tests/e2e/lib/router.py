"""The router (ingress gateway) mesh shared by the routing suite and the proxy-specific tests:
four backends (web v1/v2, api v1/v2), two TCP echo servers, a pilot on ``configs/router`` and one
gateway proxy, either Envoy under the agent or the native Mizzen proxy (same CLI, same node id,
same config, same expected behaviour).

``start_proxy`` is the small common interface over lib/envoy.py and lib/native.py: both objects
have ``start()``, ``stop()``, ``node_id``, ``proc``, ``stats()``, ``rejected()``,
``dynamic_names()`` and ``config_dump()``.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path

from backend import Backend, port_free_on_all

from .envoy import EnvoyProxy, resolve_envoy_elf
from .native import NativeProxy
from .pilot import CDS, EDS, LDS, RDS, Pilot, dump_json
from .procs import Proc, free_port, wait_until
from .traffic import Gateway

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROUTER_FILES = ["gateway", "web", "api", "vs-split", "vs-match", "vs-rewrite", "vs-redirect",
                "vs-fault", "vs-timeout", "vs-retry", "vs-edit", "tcp-echo", "vs-mirror-cors",
                "vs-hash", "vs-breaker"]
ECHO_V1_IP, ECHO_V2_IP = "127.0.0.15", "127.0.0.16"
ROUTER_IP = "127.0.0.100"  # the gateway's identity (node id); nothing binds it
WEB_V1_IP, WEB_V2_IP, API_V1_IP, API_V2_IP = "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"
WEB = "web.default.svc.cluster.local"
API = "api.internal.example"
PROXY_KINDS = ("envoy", "native")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ENVOY_FLAGS = re.compile(r'"[A-Z]+ \S+ \S+" \d+ (\S+) ')


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


def start_proxy(proxy_kind: str, mizzen_bin, envoy_bin, role: str, discovery_address: str, *, pod_name: str,
                namespace: str, ip: str, labels: dict, workdir: Path, extra_args: list[str] | None = None,
                netns: str | None = None, uid: int | None = None, ready_timeout: float = 30.0,
                envoy_args: list[str] | None = None, env: dict[str, str] | None = None):
    """``mizzen proxy ROLE`` with Envoy (``--envoy``) or the native proxy, started and ready.
    ``envoy_args`` are extra Envoy command-line flags (Envoy only); ``env`` is added to the
    proxy's environment (e.g. the injector's ``PROXY_CONFIG``)."""
    if proxy_kind == "envoy":
        envoy = resolve_envoy_elf(str(envoy_bin))
        if envoy_args:
            # The agent has no pass-through for Envoy flags: a wrapper adds them.
            wrapper = Path(workdir) / f"envoy-{pod_name}.sh"
            wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(envoy)} "$@" {shlex.join(envoy_args)}\n')
            wrapper.chmod(0o755)
            envoy = str(wrapper)
        p = EnvoyProxy(mizzen_bin, envoy, role, discovery_address,
                       pod_name=pod_name, namespace=namespace, ip=ip, labels=labels, workdir=workdir,
                       netns=netns, uid=uid, extra_args=extra_args, env=env)
    elif proxy_kind == "native":
        p = NativeProxy(mizzen_bin, role, discovery_address, pod_name=pod_name, namespace=namespace, ip=ip,
                        labels=labels, workdir=workdir, extra_args=extra_args, netns=netns, uid=uid, env=env)
    else:
        raise ValueError(f"unknown proxy kind {proxy_kind!r}: expected one of {PROXY_KINDS}")
    return p.start(ready_timeout=ready_timeout)


class RouterMesh:
    def __init__(self, proxy_kind: str, xds_mode: str, pilot: Pilot, proxy, gw: Gateway, gateway_port: int,
                 tcp_gateway_port: int, backends: dict[str, Backend], values: dict):
        self.proxy_kind, self.xds_mode = proxy_kind, xds_mode
        self.pilot, self.proxy, self.gw, self.gateway_port = pilot, proxy, gw, gateway_port
        self.tcp_gateway_port = tcp_gateway_port
        self.b = backends
        self.values = values

    def render(self, name: str, **extra) -> str:
        return render(CONFIGS / "router" / f"{name}.yaml.tmpl", {**self.values, **extra})

    def response_flags(self, paths: list[str], timeout: float = 15.0) -> dict[str, str]:
        """Envoy's response flags of each request, by its (unique) path, from the proxy's
        access log: the line in the pilot's format (``"GET /p HTTP/1.1" 418 FI ...``), which
        Envoy writes (relayed by the agent) and the native proxy writes alike. A gateway
        regenerates an outside client's x-request-id, so the path is the key. Envoy writes its
        access log in batches, hence the bounded wait."""
        def scan():
            found = {}
            for line in ANSI.sub("", self.proxy.proc.log_text()).splitlines():
                for path in paths:
                    # Both proxies write the pilot's access-log format (Envoy's text format).
                    if f" {path} HTTP/" in line:
                        m = ENVOY_FLAGS.search(line)
                    else:
                        continue
                    if m:
                        found[path] = m.group(1)
            return found if set(found) == set(paths) else None
        return wait_until(scan, timeout, interval=0.2, what=f"access-log lines for {paths}",
                          proc=self.proxy.proc)

    def assert_no_rejections(self) -> None:
        """No xDS update rejected by the proxy, and (so the check is not vacuous) CDS and LDS
        accepted at least one."""
        if isinstance(self.proxy, EnvoyProxy):
            self.proxy.assert_no_rejected_updates()
        else:
            stats = self.proxy.stats()
            for name in ("cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected"):
                assert name in stats, f"{self.proxy.name}: no stat {name}"
            assert self.proxy.rejected() == {}


@contextlib.contextmanager
def router_mesh(proxy_kind: str, xds_mode: str, mizzen_bin, envoy_bin, workdir: Path, extra_files=None):
    """Backends, TCP echo servers, pilot and gateway proxy; everything stopped on exit."""
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
        for eip, version in ((ECHO_V1_IP, "v1"), (ECHO_V2_IP, "v2")):
            echo_procs.append(Proc(f"tcp-echo-{version}", [str(mizzen_bin), "sample-app", "--listen-address", eip,
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
        files.update(extra_files or {})
        pilot = Pilot(mizzen_bin, workdir, files, name=f"pilot-{proxy_kind}-{xds_mode}").start()
        proxy = start_proxy(proxy_kind, mizzen_bin, envoy_bin, "router", pilot.xds_address,
                            pod_name="ingress-gw-0", namespace="istio-system", ip=ROUTER_IP,
                            labels={"istio": "ingressgateway", "app": "istio-ingressgateway"},
                            workdir=workdir, extra_args=["--xds-mode", xds_mode],
                            # Access-log lines within a fraction of a second (default 10 s).
                            envoy_args=["--file-flush-interval-msec", "200"])
        gw = Gateway(gateway_port)
        # Ready means the proxy has its listeners; give routes a bounded moment to arrive too.
        wait_until(lambda: gw.get("split.example.com", "/", timeout=2).headers.get("x-backend")
                   in ("web-v1", "web-v2"), 15, what=f"split.example.com routed via 127.0.0.1:{gateway_port}",
                   proc=proxy.proc)
        yield RouterMesh(proxy_kind, xds_mode, pilot, proxy, gw, gateway_port, tcp_gateway_port, backends, values)
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
