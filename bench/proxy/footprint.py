#!/usr/bin/env python3
"""One native proxy's footprint, in figures a busy machine does not move much: callgrind user
instructions per request, and RSS split into anonymous memory (the allocator's and ours) and
file-backed pages (the binary's text: it varies with the page cache, by 1-2 MiB between runs of
the same binary) idle, after N requests, and as a sidecar holding the config of 1000 services.

    python3 bench/proxy/footprint.py target/release/mizzen [--no-cg] [--no-rss] [--no-big]
        [--env NAME=VALUE ...]   (e.g. an allocator's options; set for every process it starts)

The setup is count.py's (bench.py's one-hop gateway to nginx, one worker); it prints one line
of NAME=VALUE figures (MiB, instructions, us of user CPU per request). It signals only
processes it started, by PID, and every wait is bounded.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (reuse the benchmark's setup, not a copy of it)
import count  # noqa: E402


def anon(pid):
    """RssAnon and RssFile of a process, MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def settle(p):
    """RSS once steady within 1% over a second (bounded: 30 s), as bench.big_config_rss."""
    last, deadline = p.mem()["VmRSS"], time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1)
        now = p.mem()["VmRSS"]
        if abs(now - last) <= 0.01 * last:
            break
        last = now
    return p.mem()["VmRSS"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--no-cg", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--cg-requests", type=int, default=5000)
    ap.add_argument("--rss-requests", type=int, default=20000)
    ap.add_argument("--env", action="append", default=[])
    a = ap.parse_args()
    args = argparse.Namespace(mizzen=os.path.abspath(a.bin), access_logs=False, services=1000,
                              oha=shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"),
                              nginx=shutil.which("nginx") or "/usr/sbin/nginx", envoy=None)
    for kv in a.env:
        k, v = kv.split("=", 1)
        os.environ[k] = v
    workdir = tempfile.mkdtemp(prefix="mizzen-footprint-")
    procs = []
    res = {}
    try:
        bport, eport, mport = bench.free_port(), bench.free_port(), bench.free_port()
        backend = bench.Nginx("backend", [args.nginx, "-c", bench.nginx_conf(workdir, "backend", bport)],
                              workdir, cpu=0)
        procs.append(backend)
        cfg = os.path.join(workdir, "config")
        bench.mesh_config(cfg, bport, eport, mport)
        pilot = bench.Pilot(args.mizzen, cfg, workdir, extra=bench.pilot_extra(args))
        procs.append(pilot)
        url = f"http://127.0.0.1:{mport}/"
        modes = ([] if a.no_rss else ["rss"]) + ([] if a.no_cg else ["cg"])
        for mode in modes:
            b = argparse.Namespace(**vars(args))
            cg_out = os.path.join(workdir, "mizzen.callgrind.out")
            if mode == "cg":
                b.mizzen = count.wrapper(workdir, "mizzen", args.mizzen, cg_out)
            p = bench.start_proxy(b, "mizzen", "router", pilot, workdir, {"istio": "bench-mizzen"},
                                  "bench-mizzen-0", "istio-system", "127.0.0.1", name=f"mizzen-{mode}")
            procs.append(p)
            bench.wait_for(lambda: bench.http_get(url, timeout=10) == (200, bench.BODY), 120, "answering")
            if mode == "rss":
                res["rss_idle"] = settle(p)
                a0 = anon(p.pid)
                res["anon_idle"], res["file_idle"] = a0["RssAnon"], a0["RssFile"]
                r = count.oha_n(args.oha, url, a.rss_requests, 64)
                time.sleep(1)
                res["rss_after"] = p.mem()["VmRSS"]
                res["hwm_after"] = p.mem()["VmHWM"]
                res["anon_after"] = anon(p.pid)["RssAnon"]
                c0 = bench.cpu_split(p.pid)
                r = count.oha_n(args.oha, url, a.rss_requests, 64)
                c1 = bench.cpu_split(p.pid)
                res["user_us"] = (c1[0] - c0[0]) * 1e6 / max(r["ok"], 1)
                res["rss_ok"] = r["ok"]
            else:
                count.oha_n(args.oha, url, 500, 64)
                subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, timeout=120)
                r = count.oha_n(args.oha, url, a.cg_requests, 64)
                subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, timeout=120)
                time.sleep(1)
                ir = count.callgrind_total(cg_out)
                res["ir_per_req"] = round(ir / max(r["ok"], 1))
                res["cg_bad"] = r["non_200"] + r["errors"]
                if a.keep:
                    os.makedirs(a.keep, exist_ok=True)
                    newest = max(glob.glob(cg_out + "*"), key=os.path.getmtime)
                    shutil.copy(newest, os.path.join(a.keep, "mizzen.callgrind.out"))
            p.stop(timeout=30)
            procs.remove(p)
        if not a.no_big:
            cfgb = os.path.join(workdir, "big")
            subprocess.run([sys.executable, os.path.join(bench.ROOT, "bench", "pilot", "gen_config.py"), cfgb,
                            "--services", "1000", "--replicas", "3"], check=True, capture_output=True)
            pb = bench.Pilot(args.mizzen, cfgb, workdir, name="pilot-big", extra=bench.pilot_extra(args))
            procs.append(pb)
            p = bench.start_proxy(args, "mizzen", "sidecar", pb, workdir, {"app": "svc-0", "version": "v1"},
                                  "svc-0-0", "bench", "10.10.0.1", name="mizzen-sidecar-big")
            procs.append(p)
            res["rss_1000"] = settle(p)
            res["anon_1000"] = anon(p.pid)["RssAnon"]
    finally:
        for p in reversed(procs):
            try:
                p.stop(timeout=30)
            except Exception as e:
                print("stop", p.name, e, file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    print(os.path.basename(a.bin), " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
