"""HTTP clients for the tests: single requests through a gateway port, and a fixed-rate load."""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from dataclasses import dataclass, field

import requests


class Gateway:
    """Requests to ``http://127.0.0.1:PORT`` with a chosen Host header (one keep-alive session)."""

    def __init__(self, port: int, address: str = "127.0.0.1"):
        self.port = port
        self.address = address
        self.session = requests.Session()

    def get(self, host: str, path: str = "/", headers: dict | None = None, timeout: float = 10.0,
            allow_redirects: bool = False) -> requests.Response:
        h = {"Host": host}
        h.update(headers or {})
        return self.session.get(f"http://{self.address}:{self.port}{path}", headers=h, timeout=timeout,
                                allow_redirects=allow_redirects)

    def backend(self, host: str, path: str = "/", headers: dict | None = None) -> str | None:
        """Which backend answered (its x-backend header), or None."""
        return self.get(host, path, headers).headers.get("x-backend")

    def close(self):
        self.session.close()


def echo(resp) -> dict:
    """The backend's JSON echo of a response; fails with the raw body otherwise."""
    try:
        return resp.json()
    except ValueError as e:
        raise AssertionError(f"not a backend echo: {resp.status_code} {resp.text[:300]!r}") from e


@dataclass
class Result:
    seq: int
    scheduled: float          # monotonic time it was due
    start: float
    end: float
    status: int | None
    backend: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300


@dataclass
class LoadRun:
    results: list[Result] = field(default_factory=list)
    t0: float = 0.0

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]


def constant_load(port: int, host: str, path: str, rps: float, duration: float, workers: int = 16,
                  timeout: float = 5.0, address: str = "127.0.0.1",
                  during=None, during_at: float | None = None) -> LoadRun:
    """Send GET requests at a fixed schedule (one every 1/rps seconds) for ``duration`` seconds
    from ``workers`` threads, each with its own keep-alive connection. If ``during`` is given it
    is called (in the caller's thread) at ``during_at`` seconds into the run. Bounded: returns
    after at most duration + timeout + a few seconds."""
    jobs: queue.Queue = queue.Queue()
    run = LoadRun()
    lock = threading.Lock()

    def worker():
        conn = None
        while True:
            job = jobs.get()
            if job is None:
                break
            seq, due = job
            start = time.monotonic()
            status = backend = err = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(address, port, timeout=timeout)
                conn.request("GET", path, headers={"Host": host})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                backend = resp.getheader("x-backend")
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is a result
                err = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            r = Result(seq, due, start, time.monotonic(), status, backend, err)
            with lock:
                run.results.append(r)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True, name=f"load-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    n = int(rps * duration)
    interval = 1.0 / rps
    run.t0 = time.monotonic()
    called = during is None
    for i in range(n):
        due = run.t0 + i * interval
        if not called and due - run.t0 >= (during_at or 0.0):
            during()
            called = True
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        jobs.put((i, due))
    if not called:
        during()
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join(timeout=timeout + 5)
    run.results.sort(key=lambda r: r.seq)
    return run


def summarize(results: list[Result], limit: int = 10) -> str:
    return json.dumps([r.__dict__ for r in results[:limit]], default=str)[:3000]
