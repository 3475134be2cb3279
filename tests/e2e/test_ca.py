"""Workload identity end to end: the pilot's CA, the CSR API on the TLS port, and a real
Envoy getting its certificate from the agent over SDS.

`mizzen pilot --ca-dir DIR --secure-xds-addr H:P` creates a root, issues tokens
(`mizzen pilot token`) and serves the CSR API and ADS over TLS. `mizzen proxy router --envoy
... --token-file ... --root-cert ...` generates a key, gets a certificate, serves it to Envoy as
Istio's SDS secrets `default` / `ROOTCA`, and Envoy's own ADS connection to the pilot runs over
TLS with that certificate. What Envoy reports on its admin API is the evidence.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from lib.envoy import EnvoyProxy
from lib.pilot import Pilot
from lib.procs import Proc, free_port, wait_until

SA = "ingress-sa"
NS = "istio-system"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"


class SecurePilot(Pilot):
    """A pilot with the CA on: ``--ca-dir`` and a loopback TLS port."""

    def __init__(self, mizzen_bin, workdir: Path, extra: list[str] | None = None):
        super().__init__(mizzen_bin, workdir)
        self.ca_dir = Path(workdir) / "ca"
        self.secure_port = free_port("127.0.0.1")
        self.extra = list(extra or [])

    @property
    def secure_address(self) -> str:
        return f"127.0.0.1:{self.secure_port}"

    def start(self, ready_timeout: float = 20.0) -> "SecurePilot":
        argv = [self.mizzen_bin, "pilot",
                "--config-dir", str(self.config_dir),
                "--xds-addr", self.xds_address,
                "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}",
                "--ca-dir", str(self.ca_dir),
                "--secure-xds-addr", self.secure_address, *self.extra]
        env = dict(os.environ, NO_COLOR="1")
        self.proc = Proc(self.name, argv, self.workdir / f"{self.name}.log", env=env)
        wait_until(lambda: self._get("/ready").status_code == 200, ready_timeout,
                   what=f"{self.name} GET /ready = 200", proc=self.proc)
        wait_until(lambda: (self.ca_dir / "root-cert.pem").exists(), 10, what="root-cert.pem written",
                   proc=self.proc)
        return self

    def token(self, ns: str, sa: str, path: Path, ttl: str = "1h") -> Path:
        out = subprocess.run([self.mizzen_bin, "pilot", "token", "--ca-dir", str(self.ca_dir),
                              "--namespace", ns, "--service-account", sa, "--ttl", ttl],
                             capture_output=True, text=True, timeout=30, check=True,
                             stdin=subprocess.DEVNULL)
        path.write_text(out.stdout)
        return path


def start_proxy(mizzen_bin, envoy_bin, pilot: SecurePilot, workdir: Path, token: Path,
                extra: list[str] | None = None, ready: bool = True) -> EnvoyProxy:
    args = ["--service-account", SA,
            "--ca-address", pilot.secure_address,
            "--token-file", str(token),
            "--root-cert", str(pilot.ca_dir / "root-cert.pem"),
            "--config-path", str(workdir / "agent"),
            *(extra or [])]
    # Discovery over the TLS port: Envoy can only get config if its SDS certificate and the
    # pilot's serving certificate both check out.
    p = EnvoyProxy(mizzen_bin, envoy_bin, "router", pilot.secure_address, "gw-1", NS, "127.0.0.1",
                   {"istio": "ingressgateway"}, workdir, extra_args=args)
    if ready:
        return p.start()
    workdir.mkdir(parents=True, exist_ok=True)
    p.proc = Proc(p.name, p.argv(), workdir / f"{p.name}.log", env=dict(os.environ, NO_COLOR="1"))
    return p


def leaf_cert(proxy: EnvoyProxy) -> dict | None:
    """The leaf of the certificate Envoy loaded from SDS, as /certs reports it."""
    certs = json.loads(proxy.admin("/certs")).get("certificates", [])
    for c in certs:
        for leaf in c.get("cert_chain", []):
            return leaf
    return None


def active_secrets(proxy: EnvoyProxy) -> dict[str, str]:
    dump = json.loads(proxy.admin("/config_dump?resource=dynamic_active_secrets"))
    return {c["name"]: c.get("version_info", "") for c in dump.get("configs", [])}


def envoy_pids(agent_pid: int) -> list[int]:
    """Envoy processes under the agent (its direct children)."""
    pids: list[int] = []
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        try:
            pids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(pids))


def test_envoy_gets_workload_cert_over_sds_and_xds_over_tls(mizzen_bin, envoy_bin, workdir):
    pilot = SecurePilot(mizzen_bin, workdir).start()
    proxy = None
    try:
        token = pilot.token(NS, SA, workdir / "token")
        proxy = start_proxy(mizzen_bin, envoy_bin, pilot, workdir, token)
        # Ready = Envoy LIVE and CDS/LDS accepted, which here came over the TLS port.
        wait_until(lambda: leaf_cert(proxy) is not None, 15, what="Envoy reports an SDS certificate",
                   proc=proxy.proc)
        leaf = leaf_cert(proxy)
        assert [s.get("uri") for s in leaf["subject_alt_names"]] == [SPIFFE], leaf
        expires = datetime.fromisoformat(leaf["expiration_time"].replace("Z", "+00:00"))
        hours = (expires - datetime.now(timezone.utc)).total_seconds() / 3600
        assert 23.5 < hours <= 24.1, f"workload cert should live ~24h, expires in {hours:.2f}h"

        secrets = active_secrets(proxy)
        assert set(secrets) == {"default", "ROOTCA"}, secrets

        stats = proxy.stats()
        assert stats.get("cluster.xds-grpc.ssl.handshake", 0) >= 1, \
            "Envoy's connection to the pilot must be TLS"
        assert stats.get("cluster_manager.cds.update_success", 0) >= 1

        # The CA's root is what Envoy trusts (ROOTCA): its serial matches root-cert.pem's.
        root_serial = subprocess.run(
            ["openssl", "x509", "-noout", "-serial", "-in", str(pilot.ca_dir / "root-cert.pem")],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip().split("=")[1]
        certs = json.loads(proxy.admin("/certs"))["certificates"]
        ca_serials = {c["serial_number"].lower() for x in certs for c in x.get("ca_cert", [])}
        assert root_serial.lower() in ca_serials, (root_serial, ca_serials)
    finally:
        if proxy:
            proxy.stop()
        pilot.stop()


def test_rotation_reaches_envoy_without_restart(mizzen_bin, envoy_bin, workdir):
    pilot = SecurePilot(mizzen_bin, workdir, extra=["--workload-cert-ttl", "20s"]).start()
    proxy = None
    try:
        token = pilot.token(NS, SA, workdir / "token")
        proxy = start_proxy(mizzen_bin, envoy_bin, pilot, workdir, token)
        wait_until(lambda: leaf_cert(proxy) is not None, 15, what="first SDS certificate",
                   proc=proxy.proc)
        first = leaf_cert(proxy)
        expires = datetime.fromisoformat(first["expiration_time"].replace("Z", "+00:00"))
        assert (expires - datetime.now(timezone.utc)).total_seconds() <= 21, first
        pids = envoy_pids(proxy.proc.pid)
        assert len(pids) == 1, f"expected one Envoy under the agent, got {pids}"
        uptime0 = proxy.stats()["server.uptime"]

        # 80% of 20s: a new certificate within ~16s; allow 30.
        wait_until(lambda: leaf_cert(proxy)["serial_number"] != first["serial_number"], 30,
                   interval=0.5, what="a rotated certificate at Envoy", proc=proxy.proc)
        second = leaf_cert(proxy)
        assert [s.get("uri") for s in second["subject_alt_names"]] == [SPIFFE]
        stats = proxy.stats()
        assert envoy_pids(proxy.proc.pid) == pids, "Envoy was restarted for the rotation"
        assert stats["server.hot_restart_epoch"] == 0
        assert stats["server.uptime"] > uptime0
        assert proxy.http_get(proxy.status_port, "/healthz/ready")[0] == 200
        assert set(active_secrets(proxy)) == {"default", "ROOTCA"}
    finally:
        if proxy:
            proxy.stop()
        pilot.stop()


def test_token_for_another_identity_gets_no_certificate(mizzen_bin, envoy_bin, workdir):
    pilot = SecurePilot(mizzen_bin, workdir).start()
    proxy = None
    try:
        # The agent is ingress-sa but holds a token for another service account: the CSR
        # names ingress-sa, the token says other-sa, so the CA refuses.
        token = pilot.token(NS, "other-sa", workdir / "token")
        proxy = start_proxy(mizzen_bin, envoy_bin, pilot, workdir, token, ready=False)
        wait_until(lambda: "PermissionDenied" in proxy.proc.log_text(), 20,
                   what="the agent logs the CA's PERMISSION_DENIED", proc=proxy.proc)
        assert "workload certificate issued" not in proxy.proc.log_text()
        assert re.search(r"CSR refused", pilot.proc.log_text())
    finally:
        if proxy:
            proxy.stop()
        pilot.stop()
