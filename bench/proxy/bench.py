#!/usr/bin/env python3
"""Data-plane benchmark: the Mizzen proxy against Envoy 1.40 and nginx, in the same run.

Started by bench/proxy/run.sh (which installs the tools, builds, and enters a private network
namespace). Everything listens on 127.0.0.1. Both proxies are real `mizzen proxy` processes
configured by one `mizzen pilot` over xDS (Envoy through `--envoy`, Mizzen natively); nginx
is configured by hand. One nginx serves the 1 KiB answer as the backend.

CPU placement, as in the bar of issue 7: the proxy under test and the backend share core 0
(`taskset -c 0`; Envoy and Mizzen with one worker, nginx with one worker process); the load
generator (oha, open loop, fixed rate, latency correction) runs on core 1 with the pilot.

Figures per system and run: p50/p90/p99 at each fixed rate and the latency added over a direct
connection, CPU milliseconds per 1000 requests (the proxy's own /proc utime+stime; the backend
is not counted), maximum throughput (oha at full speed, 64 connections), RSS idle, peak RSS
(VmHWM) after the load, and RSS of a sidecar holding the config of 1000 services.

Runs are interleaved (run 1: every system, run 2: every system ...) so slow drifts of a shared
machine hit every system alike; the report gives medians and the spread (max-min)/median.
It only signals processes it started, by PID, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = "x" * 1023 + "\n"  # 1 KiB response body
SYSTEMS = ("direct", "nginx", "envoy", "mizzen")


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0, headers=None):
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception:
        return None, ""


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cpu_split(pid):
    """(user, kernel) CPU seconds of the process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return (0.0, 0.0)
    return (int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK)  # utime, stime


def cpu_secs(pid):
    return sum(cpu_split(pid))


def mem(pid):
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v.split()[0]) / 1024.0  # MiB
    except OSError:
        pass
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A process this benchmark started; measured PIDs may be its children (Envoy under the
    agent, nginx workers under the master)."""

    def __init__(self, name, argv, workdir, cpu=None, env=None):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.logf = open(self.log_path, "w")
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + argv
        self.p = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                  env=env or dict(os.environ, NO_COLOR="1"), start_new_session=True)
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def measured_pids(self):
        return [self.pid]

    def cpu(self):
        return sum(cpu_secs(p) for p in self.measured_pids())

    def cpu_kernel(self):
        return sum(cpu_split(p)[1] for p in self.measured_pids())

    def mem(self):
        ms = [mem(p) for p in self.measured_pids()]
        return {k: sum(m[k] for m in ms) for k in ("VmRSS", "VmHWM")}

    def stop(self, timeout=10):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM; SIGKILL")
                self.p.kill()
                self.p.wait(timeout=timeout)
        self.logf.close()


class EnvoyUnderAgent(Proc):
    def measured_pids(self):
        # The agent (pid) supervises Envoy; the figures are Envoy's own, like the bar's.
        kids = [k for k in children(self.pid) if os.path.basename(os.readlink(f"/proc/{k}/exe")) == "envoy"] \
            if self.alive() else []
        return kids or [self.pid]

    def agent_mem(self):
        return mem(self.pid)


class Nginx(Proc):
    def measured_pids(self):
        return [self.pid] + children(self.pid)  # master + workers


# ------------------------------------------------------------------------------------- setup
def nginx_conf(workdir, name, body_port, h2_port=None, upstream=None, access_log=False):
    """worker_processes 1: one core, like the proxies' single worker. `access_log`: the proxying
    nginx writes a line per request to a file, as the meshes' proxies then do to stdout."""
    d = os.path.join(workdir, name)
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    if upstream is None:
        location = f"default_type text/plain; return 200 '{BODY}';"
    else:
        location = ("proxy_pass http://be; proxy_http_version 1.1; "
                    "proxy_set_header Connection \"\"; proxy_buffering on;")
    ups = "" if upstream is None else f"upstream be {{ server 127.0.0.1:{upstream}; keepalive 128; keepalive_requests 1000000; }}"
    h2 = "" if h2_port is None else f"listen 127.0.0.1:{h2_port} http2;"
    alog = f"access_log {d}/access.log;" if access_log else "access_log off;"
    conf = f"""
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  {alog}
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  keepalive_requests 1000000; keepalive_timeout 300s;
  {ups}
  server {{
    listen 127.0.0.1:{body_port};
    {h2}
    location / {{ {location} }}
  }}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def mesh_config(dirpath, backend_port, envoy_port, mizzen_port):
    os.makedirs(dirpath, exist_ok=True)
    gateways = ""
    for system, port in (("envoy", envoy_port), ("mizzen", mizzen_port)):
        gateways += f"""---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-{system}, namespace: istio-system}}
spec:
  selector: {{istio: bench-{system}}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ["*"]
"""
    with open(os.path.join(dirpath, "bench.yaml"), "w") as f:
        f.write(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: bench}}
spec:
  hosts: [backend.bench.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP, targetPort: {backend_port}}}]
  endpoints: [{{address: 127.0.0.1}}]
{gateways}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench, namespace: bench}}
spec:
  hosts: ["*"]
  gateways: [istio-system/bench-envoy, istio-system/bench-mizzen]
  http:
  - route:
    - destination: {{host: backend.bench.local, port: {{number: 8080}}}}
""")


class Pilot(Proc):
    def __init__(self, mizzen, config_dir, workdir, name="pilot", extra=()):
        self.xds, self.mon = free_port(), free_port()
        super().__init__(name, [mizzen, "pilot", "--config-dir", config_dir,
                                "--xds-addr", f"127.0.0.1:{self.xds}",
                                "--monitoring-addr", f"127.0.0.1:{self.mon}", *extra],
                         workdir, cpu=1)
        wait_for(lambda: self.alive() and http_get(f"http://127.0.0.1:{self.mon}/ready")[0] == 200,
                 120, f"{name} /ready (log {self.log_path})")


def start_proxy(args, system, kind, pilot, workdir, labels, pod, namespace, ip, name=None):
    admin, status, stats = free_port(), free_port(), free_port()
    argv = [args.mizzen, "proxy", kind, "--discovery-address", f"127.0.0.1:{pilot.xds}",
            "--pod-name", pod, "--namespace", namespace, "--ip", ip,
            "--admin-port", str(admin), "--status-port", str(status), "--stats-port", str(stats),
            "--concurrency", "1"]
    for k, v in labels.items():
        argv += ["--label", f"{k}={v}"]
    if system == "envoy":
        argv += ["--envoy", args.envoy]
    cls = EnvoyUnderAgent if system == "envoy" else Proc
    p = cls(name or f"{system}-{kind}", argv, workdir, cpu=0,
            env=dict(os.environ, NO_COLOR="1", RUST_LOG="warn"))
    p.admin, p.status = admin, status
    wait_for(lambda: p.alive() and http_get(f"http://127.0.0.1:{status}/healthz/ready")[0] == 200,
             120, f"{p.name} ready (log {p.log_path})")
    return p


def pilot_extra(args):
    """Access logs off for every proxy (Istio's default profile: meshConfig.accessLogFile ""),
    or, with --access-logs, a line per request to each proxy's stdout (the demo profile's
    /dev/stdout, the pilot's default; stdout is the proxy's log file under the workdir)."""
    if getattr(args, "access_logs", False):  # count.py passes its own Namespace
        return ["--access-log-file", "/dev/stdout"]
    help_text = subprocess.run([args.mizzen, "pilot", "--help"], capture_output=True, text=True).stdout
    if "--access-log-file" in help_text:
        return ["--access-log-file", ""]
    log("this pilot has no --access-log-file: Envoy writes an access log line per request")
    return []


# ------------------------------------------------------------------------------------- load
def oha(args, url, rate, duration, http2=False):
    # -w: requests in flight at the deadline complete instead of counting as errors.
    argv = ["taskset", "-c", "1", args.oha, "--no-tui", "--output-format", "json", "-w",
            "-z", f"{duration}s", "-c", str(args.conns)]
    if rate:
        argv += ["-q", str(rate), "--latency-correction"]
    if http2:
        argv += ["--http2", "-p", "1"]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_oha(json.loads(out.stdout))


def parse_oha(j):
    codes = j.get("statusCodeDistribution", {})
    ok = int(codes.get("200", 0))
    total = sum(int(v) for v in codes.values())
    errors = sum(int(v) for v in j.get("errorDistribution", {}).values())
    p = j["latencyPercentiles"]
    return {
        "rps": j["summary"]["requestsPerSec"],
        "ok": ok, "non_200": total - ok, "errors": errors,
        "p50_us": (p.get("p50") or 0) * 1e6, "p90_us": (p.get("p90") or 0) * 1e6,
        "p99_us": (p.get("p99") or 0) * 1e6,
    }


def measure(args, system, proc, url, rate, duration, http2=False):
    c0 = proc.cpu() if proc else 0.0
    k0 = proc.cpu_kernel() if proc else 0.0
    r = oha(args, url, rate, duration, http2)
    c1 = proc.cpu() if proc else 0.0
    k1 = proc.cpu_kernel() if proc else 0.0
    r["cpu_ms"] = (c1 - c0) * 1000
    r["cpu_ms_per_1000"] = r["cpu_ms"] / max(r["ok"], 1) * 1000 if proc else None
    # The kernel's share (socket reads and writes, wake-ups): what no user-space saving removes.
    r["cpu_kernel_ms_per_1000"] = (k1 - k0) * 1e6 / max(r["ok"], 1) if proc else None
    r["load"] = loadavg()
    log(f"{system:7} {'h2' if http2 else 'h1'} rate={rate or 'max':>5}: {r['rps']:8.0f} rps  "
        f"p50={r['p50_us']:7.0f}us p90={r['p90_us']:7.0f}us p99={r['p99_us']:7.0f}us  "
        f"cpu/1000={r['cpu_ms_per_1000'] or 0:6.1f}ms  ok={r['ok']} bad={r['non_200'] + r['errors']}")
    return r


# ------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mizzen", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--oha", required=True)
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--no-http2", action="store_true")
    ap.add_argument("--access-logs", action="store_true",
                    help="one-hop proxies write an access log line per request (Istio's demo profile); "
                         "default off (Istio's default profile)")
    ap.add_argument("--two-hop", default="plain",
                    help="two-hop sidecar path through `mizzen local`: plain, mtls, plain,mtls or none")
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=("single", "two-hop", "all"), default="all",
                    help="single: the one-hop figures (run.sh runs it in a private network namespace); "
                         "two-hop: the sidecar path through `mizzen local` (host namespace), merged into --out")
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",") if x]

    workdir = tempfile.mkdtemp(prefix="mizzen-bench-proxy-")
    log(f"workdir {workdir}")
    if args.phase == "two-hop":
        with open(args.out) as f:
            res = json.load(f)
        for mode in [m for m in args.two_hop.split(",") if m in ("plain", "mtls")]:
            res[f"two_hop_{mode}"] = two_hop(args, workdir, rates, mode == "mtls")
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(report(res))
        shutil.rmtree(workdir, ignore_errors=True)
        return
    procs = []
    res = {"machine": machine(), "args": vars(args), "runs": [], "http2": [], "rss": {}}
    try:
        bport, bport_h2 = free_port(), free_port()
        nport, nport_h2 = free_port(), free_port()
        eport, mport = free_port(), free_port()
        backend = Nginx("backend", [args.nginx, "-c", nginx_conf(workdir, "backend", bport, bport_h2)],
                        workdir, cpu=0)
        procs.append(backend)
        nginx = Nginx("nginx-proxy", [args.nginx, "-c", nginx_conf(workdir, "nginx-proxy", nport, nport_h2,
                                                                  upstream=bport,
                                                                  access_log=args.access_logs)], workdir, cpu=0)
        procs.append(nginx)
        cfg = os.path.join(workdir, "config")
        mesh_config(cfg, bport, eport, mport)
        pilot = Pilot(args.mizzen, cfg, workdir, extra=pilot_extra(args))
        procs.append(pilot)
        envoy = start_proxy(args, "envoy", "router", pilot, workdir, {"istio": "bench-envoy"},
                            "bench-envoy-0", "istio-system", "127.0.0.1")
        procs.append(envoy)
        mizzen = start_proxy(args, "mizzen", "router", pilot, workdir, {"istio": "bench-mizzen"},
                             "bench-mizzen-0", "istio-system", "127.0.0.1")
        procs.append(mizzen)
        urls = {"direct": f"http://127.0.0.1:{bport}/", "nginx": f"http://127.0.0.1:{nport}/",
                "envoy": f"http://127.0.0.1:{eport}/", "mizzen": f"http://127.0.0.1:{mport}/"}
        urls_h2 = {"direct": f"http://127.0.0.1:{bport_h2}/", "nginx": f"http://127.0.0.1:{nport_h2}/",
                   "envoy": urls["envoy"], "mizzen": urls["mizzen"]}
        measured = {"direct": None, "nginx": nginx, "envoy": envoy, "mizzen": mizzen}
        for s, u in urls.items():
            wait_for(lambda u=u: http_get(u) == (200, BODY), 30, f"{s} answering 1 KiB at {u}")
        time.sleep(2)
        res["rss"]["idle"] = {s: measured[s].mem()["VmRSS"] for s in ("nginx", "envoy", "mizzen")}
        res["rss"]["envoy_agent_idle"] = envoy.agent_mem()["VmRSS"]
        res["rss"]["backend_idle"] = backend.mem()["VmRSS"]
        log("idle RSS MiB:", res["rss"]["idle"])
        for s in SYSTEMS:  # warm up connections, caches and allocators
            oha(args, urls[s], 1000, 2)
        for run in range(args.runs):
            order = SYSTEMS[run % len(SYSTEMS):] + SYSTEMS[:run % len(SYSTEMS)]
            one = {}
            for s in order:
                one[s] = {str(rate): measure(args, s, measured[s], urls[s], rate, args.duration)
                          for rate in rates}
                one[s]["max"] = measure(args, s, measured[s], urls[s], None, args.duration)
            res["runs"].append(one)
            if not args.no_http2:
                h2 = {}
                for s in order:
                    h2[s] = {str(rates[0]): measure(args, s, measured[s], urls_h2[s], rates[0], args.duration, True),
                             "max": measure(args, s, measured[s], urls_h2[s], None, args.duration, True)}
                res["http2"].append(h2)
        res["rss"]["peak"] = {s: measured[s].mem()["VmHWM"] for s in ("nginx", "envoy", "mizzen")}
        res["rss"]["after_load"] = {s: measured[s].mem()["VmRSS"] for s in ("nginx", "envoy", "mizzen")}
        for p in (envoy, mizzen, pilot):
            p.stop()
        if args.services:
            res["rss"]["services"] = args.services
            res["rss"]["with_services"] = big_config_rss(args, workdir)
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the rest
                log(f"stopping {p.name}: {e}")
    if args.phase == "all":
        for mode in [m for m in args.two_hop.split(",") if m in ("plain", "mtls")]:
            res[f"two_hop_{mode}"] = two_hop(args, workdir, rates, mode == "mtls")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)
    if args.phase == "all":
        print(report(res))  # with --phase single, run.sh adds the two-hop figures, then reports


def big_config_rss(args, workdir):
    """A sidecar in namespace bench that sees 1000 services (bench/pilot/gen_config.py), one
    proxy at a time; RSS once it is ready and its config settled."""
    cfg = os.path.join(workdir, "big")
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "pilot", "gen_config.py"), cfg,
                    "--services", str(args.services), "--replicas", "3"], check=True, capture_output=True)
    pilot = Pilot(args.mizzen, cfg, workdir, name="pilot-big", extra=pilot_extra(args))
    out = {}
    try:
        for system in ("envoy", "mizzen"):
            p = start_proxy(args, system, "sidecar", pilot, workdir, {"app": "svc-0", "version": "v1"},
                            "svc-0-0", "bench", "10.10.0.1", name=f"{system}-sidecar-big")
            try:
                # Ready means the first complete config; let endpoints and memory settle
                # (bounded): RSS steady within 1% over one second.
                last, deadline = p.mem()["VmRSS"], time.monotonic() + 30
                while time.monotonic() < deadline:
                    time.sleep(1)
                    now = p.mem()["VmRSS"]
                    if abs(now - last) <= 0.01 * last:
                        break
                    last = now
                out[system] = p.mem()["VmRSS"]
                if system == "envoy":
                    out["envoy_agent"] = p.agent_mem()["VmRSS"]
            finally:
                p.stop()
    finally:
        pilot.stop()
    log("RSS with", args.services, "services, MiB:", out)
    return out


# ------------------------------------------------------------------------------------- two hops
def two_hop_manifest(dirpath, nginx_bin, nginx_dir, mtls):
    """A client pod and a backend pod (nginx), both with sidecars of one worker (Istio's
    proxy.istio.io/config annotation), as `mizzen local` runs them: network namespaces on a
    bridge, real capture rules, the pilot embedded."""
    os.makedirs(dirpath, exist_ok=True)
    conf = nginx_conf(nginx_dir, "pod-backend", 8080)
    # Inside the pod nginx listens on every address, runs unprivileged, and may write its dir.
    with open(conf) as f:
        text = f.read().replace("listen 127.0.0.1:8080;", "listen 0.0.0.0:8080;")
    with open(conf, "w") as f:
        f.write(text)
    for root, dirs, files in os.walk(os.path.join(nginx_dir, "pod-backend")):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o777)
    os.chmod(os.path.join(nginx_dir, "pod-backend"), 0o777)
    policy = ""
    if mtls:
        policy = """---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bench}
spec: {mtls: {mode: STRICT}}
"""
    with open(os.path.join(dirpath, "two-hop.yaml"), "w") as f:
        f.write(f"""apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{istio-injection: enabled}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: backend, namespace: bench}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: backend}}}}
  template:
    metadata:
      labels: {{app: backend, version: v1}}
      annotations: {{proxy.istio.io/config: "concurrency: 1"}}
    spec:
      containers:
      - name: nginx
        image: nginx
        command: ["{nginx_bin}", "-c", "{conf}"]
        ports: [{{containerPort: 8080, name: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: bench}}
spec:
  selector: {{app: backend}}
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: client, namespace: bench}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: client}}}}
  template:
    metadata:
      labels: {{app: client, version: v1}}
      annotations: {{proxy.istio.io/config: "concurrency: 1"}}
    spec:
      containers:
      - {{name: client, image: curl, command: ["sleep", "infinity"]}}
{policy}""")


def find_pids(*needles):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if all(n in text for n in needles):
            out.append(int(d))
    return out


class Sidecars:
    """The two sidecars of the two-hop path (client and backend pods); for Envoy, the envoy
    processes under their agents."""

    def __init__(self, kind):
        self.kind = kind
        self.pids = []
        for pod in ("client-0", "backend-0"):
            agents = [p for p in find_pids("proxy", "sidecar", "--pod-name", pod)
                      if os.path.basename(os.readlink(f"/proc/{p}/exe")) == "mizzen"]
            if len(agents) != 1:
                raise RuntimeError(f"expected one sidecar for {pod}, found {agents}")
            if kind == "envoy":
                kids = [k for k in children(agents[0])
                        if os.path.basename(os.readlink(f"/proc/{k}/exe")) == "envoy"]
                if len(kids) != 1:
                    raise RuntimeError(f"no envoy under the agent of {pod}")
                self.pids += kids
            else:
                self.pids += agents

    def cpu(self):
        return sum(cpu_secs(p) for p in self.pids)

    def mem(self):
        ms = [mem(p) for p in self.pids]
        return {k: sum(m[k] for m in ms) for k in ("VmRSS", "VmHWM")}


def two_hop(args, workdir, rates, mtls):
    """Per run and proxy kind: `mizzen local up` (pinned to core 0), oha from the client pod
    (core 1) to the backend Service through both sidecars, `mizzen local down`."""
    os.chmod(workdir, 0o755)  # the pods' nginx (unprivileged) reads its config below it
    out = []
    for run in range(args.runs):
        one = {}
        for kind in (("envoy", "native") if run % 2 == 0 else ("native", "envoy")):
            state = os.path.join(workdir, f"local-{kind}")
            manifest = os.path.join(workdir, f"two-hop-{kind}")
            two_hop_manifest(manifest, args.nginx, os.path.join(workdir, f"nginx-{kind}"), mtls)
            env = dict(os.environ, MIZZEN_LOCAL_STATE_DIR=state, NO_COLOR="1")
            up = ["taskset", "-c", "0", args.mizzen, "local", "up", manifest, "--proxy", kind, "--timeout", "120"]
            if kind == "envoy":
                up += ["--envoy", args.envoy]
            try:
                r = subprocess.run(up, env=env, capture_output=True, text=True, timeout=200)
                if r.returncode != 0:
                    raise RuntimeError(f"mizzen local up --proxy {kind} failed: {r.stderr[-3000:]}")
                sc = Sidecars(kind)
                st = json.loads(subprocess.run([args.mizzen, "local", "status", "--json"], env=env,
                                               capture_output=True, text=True, timeout=60, check=True).stdout)
                cip = next(x["cluster_ip"] for x in st["services"] if x["name"] == "backend")
                netns = next(x["netns"] for x in st["pods"] if x["name"] == "client-0")
                url = f"http://{cip}:8080/"
                # oha's resolver looks even an IP literal up through the search domains of the
                # pod's resolv.conf (ndots:5, no cluster DNS in the local mesh): each start
                # would wait for DNS timeouts. Inside the client pod's network namespace (so its
                # capture rules apply), a resolv.conf with ndots:0 is mounted for oha alone.
                resolv = os.path.join(workdir, "resolv.conf")
                with open(resolv, "w") as f:
                    f.write("nameserver 127.0.0.1\noptions ndots:0 timeout:1 attempts:1\n")

                def load(rate, duration):
                    cmd = [args.oha, "--no-tui", "--output-format", "json", "-w", "-z", f"{duration}s",
                           "-c", str(args.conns)]
                    if rate:
                        cmd += ["-q", str(rate), "--latency-correction"]
                    argv = ["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c",
                            f'mount --bind "{resolv}" /etc/resolv.conf && exec taskset -c 1 "$@"', "oha",
                            *cmd, url]
                    c0 = sc.cpu()
                    o = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
                    c1 = sc.cpu()
                    if o.returncode != 0:
                        raise RuntimeError(f"oha in the client pod failed: {o.stderr[-2000:]}")
                    x = parse_oha(json.loads(o.stdout))
                    x["cpu_ms_per_1000"] = (c1 - c0) * 1e6 / max(x["ok"], 1)
                    log(f"two-hop {kind:6} {'mtls' if mtls else 'plain'} rate={rate or 'max':>5}: {x['rps']:8.0f} rps "
                        f"p50={x['p50_us']:7.0f}us p90={x['p90_us']:7.0f}us cpu/1000={x['cpu_ms_per_1000']:6.1f}ms "
                        f"ok={x['ok']} bad={x['non_200'] + x['errors']}")
                    return x

                load(1000, 2)  # warm-up
                res = {str(rate): load(rate, args.duration) for rate in rates}
                res["max"] = load(None, args.duration)
                res["rss_after"] = sc.mem()["VmRSS"]
                one["mizzen" if kind == "native" else "envoy"] = res
            finally:
                d = subprocess.run([args.mizzen, "local", "down"], env=env, capture_output=True, text=True,
                                   timeout=120)
                if d.returncode != 0:
                    log(f"mizzen local down failed: {d.stderr[-2000:]}")
        out.append(one)
    return out


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ver = os.uname().release
    return {"cpus": os.cpu_count(), "model": model, "kernel": ver, "load_before": loadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ------------------------------------------------------------------------------------- report
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2 or not statistics.median(xs):
        return None
    return (max(xs) - min(xs)) / statistics.median(xs) * 100


def cell(v, digits=0, unit=""):
    return "–" if v is None else f"{v:,.{digits}f}{unit}"


def ratio(a, b):
    return "–" if a is None or not b else f"{a / b:.2f}×"


def report(res):
    runs, lines = res["runs"], []
    a = res["args"]
    m = res["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['model']}), kernel {m['kernel']}, load before {m['load_before']}, "
                 f"{m['time']}. {len(runs)} interleaved runs of {a['duration']} s, {a['conns']} connections, "
                 "1 KiB responses, HTTP/1.1 keep-alive; one-hop access logs "
                 f"{'on (a line per request, every proxy)' if a.get('access_logs') else 'off'}; "
                 "medians, spread = (max-min)/median.\n")

    def series(kind, s, key, field):
        return [r[s][key][field] for r in kind if s in r and key in r[s]]

    for label, kind in (("HTTP/1.1", runs), ("HTTP/2 (h2c from the client; HTTP/1.1 upstream)", res.get("http2") or [])):
        if not kind:
            continue
        keys = [k for k in kind[0]["direct"].keys() if k != "max"]
        for key in keys:
            lines.append(f"\n#### {label}, fixed {key} rps\n")
            lines.append("| system | p50 µs | p90 µs | p99 µs | added p50 µs | added p90 µs | CPU ms / 1000 req | of which kernel | spread p50 / CPU |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            d50, d90 = med(series(kind, "direct", key, "p50_us")), med(series(kind, "direct", key, "p90_us"))
            added = {}
            for s in SYSTEMS:
                p50, p90, p99 = (med(series(kind, s, key, f)) for f in ("p50_us", "p90_us", "p99_us"))
                cpu = med(series(kind, s, key, "cpu_ms_per_1000"))
                added[s] = (None if s == "direct" else p50 - d50, None if s == "direct" else p90 - d90, cpu)
                sp = f"{cell(spread(series(kind, s, key, 'p50_us')))}% / {cell(spread(series(kind, s, key, 'cpu_ms_per_1000')))}%"
                kern = [r[s][key].get("cpu_kernel_ms_per_1000") for r in kind if s in r and key in r[s]]
                kern = [x for x in kern if x is not None]
                lines.append(f"| {s} | {cell(p50)} | {cell(p90)} | {cell(p99)} | {cell(added[s][0])} | "
                             f"{cell(added[s][1])} | {cell(cpu, 1)} | {cell(med(kern) if kern else None, 1)} | {sp} |")
            e, z = added["envoy"], added["mizzen"]
            lines.append(f"\nMizzen / Envoy: added p50 {ratio(z[0], e[0])}, added p90 {ratio(z[1], e[1])}, "
                         f"CPU per request {ratio(z[2], e[2])} (bar: ≤ 0.50×). "
                         f"nginx / Envoy: added p50 {ratio(added['nginx'][0], e[0])}, CPU {ratio(added['nginx'][2], e[2])}.")
        lines.append(f"\n#### {label}, maximum throughput (proxy and backend on one core)\n")
        lines.append("| system | rps | spread | p99 µs | failed |")
        lines.append("|---|---|---|---|---|")
        mx = {}
        for s in SYSTEMS:
            mx[s] = med(series(kind, s, "max", "rps"))
            bad = sum(r[s]["max"]["non_200"] + r[s]["max"]["errors"] for r in kind)
            lines.append(f"| {s} | {cell(mx[s])} | {cell(spread(series(kind, s, 'max', 'rps')))}% | "
                         f"{cell(med(series(kind, s, 'max', 'p99_us')))} | {bad} |")
        lines.append(f"\nMizzen / Envoy throughput: {ratio(mx['mizzen'], mx['envoy'])} (bar: ≥ 1.50×).")
    for mode in ("plain", "mtls"):
        th = res.get(f"two_hop_{mode}")
        if not th:
            continue
        lines.append(f"\n#### Two hops (client sidecar -> server sidecar, {'mTLS' if mode == 'mtls' else 'plaintext'}), "
                     "through `mizzen local` with capture; CPU is both sidecars\n")
        lines.append("| system | rate | p50 µs | p90 µs | p99 µs | CPU ms / 1000 req | rps | failed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        figs = {}
        for s_ in ("envoy", "mizzen"):
            for key in [k for k in th[0][s_] if k != "rss_after"]:
                xs = [r[s_][key] for r in th if s_ in r]
                f = {k: med([x[k] for x in xs]) for k in ("p50_us", "p90_us", "p99_us", "cpu_ms_per_1000", "rps")}
                figs[(s_, key)] = f
                bad = sum(x["non_200"] + x["errors"] for x in xs)
                lines.append(f"| {s_} | {key} | {cell(f['p50_us'])} | {cell(f['p90_us'])} | {cell(f['p99_us'])} | "
                             f"{cell(f['cpu_ms_per_1000'], 1)} | {cell(f['rps'])} | {bad} |")
        for key in [k for k in th[0]["envoy"] if k not in ("rss_after", "max")]:
            e, z = figs[("envoy", key)], figs[("mizzen", key)]
            lines.append(f"\nAt {key} rps, Mizzen / Envoy: p50 {ratio(z['p50_us'], e['p50_us'])}, "
                         f"p90 {ratio(z['p90_us'], e['p90_us'])}, CPU {ratio(z['cpu_ms_per_1000'], e['cpu_ms_per_1000'])}.")
        lines.append(f"Max throughput Mizzen / Envoy: {ratio(figs[('mizzen', 'max')]['rps'], figs[('envoy', 'max')]['rps'])}.")
    rss = res["rss"]
    lines.append("\n#### Memory (RSS, MiB)\n")
    lines.append("| system | idle | peak under load (VmHWM) | sidecar with %s services |" % rss.get("services", "–"))
    lines.append("|---|---|---|---|")
    ws = rss.get("with_services", {})
    for s in ("nginx", "envoy", "mizzen"):
        lines.append(f"| {s} | {cell(rss['idle'].get(s), 1)} | {cell(rss.get('peak', {}).get(s), 1)} | "
                     f"{cell(ws.get(s), 1)} |")
    lines.append(f"\nMizzen / Envoy: idle {ratio(rss['idle'].get('mizzen'), rss['idle'].get('envoy'))}, "
                 f"with services {ratio(ws.get('mizzen'), ws.get('envoy'))} (bar: ≤ 0.50×, and ≤ 20 MiB idle). "
                 f"Envoy's figures are the envoy process alone; its agent (`mizzen proxy --envoy`) adds "
                 f"{cell(rss.get('envoy_agent_idle'), 1)} MiB idle, {cell(ws.get('envoy_agent'), 1)} MiB with services.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        with open(sys.argv[2]) as f:
            print(report(json.load(f)))
    else:
        main()
