"""`mizzen pilot` on a config directory the test writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from textwrap import dedent

import requests

from .procs import Proc, free_port, wait_until

# Istio/Envoy xDS type URLs, as they appear in /debug/syncz.
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


class Pilot:
    """Starts ``mizzen pilot --config-dir DIR --xds-addr H:P1 --monitoring-addr 127.0.0.1:P2``.

    ``files`` maps file names to YAML text (dedented). ``xds_host`` is where xDS listens
    (127.0.0.1 by default; a veth address for proxies inside a network namespace).
    """

    def __init__(self, mizzen_bin: str | Path, workdir: Path, files: dict[str, str] | None = None,
                 xds_host: str = "127.0.0.1", name: str = "pilot"):
        self.mizzen_bin = str(mizzen_bin)
        self.workdir = Path(workdir)
        self.config_dir = self.workdir / f"{name}-config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.xds_host = xds_host
        self.xds_port = free_port(xds_host)
        self.monitoring_port = free_port("127.0.0.1")
        self.proc: Proc | None = None
        for fname, text in (files or {}).items():
            self.write(fname, text)

    @property
    def xds_address(self) -> str:
        return f"{self.xds_host}:{self.xds_port}"

    @property
    def monitoring_url(self) -> str:
        return f"http://127.0.0.1:{self.monitoring_port}"

    # --- config files --------------------------------------------------------------------
    def path(self, fname: str) -> Path:
        return self.config_dir / fname

    def write(self, fname: str, text: str) -> Path:
        """Write (or rewrite) a config file atomically: a hidden temp file, then rename."""
        dest = self.path(fname)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp"
        tmp.write_text(dedent(text).lstrip("\n"))
        os.replace(tmp, dest)
        return dest

    def delete(self, fname: str) -> None:
        self.path(fname).unlink()

    # --- process ---------------------------------------------------------------------------
    def start(self, ready_timeout: float = 20.0) -> "Pilot":
        argv = [self.mizzen_bin, "pilot",
                "--config-dir", str(self.config_dir),
                "--xds-addr", self.xds_address,
                "--monitoring-addr", f"127.0.0.1:{self.monitoring_port}"]
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = Proc(self.name, argv, self.workdir / f"{self.name}.log", env=env)
        wait_until(lambda: self._get("/ready").status_code == 200, ready_timeout,
                   what=f"{self.name} GET /ready = 200 on {self.monitoring_url}", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    # --- debug API -------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 3.0) -> requests.Response:
        return requests.get(self.monitoring_url + path, timeout=timeout)

    def _get_json(self, path: str):
        r = self._get(path)
        assert r.status_code == 200, f"GET {path} -> {r.status_code}: {r.text[:500]}"
        try:
            return r.json()
        except ValueError as e:
            raise AssertionError(f"GET {path} is not JSON: {r.text[:500]}") from e

    def syncz(self) -> list[dict]:
        """``GET /debug/syncz``: one object per connected proxy."""
        data = self._get_json("/debug/syncz")
        assert isinstance(data, list), f"/debug/syncz must be a JSON array, got {type(data).__name__}"
        return data

    def syncz_for(self, node_id: str) -> dict | None:
        for p in self.syncz():
            if p.get("id") == node_id:
                return p
        return None

    def configz(self) -> dict:
        """``GET /debug/configz``: ``{"resources": [...], "errors": [...]}``."""
        data = self._get_json("/debug/configz")
        assert isinstance(data, dict) and "resources" in data and "errors" in data, \
            f"/debug/configz must be an object with resources and errors: {str(data)[:500]}"
        return data


def validate(mizzen_bin: str | Path, *paths: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``mizzen validate PATH...`` (bounded)."""
    return subprocess.run([str(mizzen_bin), "validate", *map(str, paths)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)[:4000]
