"""The native Mizzen proxy (``mizzen proxy router|sidecar`` without ``--envoy``): start it, wait
for ``/healthz/ready``, and read its admin port (Envoy-shaped ``/config_dump``, ``/stats``) and
its Prometheus port."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from .envoy import node_id
from .procs import Proc, free_ports, wait_until


class NativeProxy:
    def __init__(self, mizzen_bin: str | Path, kind: str, discovery_address: str, pod_name: str,
                 namespace: str, ip: str, labels: dict[str, str] | None, workdir: Path,
                 extra_args: list[str] | None = None, netns: str | None = None, uid: int | None = None,
                 env: dict[str, str] | None = None):
        assert kind in ("router", "sidecar"), kind
        self.env = dict(env or {})
        self.mizzen_bin = str(mizzen_bin)
        self.kind = kind
        self.discovery_address = discovery_address
        self.pod_name, self.namespace, self.ip = pod_name, namespace, ip
        self.labels = dict(labels or {})
        self.workdir = Path(workdir)
        self.extra_args = list(extra_args or [])
        self.netns, self.uid = netns, uid
        self.admin_port, self.status_port, self.stats_port = free_ports(3)
        self.proc: Proc | None = None
        self.name = f"native-{kind}-{pod_name}"

    @property
    def node_id(self) -> str:
        return node_id(self.kind, self.ip, self.pod_name, self.namespace)

    def argv(self) -> list[str]:
        a = [self.mizzen_bin, "proxy", self.kind,
             "--discovery-address", self.discovery_address,
             "--pod-name", self.pod_name, "--namespace", self.namespace, "--ip", self.ip]
        for k, v in self.labels.items():
            a += ["--label", f"{k}={v}"]
        a += ["--admin-port", str(self.admin_port), "--status-port", str(self.status_port),
              "--stats-port", str(self.stats_port)]
        prefix: list[str] = []
        if self.netns:
            prefix += ["ip", "netns", "exec", self.netns]
        if self.uid is not None:
            prefix += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        return prefix + a + self.extra_args

    def start(self, ready_timeout: float = 30.0, wait_ready: bool = True) -> "NativeProxy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        # Access-log lines (response flags per request id) are debug events of target access_log.
        env.setdefault("RUST_LOG", "info,access_log=debug")
        env.update(self.env)
        self.proc = Proc(self.name, self.argv(), self.workdir / f"{self.name}.log", env=env, cwd=self.workdir)
        if not wait_ready:
            return self
        try:
            wait_until(self.ready, ready_timeout,
                       what=f"{self.name} GET :{self.status_port}/healthz/ready = 200", proc=self.proc)
        except BaseException:
            self.stop()  # the caller never gets this object to stop it
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def ready(self) -> bool:
        """``/healthz/ready`` on the status port answers 200 (first complete config applied)."""
        try:
            return self.get(self.status_port, "/healthz/ready").status_code == 200
        except (OSError, requests.RequestException):
            return False

    def get(self, port: int, path: str, timeout: float = 3.0) -> "_Resp":
        """GET on one of the proxy's own ports (inside its netns when it has one)."""
        url = f"http://127.0.0.1:{port}{path}"
        if not self.netns:
            r = requests.get(url, timeout=timeout)
            return _Resp(r.status_code, r.text)
        cp = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-sS", "-m", str(timeout),
                             "-o", "-", "-w", "\n%{http_code}", url],
                            capture_output=True, text=True, timeout=timeout + 5)
        if cp.returncode != 0:
            raise ConnectionError(f"curl {url} in {self.netns}: rc={cp.returncode} {cp.stderr.strip()}")
        body, _, code = cp.stdout.rpartition("\n")
        return _Resp(int(code), body)

    def admin(self, path: str) -> str:
        r = self.get(self.admin_port, path, timeout=5.0)
        assert r.status_code == 200, f"{self.name} admin {path} -> {r.status_code}: {r.text[:300]}"
        return r.text

    def stats(self) -> dict[str, int]:
        data = json.loads(self.admin("/stats?format=json"))
        return {s["name"]: s["value"] for s in data["stats"]}

    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in self.stats().items() if k.endswith("update_rejected") and v}

    def config_dump(self) -> dict:
        return json.loads(self.admin("/config_dump"))

    def dynamic_names(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = {"clusters": set(), "listeners": set(), "routes": set()}
        for c in self.config_dump()["configs"]:
            t = c["@type"]
            if t.endswith("ClustersConfigDump"):
                names["clusters"] |= {x["cluster"]["name"] for x in c["dynamic_active_clusters"]}
            elif t.endswith("ListenersConfigDump"):
                names["listeners"] |= {x["name"] for x in c["dynamic_listeners"]}
            elif t.endswith("RoutesConfigDump"):
                names["routes"] |= {x["route_config"]["name"] for x in c["dynamic_route_configs"]}
        return names

    def prometheus(self) -> str:
        r = self.get(self.stats_port, "/stats/prometheus")
        assert r.status_code == 200, r.status_code
        return r.text


class _Resp:
    def __init__(self, status_code: int, text: str):
        self.status_code, self.text = status_code, text
