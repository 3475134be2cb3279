"""Processes started by a test: logs to files, ended by PID (its own process group), bounded waits."""

from __future__ import annotations

import os
import signal
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

# Every process started through Proc, in start order; conftest prints their log tails on failure.
REGISTRY: list["Proc"] = []


class TimeoutFailure(AssertionError):
    pass


def wait_until(fn: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition",
               proc: "Proc | None" = None) -> T:
    """Call fn until it returns a truthy value (returned) or timeout seconds pass (AssertionError
    with the last value or exception). If proc dies meanwhile, fail at once with its log."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            v = fn()
            if v:
                return v
            last = v
        except Exception as e:  # noqa: BLE001 - reported below
            last = e
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{proc.name} exited with code {proc.returncode()} while waiting for {what}\n"
                f"--- {proc.log_path} (tail) ---\n{proc.log_tail()}")
        if time.monotonic() >= deadline:
            raise TimeoutFailure(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# Ports handed out in this test run. A port is only free until someone binds it, so:
# - never hand the same number out twice in one run (a fixture picking a gateway port and a
#   proxy then picking its admin ports got the same number once in CI);
# - pick below the kernel's ephemeral range: a port taken from inside it can become the local
#   port of some outgoing connection before its server binds it (seen in CI: "binding the
#   status port 0.0.0.0:37361: Address already in use").
_HANDED_OUT: set[int] = set()
_RNG = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports that nothing uses on any address right now (checked by binding
    0.0.0.0, which also covers ``host``), below the ephemeral range, none handed out before in
    this run."""
    low, high = 10000, max(_ephemeral_low(), 10001)
    ports: list[int] = []
    for _ in range(n * 200):  # bounded
        if len(ports) == n:
            break
        port = _RNG.randrange(low, high)
        if port in _HANDED_OUT or port in ports:
            continue
        ok = True
        for addr in {"0.0.0.0", host}:
            with socket.socket() as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    ok = False
                    break
        if ok:
            ports.append(port)
    if len(ports) != n:
        raise RuntimeError(f"could not find {n} unused ports below {high} on {host}")
    _HANDED_OUT.update(ports)
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing uses right now, below the ephemeral range, not handed out before."""
    return free_ports(1, host)[0]


class Proc:
    """A subprocess in its own process group, stdout+stderr to log_path."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None,
                 cwd: str | Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
        self.pid = self.popen.pid
        REGISTRY.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self):
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group we created (pgid == our child's PID), then SIGKILL."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children (envoy under the agent) even after the leader exited.
        self._signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            if self.popen.poll() is None:
                try:
                    self.popen.send_signal(sig)
                except ProcessLookupError:
                    pass

    def __repr__(self):
        return f"Proc({self.name!r}, pid={self.pid})"


def run(argv: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a short command, bounded, capturing text output; on failure raise with its output."""
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise AssertionError(f"command failed ({cp.returncode}): {' '.join(map(str, argv))}\n"
                             f"stdout:\n{cp.stdout}\nstderr:\n{cp.stderr}")
    return cp
