"""A network namespace joined to the root namespace by a veth pair, deleted on teardown."""

from __future__ import annotations

import os
import random
import subprocess

from .procs import run


def _used_10_233() -> set[int]:
    out = run(["ip", "-4", "-o", "addr", "show"]).stdout + run(["ip", "-4", "route", "show", "table", "all"]).stdout
    used = set()
    for tok in out.split():
        if tok.startswith("10.233."):
            try:
                used.add(int(tok.split(".")[2]))
            except (IndexError, ValueError):
                pass
    return used


class NetNS:
    """``ip netns add NAME``; veth ``ROOT_IF`` (10.233.X.1/24, root side) <-> ``NS_IF``
    (10.233.X.2/24, inside, default route via .1); loopback up. The 10.233.X.0/24 is used only
    by this pair. ``extra_root_ips`` adds /32 addresses on the root side (e.g. backends' pod IPs)."""

    def __init__(self, tag: str = "mzt"):
        suffix = f"{os.getpid() % 100000}{random.randint(0, 999):03d}"
        self.name = f"{tag}-{suffix}"
        self.root_if = f"mzr{suffix}"[:15]
        self.ns_if = f"mzn{suffix}"[:15]
        used = _used_10_233()
        free = [x for x in range(10, 250) if x not in used]
        if not free:
            raise RuntimeError("no free 10.233.X.0/24")
        self.x = random.choice(free)
        self.root_ip = f"10.233.{self.x}.1"
        self.ns_ip = f"10.233.{self.x}.2"
        self.created = False
        self.extra_root_ips: list[str] = []

    def ip(self, host: int) -> str:
        return f"10.233.{self.x}.{host}"

    def create(self) -> "NetNS":
        run(["ip", "netns", "add", self.name])
        self.created = True
        run(["ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if])
        run(["ip", "link", "set", self.ns_if, "netns", self.name])
        run(["ip", "addr", "add", f"{self.root_ip}/24", "dev", self.root_if])
        run(["ip", "link", "set", self.root_if, "up"])
        self.exec(["ip", "link", "set", "lo", "up"])
        self.exec(["ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if])
        self.exec(["ip", "link", "set", self.ns_if, "up"])
        self.exec(["ip", "route", "add", "default", "via", self.root_ip])
        return self

    def add_root_ip(self, ip: str) -> None:
        run(["ip", "addr", "add", f"{ip}/32", "dev", self.root_if])
        self.extra_root_ips.append(ip)

    def exec(self, argv: list[str], timeout: float = 30, check: bool = True,
             **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *argv], timeout=timeout, check=check, **kw)

    def pids(self) -> list[int]:
        cp = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in cp.stdout.split() if p.isdigit()]

    def delete(self) -> None:
        if not self.created:
            return
        # Only processes inside the namespace this object created: end them by PID.
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        run(["ip", "link", "del", self.root_if], check=False)
        run(["ip", "netns", "del", self.name], check=False)
        self.created = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.delete()
