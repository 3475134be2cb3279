#!/usr/bin/env python3
"""Pilot scale benchmark orchestrator (run it through bench/pilot/run.sh).

Scenarios, each repeated --runs times against a freshly started pilot:
  envoy    1 real Envoy (delta ADS, bootstrapped by hand): time from Envoy start to its
           /ready = LIVE (initial CDS/EDS/LDS/RDS applied), Envoy RSS, update_rejected sum
  N        N simulated delta-xDS clients (mizzen-xds-load): time until all have ACKed their
           full config; then one VirtualService weight edit, time until all ACKed the update
Every pilot start also yields: spawn-to-/ready time, the "initial config loaded" elapsed_ms,
idle RSS before clients; after the load: peak RSS (VmHWM), RSS idle after load, CPU time
(utime+stime) of the initial sync and of the change.

Only processes this script started are signalled, by PID. Every wait is bounded.
"""
import argparse
import datetime
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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception:
        return None, ""


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # fields after ")" start at field 3 (state); utime=14, stime=15
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def stop(p, name, timeout=5):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {p.pid}) ignored SIGTERM; SIGKILL")
        p.kill()
        p.wait(timeout=timeout)


class Pilot:
    def __init__(self, binary, config_dir, workdir, tag):
        self.xds = free_port()
        self.mon = free_port()
        self.log_path = os.path.join(workdir, f"pilot-{tag}.log")
        self.logf = open(self.log_path, "w")
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        t0 = time.monotonic()
        self.p = subprocess.Popen(
            [binary, "pilot", "--config-dir", config_dir,
             "--xds-addr", f"127.0.0.1:{self.xds}", "--monitoring-addr", f"127.0.0.1:{self.mon}"],
            stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        self.pid = self.p.pid
        deadline = t0 + 60
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"pilot exited with {self.p.returncode}; see {self.log_path}")
            st, _ = http_get(f"http://127.0.0.1:{self.mon}/ready", timeout=0.5)
            if st == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("pilot not ready within 60 s")
            time.sleep(0.01)
        self.ready_ms = (time.monotonic() - t0) * 1000
        self.initial_build_ms = None
        for _ in range(100):
            m = re.search(r"initial config loaded.*?elapsed_ms=(\d+)", self.read_log())
            if m:
                self.initial_build_ms = int(m.group(1))
                break
            time.sleep(0.02)

    def read_log(self):
        self.logf.flush()
        with open(self.log_path) as f:
            return ANSI.sub("", f.read())

    def change_build_ms(self):
        return [int(x) for x in re.findall(r"config changed, pushing.*?build_ms=(\d+)", self.read_log())]

    def syncz(self):
        st, body = http_get(f"http://127.0.0.1:{self.mon}/debug/syncz", timeout=10)
        return json.loads(body) if st == 200 else None

    def stop(self):
        stop(self.p, "pilot")
        self.logf.close()


def envoy_bootstrap(path, xds_port, admin_port, namespace):
    ip, pod, app = "10.10.0.1", "svc-0-0", "svc-0"  # pod 0 of the generated config
    boot = {
        "node": {
            "id": f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
            "cluster": f"{app}.{namespace}",
            "metadata": {
                "NAMESPACE": namespace, "NAME": pod, "INSTANCE_IPS": ip,
                "LABELS": {"app": app, "version": "v1"}, "CLUSTER_ID": "Kubernetes",
                "SERVICE_ACCOUNT": app, "ISTIO_VERSION": "1.24.0",
            },
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC", "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}
            }]}]},
        }]},
    }
    with open(path, "w") as f:
        json.dump(boot, f, indent=1)


def envoy_stats(admin):
    st, body = http_get(f"http://127.0.0.1:{admin}/stats", timeout=5)
    stats = {}
    for line in body.splitlines():
        k, _, v = line.partition(": ")
        try:
            stats[k] = int(v)
        except ValueError:
            pass
    return stats


def run_envoy(envoy_bin, pilot, workdir, namespace, tag):
    admin = free_port()
    boot = os.path.join(workdir, f"envoy-{tag}.json")
    envoy_bootstrap(boot, pilot.xds, admin, namespace)
    logp = os.path.join(workdir, f"envoy-{tag}.log")
    cpu0 = cpu_secs(pilot.pid)
    t0 = time.monotonic()
    with open(logp, "w") as lf:
        p = subprocess.Popen([envoy_bin, "-c", boot, "--disable-hot-restart", "--concurrency", "2",
                              "--base-id", str(admin), "-l", "warning"], stdout=lf, stderr=subprocess.STDOUT)
    try:
        deadline = t0 + 60
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"envoy exited with {p.returncode}; see {logp}")
            st, body = http_get(f"http://127.0.0.1:{admin}/ready", timeout=0.5)
            if st == 200 and "LIVE" in body:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not LIVE within 60 s; see {logp}")
            time.sleep(0.01)
        live_ms = (time.monotonic() - t0) * 1000
        time.sleep(1.0)  # let late responses land before reading counters
        stats = envoy_stats(admin)
        rejected = {k: v for k, v in stats.items() if k.endswith("update_rejected") and v}
        res = {
            "live_ms": live_ms,
            "envoy_rss_mib": proc_status(p.pid)["VmRSS"],
            "update_rejected": sum(rejected.values()),
            "rejected_stats": rejected,
            "clusters": stats.get("cluster_manager.active_clusters"),
            "listeners": stats.get("listener_manager.total_listeners_active"),
            "cds_update_success": stats.get("cluster_manager.cds.update_success"),
            "lds_update_success": stats.get("listener_manager.lds.update_success"),
            "pilot_cpu_s": cpu_secs(pilot.pid) - cpu0,
        }
        sz = pilot.syncz() or []
        acked = [all(t.get("acked_version") and not t.get("nack") for t in x["resources"].values())
                 for x in sz]
        res["pilot_sees_all_acked"] = bool(acked) and all(acked)
        return res
    finally:
        stop(p, "envoy")


def run_load(load_bin, pilot, n, namespace, change_file, change_content, timeout):
    cmd = [load_bin, "--xds", f"127.0.0.1:{pilot.xds}", "--clients", str(n), "--namespace", namespace,
           "--ip-base", "10.10.0.1", "--pod-prefix", "xds-load", "--timeout-secs", str(timeout),
           "--change-file", change_file, "--change-content-file", change_content,
           "--change-delay-ms", "1500", "--json"]
    cpu0 = cpu_secs(pilot.pid)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu_initial = None
    rss_peak_initial = None
    # stderr carries "initial-complete" between the phases
    for line in p.stderr:
        if line.strip() == "initial-complete":
            cpu_initial = cpu_secs(pilot.pid) - cpu0
            rss_peak_initial = proc_status(pilot.pid)["VmHWM"]
            break
        sys.stderr.write(line)
    cpu_mid = cpu_secs(pilot.pid)
    try:
        out, err = p.communicate(timeout=2 * timeout + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    if err.strip():
        sys.stderr.write(err)
    res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ok": False, "error": "no output"}
    res["exit"] = p.returncode
    res["pilot_cpu_initial_s"] = cpu_initial
    res["pilot_cpu_change_s"] = cpu_secs(pilot.pid) - cpu_mid if cpu_initial is not None else None
    res["pilot_peak_rss_initial_mib"] = rss_peak_initial
    st = proc_status(pilot.pid)
    res["pilot_peak_rss_mib"] = st["VmHWM"]
    return res


def summarize(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    med = statistics.median(v)
    return {"median": med, "min": min(v), "max": max(v),
            "spread_pct": (max(v) - min(v)) / med * 100 if med else 0.0, "runs": v}


def fmt(s, unit="", digits=0):
    if s is None:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'])}{unit} ({f.format(s['min'])}–{f.format(s['max'])}, "
            f"±{s['spread_pct'] / 2:.0f}%)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mizzen", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("--envoy", help="envoy binary (skip the Envoy scenario if absent)")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", default="100,1000", help="comma list of simulated client counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="per phase, seconds")
    ap.add_argument("--out", required=True, help="results JSON path")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args()
    ns = "bench"

    work = tempfile.mkdtemp(prefix="mizzen-pilot-bench-")
    cfg = os.path.join(work, "config")
    chg = os.path.join(work, "change")
    subprocess.run([sys.executable, os.path.join(HERE, "gen_config.py"), cfg, "--services", str(a.services),
                    "--replicas", str(a.replicas), "--namespace", ns, "--change-dir", chg], check=True)
    change_file = os.path.join(cfg, "routing", "svc-0.yaml")
    base_content = os.path.join(chg, "svc-0-90-10.yaml")
    edit_content = os.path.join(chg, "svc-0-80-20.yaml")

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "services": a.services, "endpoints": a.services * a.replicas, "runs": a.runs,
        "pilot_starts": [], "envoy": [], "load": {},
        "loadavg": {"start": loadavg()},
    }
    scenarios = (["envoy"] if a.envoy else []) + [int(x) for x in a.clients.split(",") if x]
    try:
        for sc in scenarios:
            results["loadavg"][str(sc)] = []
            for r in range(a.runs):
                shutil.copyfile(base_content, change_file)
                la = loadavg()
                results["loadavg"][str(sc)].append(la)
                log(f"scenario {sc} run {r + 1}/{a.runs} (load average {la})")
                pilot = Pilot(a.mizzen, cfg, work, f"{sc}-{r}")
                try:
                    time.sleep(1.0)
                    start = {"scenario": sc, "ready_ms": pilot.ready_ms,
                             "initial_build_ms": pilot.initial_build_ms,
                             "idle_rss_mib": proc_status(pilot.pid)["VmRSS"],
                             "startup_cpu_s": cpu_secs(pilot.pid)}
                    results["pilot_starts"].append(start)
                    if sc == "envoy":
                        res = run_envoy(a.envoy, pilot, work, ns, f"{r}")
                        results["envoy"].append(res)
                        log(f"  envoy LIVE {res['live_ms']:.0f} ms, rss {res['envoy_rss_mib']:.0f} MiB, "
                            f"update_rejected {res['update_rejected']}")
                    else:
                        res = run_load(a.load, pilot, sc, ns, change_file, edit_content, a.timeout)
                        time.sleep(3.0)
                        res["pilot_rss_after_load_mib"] = proc_status(pilot.pid)["VmRSS"]
                        res["change_build_ms"] = pilot.change_build_ms()
                        results["load"].setdefault(str(sc), []).append(res)
                        if not res.get("ok"):
                            log(f"  FAILED: {res.get('error')}")
                        else:
                            log(f"  initial {res['initial']['all_acked_ms']:.0f} ms, change "
                                f"{res.get('change', {}).get('all_acked_ms', 0):.0f} ms, pilot peak "
                                f"{res['pilot_peak_rss_mib']:.0f} MiB, cpu {res['pilot_cpu_initial_s']:.1f}"
                                f"+{res['pilot_cpu_change_s']:.1f} s")
                finally:
                    pilot.stop()
    finally:
        results["loadavg"]["end"] = loadavg()
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    print(report(results))
    failed = [x for v in results["load"].values() for x in v if not x.get("ok")]
    bad_envoy = [x for x in results["envoy"] if x["update_rejected"]]
    return 1 if failed or bad_envoy else 0


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return {"nproc": os.cpu_count(), "cpu": model, "mem_mib": mem, "kernel": os.uname().release}


def report(res):
    L = []
    st = res["pilot_starts"]
    L.append(f"Date {res['date']}; {res['machine']['nproc']} CPUs ({res['machine']['cpu']}), "
             f"{res['machine']['mem_mib']} MiB; {res['services']} services / {res['endpoints']} endpoints; "
             f"{res['runs']} runs each; median (min–max, ±half-spread).")
    L.append("")
    L.append("| pilot start (all runs) | value |")
    L.append("|---|---|")
    L.append(f"| spawn → /ready | {fmt(summarize([s['ready_ms'] for s in st]), ' ms')} |")
    L.append(f"| initial load+build (log elapsed_ms) | {fmt(summarize([s['initial_build_ms'] for s in st]), ' ms')} |")
    L.append(f"| RSS idle, no proxies | {fmt(summarize([s['idle_rss_mib'] for s in st]), ' MiB')} |")
    L.append(f"| CPU time to ready | {fmt(summarize([s['startup_cpu_s'] for s in st]), ' s', 2)} |")
    if res["envoy"]:
        e = res["envoy"]
        L.append("")
        L.append("| 1 real Envoy 1.40 (delta ADS) | value |")
        L.append("|---|---|")
        L.append(f"| Envoy start → /ready LIVE | {fmt(summarize([x['live_ms'] for x in e]), ' ms')} |")
        L.append(f"| Envoy RSS with the config | {fmt(summarize([x['envoy_rss_mib'] for x in e]), ' MiB')} |")
        L.append(f"| pilot CPU for the push | {fmt(summarize([x['pilot_cpu_s'] for x in e]), ' s', 2)} |")
        L.append(f"| update_rejected (sum over runs) | {sum(x['update_rejected'] for x in e)} |")
        L.append(f"| Envoy active clusters / listeners | {e[0]['clusters']} / {e[0]['listeners']} |")
        L.append(f"| pilot /debug/syncz all ACKed | {all(x['pilot_sees_all_acked'] for x in e)} |")
    for n, runs in res["load"].items():
        ok = [x for x in runs if x.get("ok")]
        L.append("")
        L.append(f"| {n} simulated delta clients | value |")
        L.append("|---|---|")
        if len(ok) != len(runs):
            L.append(f"| FAILED runs | {len(runs) - len(ok)}: {[x.get('error') for x in runs if not x.get('ok')]} |")
        if not ok:
            continue
        g = lambda f: summarize([f(x) for x in ok])  # noqa: E731
        L.append(f"| all clients full config ACKed | {fmt(g(lambda x: x['initial']['all_acked_ms']), ' ms')} |")
        L.append(f"| per-client p50 | {fmt(g(lambda x: x['initial']['per_client']['p50_ms']), ' ms')} |")
        L.append(f"| bytes received, total | {fmt(g(lambda x: x['initial']['bytes'] / 1e6), ' MB', 1)} |")
        L.append(f"| pilot CPU, initial sync | {fmt(g(lambda x: x['pilot_cpu_initial_s']), ' s', 1)} |")
        L.append(f"| pilot peak RSS (VmHWM) | {fmt(g(lambda x: x['pilot_peak_rss_mib']), ' MiB')} |")
        L.append(f"| pilot RSS idle after load (clients connected→gone +3 s) | {fmt(g(lambda x: x['pilot_rss_after_load_mib']), ' MiB')} |")
        L.append(f"| VS weight edit → all ACKed | {fmt(g(lambda x: x['change']['all_acked_ms']), ' ms')} |")
        L.append(f"| … first client ACKed | {fmt(g(lambda x: x['change']['first_ms']), ' ms')} |")
        L.append(f"| … pilot rebuild (log build_ms) | {fmt(g(lambda x: (x['change_build_ms'] or [None])[-1]), ' ms')} |")
        L.append(f"| … bytes pushed | {fmt(g(lambda x: x['change']['bytes'] / 1e6), ' MB', 1)} |")
        L.append(f"| … pilot CPU | {fmt(g(lambda x: x['pilot_cpu_change_s']), ' s', 1)} |")
        c = ok[0].get("config", {})
        L.append(f"| per client config | {c.get('clusters')} clusters ({c.get('eds_clusters')} EDS, "
                 f"{c.get('endpoints')} endpoints), {c.get('listeners')} listeners, "
                 f"{c.get('route_configs')} route configs ({c.get('virtual_hosts')} virtual hosts) |")
    L.append("")
    L.append(f"Load average: start {res['loadavg']['start']}, end {res['loadavg'].get('end')}; per run: "
             + "; ".join(f"{k}: {', '.join(v)}" for k, v in res["loadavg"].items() if isinstance(v, list)))
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
