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


def cpu_secs(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime + stime


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
def nginx_conf(workdir, name, body_port, h2_port=None, upstream=None):
    """worker_processes 1: one core, like the proxies' single worker."""
    d = os.path.join(workdir, name)
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    if upstream is None:
        location = f"default_type text/plain; return 200 '{BODY}';"
    else:
        location = ("proxy_pass http://be; proxy_http_version 1.1; "
                    "proxy_set_header Connection \"\"; proxy_buffering on;")
    ups = "" if upstream is None else f"upstream be {{ server 127.0.0.1:{upstream}; keepalive 128; keepalive_requests 1000000; }}"
    h2 = "" if h2_port is None else f"listen 127.0.0.1:{h2_port} http2;"
    conf = f"""
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
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
    """Access logs off for every proxy (Istio's default profile: meshConfig.accessLogFile "")."""
    help_text = subprocess.run([args.mizzen, "pilot", "--help"], capture_output=True, text=True).stdout
    if "--access-log-file" in help_text:
        return ["--access-log-file", ""]
    log("this pilot has no --access-log-file: Envoy writes an access log line per request")
    return []


# ------------------------------------------------------------------------------------- load
def oha(args, url, rate, duration, http2=False):
    argv = ["taskset", "-c", "1", args.oha, "--no-tui", "--output-format", "json",
            "-z", f"{duration}s", "-c", str(args.conns)]
    if rate:
        argv += ["-q", str(rate), "--latency-correction"]
    if http2:
        argv += ["--http2", "-p", "1"]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr[-2000:]}")
    j = json.loads(out.stdout)
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
    r = oha(args, url, rate, duration, http2)
    c1 = proc.cpu() if proc else 0.0
    r["cpu_ms"] = (c1 - c0) * 1000
    r["cpu_ms_per_1000"] = r["cpu_ms"] / max(r["ok"], 1) * 1000 if proc else None
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
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",") if x]

    workdir = tempfile.mkdtemp(prefix="mizzen-bench-proxy-")
    log(f"workdir {workdir}")
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
                                                                  upstream=bport)], workdir, cpu=0)
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
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(report(res))
    shutil.rmtree(workdir, ignore_errors=True)


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
                time.sleep(3)
                out[system] = p.mem()["VmRSS"]
                if system == "envoy":
                    out["envoy_agent"] = p.agent_mem()["VmRSS"]
            finally:
                p.stop()
    finally:
        pilot.stop()
    log("RSS with", args.services, "services, MiB:", out)
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
                 "1 KiB responses, HTTP/1.1 keep-alive; medians, spread = (max-min)/median.\n")

    def series(kind, s, key, field):
        return [r[s][key][field] for r in kind if s in r and key in r[s]]

    for label, kind in (("HTTP/1.1", runs), ("HTTP/2 (h2c from the client; HTTP/1.1 upstream)", res.get("http2") or [])):
        if not kind:
            continue
        keys = [k for k in kind[0]["direct"].keys() if k != "max"]
        for key in keys:
            lines.append(f"\n#### {label}, fixed {key} rps\n")
            lines.append("| system | p50 µs | p90 µs | p99 µs | added p50 µs | added p90 µs | CPU ms / 1000 req | spread p50 / CPU |")
            lines.append("|---|---|---|---|---|---|---|---|")
            d50, d90 = med(series(kind, "direct", key, "p50_us")), med(series(kind, "direct", key, "p90_us"))
            added = {}
            for s in SYSTEMS:
                p50, p90, p99 = (med(series(kind, s, key, f)) for f in ("p50_us", "p90_us", "p99_us"))
                cpu = med(series(kind, s, key, "cpu_ms_per_1000"))
                added[s] = (None if s == "direct" else p50 - d50, None if s == "direct" else p90 - d90, cpu)
                sp = f"{cell(spread(series(kind, s, key, 'p50_us')))}% / {cell(spread(series(kind, s, key, 'cpu_ms_per_1000')))}%"
                lines.append(f"| {s} | {cell(p50)} | {cell(p90)} | {cell(p99)} | {cell(added[s][0])} | "
                             f"{cell(added[s][1])} | {cell(cpu, 1)} | {sp} |")
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
