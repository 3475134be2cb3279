"""End-to-end tests for `mizzen iptables` (run as root).

Each test works in its own network namespace, so the host's rules are never touched: apply the
istio-iptables seed flags, check iptables-save, re-run for idempotency, TPROXY mode, cleanup,
flag validation, and real traffic (a non-proxy uid is redirected to 15001, uid 1337 is not).
The same for the nftables backend when `nft` is installed.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("MIZZEN_BIN") or str(REPO / "target" / "release" / "mizzen")
SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
        "-b", "*", "-d", "15090,15021,15020"]
TIMEOUT = 20
POD_IP = "10.250.0.1"
PEER_IP = "10.250.0.2"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def run(*cmd, check=True, ns=None, timeout=TIMEOUT):
    argv = list(cmd)
    if ns:
        argv = ["ip", "netns", "exec", ns] + argv
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} failed ({p.returncode}): {p.stderr}")
    return p


def peer_of(ns):
    return ns + "-peer"


@pytest.fixture
def ns():
    """The pod namespace, plus a peer namespace holding the "service" at PEER_IP behind a veth.

    The destination must not be a local address: traffic to local addresses leaves via lo,
    and istio-iptables deliberately lets apps talk to themselves over lo uncaptured.
    """
    name = f"mzt-ipt-{os.getpid()}-{time.monotonic_ns() % 100000}"
    peer = peer_of(name)
    try:
        run("ip", "netns", "add", name)
        run("ip", "netns", "add", peer)
        for n in (name, peer):
            run("ip", "link", "set", "lo", "up", ns=n)
        run("ip", "link", "add", "mzv0", "type", "veth", "peer", "name", "mzv1", ns=name)
        run("ip", "link", "set", "mzv1", "netns", peer, ns=name)
        run("ip", "addr", "add", f"{POD_IP}/24", "dev", "mzv0", ns=name)
        run("ip", "addr", "add", f"{PEER_IP}/24", "dev", "mzv1", ns=peer)
        run("ip", "link", "set", "mzv0", "up", ns=name)
        run("ip", "link", "set", "mzv1", "up", ns=peer)
        yield name
    finally:
        for n in (name, peer):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=TIMEOUT)


def mizzen(ns, *args, check=True):
    return run(BIN, "iptables", *args, ns=ns, check=check)


def save(ns, table="nat"):
    out = run("iptables-save", "-t", table, ns=ns).stdout
    # Drop comments and packet counters: they change between runs.
    return [l.split(" [")[0] if l.startswith(":") else l
            for l in out.splitlines() if not l.startswith("#")]


SEED_NAT_RULES = [
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A OUTPUT -j ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021,15020 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
]


def rules(lines):
    return [l for l in lines if l.startswith("-A")]


def istio_anything(ns):
    found = []
    for table in ("nat", "mangle", "raw", "filter"):
        found += [l for l in save(ns, table) if "ISTIO" in l]
    return found


def test_seed_apply_idempotent_cleanup(ns):
    mizzen(ns, *SEED)
    first = save(ns)
    assert rules(first) == SEED_NAT_RULES
    for chain in ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"):
        assert f":{chain} -" in first

    mizzen(ns, *SEED)
    assert save(ns) == first, "re-running changed the rules"

    mizzen(ns, "--cleanup-only")
    assert istio_anything(ns) == []


def test_tproxy_apply_and_cleanup(ns):
    mizzen(ns, *SEED)
    mizzen(ns, "-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "*", "-d", "15090,15021,15020")
    mangle = rules(save(ns, "mangle"))
    assert mangle == [
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN",
        "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
        "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
        "-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff",
        "-A ISTIO_DIVERT -j ACCEPT",
        "-A ISTIO_INBOUND -p tcp -m mark --mark 0x539 -j RETURN",
        "-A ISTIO_INBOUND -s 127.0.0.6/32 -i lo -p tcp -j RETURN",
        "-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021,15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
        "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
    ]
    nat = rules(save(ns))
    # Switching mode replaced the REDIRECT inbound jump instead of adding to it.
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" not in nat
    assert nat.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
    assert "fwmark 0x539 lookup 133" in run("ip", "rule", ns=ns).stdout

    before = save(ns, "mangle")
    mizzen(ns, "-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "*", "-d", "15090,15021,15020")
    assert save(ns, "mangle") == before
    assert run("ip", "rule", ns=ns).stdout.count("lookup 133") == 1

    mizzen(ns, "--cleanup-only")
    assert istio_anything(ns) == []
    assert rules(save(ns, "mangle")) == []
    assert "lookup 133" not in run("ip", "rule", ns=ns).stdout


@pytest.mark.parametrize("args,flag,value", [
    (["-i", "10.0.0.0/33"], "--istio-service-cidr", "10.0.0.0/33"),
    (["-x", "not-a-cidr"], "--istio-service-exclude-cidr", "not-a-cidr"),
    (["-p", "70000"], "--envoy-port", "70000"),
    (["-m", "BOGUS"], "--istio-inbound-interception-mode", "BOGUS"),
])
def test_bad_flags_change_nothing(ns, args, flag, value):
    mizzen(ns, *SEED)
    before = {t: save(ns, t) for t in ("nat", "mangle", "raw")}
    p = mizzen(ns, "-u", "1337", "-b", "*", *args, check=False)
    assert p.returncode != 0
    assert flag in p.stderr and value in p.stderr, p.stderr
    assert {t: save(ns, t) for t in ("nat", "mangle", "raw")} == before


def test_dry_run_prints_and_changes_nothing(ns):
    p = mizzen(ns, *SEED, "-n")
    golden = (REPO / "conformance" / "iptables" / "seed.golden").read_text()
    assert p.stdout == golden
    assert istio_anything(ns) == []


# --- real traffic ---------------------------------------------------------------------------

class Listener:
    """A TCP listener in the namespace that reports which port each connection arrived on."""

    SCRIPT = r"""
import socket, sys, select
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); socks.append(s)
print("ready", flush=True)
while True:
    r, _, _ = select.select(socks, [], [], 30)
    if not r: break
    for s in r:
        c, _ = s.accept()
        c.sendall(str(s.getsockname()[1]).encode()); c.close()
"""

    def __init__(self, ns, ports):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-c", self.SCRIPT, *map(str, ports)],
            stdout=subprocess.PIPE, text=True)
        ready = []
        t = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()))
        t.start()
        t.join(TIMEOUT)
        assert ready and ready[0].strip() == "ready", "listener did not start"

    def stop(self):
        self.proc.kill()
        self.proc.wait(TIMEOUT)


CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.recv(64).decode())
"""


def connect_as(ns, uid, host, port):
    p = run("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "python3", "-c", CLIENT, host, str(port), ns=ns)
    return p.stdout.strip()


def traffic_checks(ns):
    proxy = Listener(ns, [15001])
    service = Listener(peer_of(ns), [8080])
    try:
        # An app (uid 1000) connecting to a service address is captured by the proxy port.
        assert connect_as(ns, 1000, PEER_IP, 8080) == "15001"
        # The proxy (uid 1337) reaches the real destination.
        assert connect_as(ns, 1337, PEER_IP, 8080) == "8080"
    finally:
        proxy.stop()
        service.stop()


def uncaptured_check(ns):
    proxy = Listener(ns, [15001])
    service = Listener(peer_of(ns), [8080])
    try:
        assert connect_as(ns, 1000, PEER_IP, 8080) == "8080"
    finally:
        proxy.stop()
        service.stop()


def test_traffic_redirect_iptables(ns):
    # Before capture, the app reaches the service directly: the check can fail.
    uncaptured_check(ns)
    mizzen(ns, *SEED)
    traffic_checks(ns)
    mizzen(ns, "--cleanup-only")
    uncaptured_check(ns)


needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")


@needs_nft
def test_nftables_apply_idempotent_cleanup_and_traffic(ns):
    dry = mizzen(ns, "--native-nftables", "-n", *SEED).stdout
    assert "add rule ip istio-proxy-nat istio-output jump istio-redirect" in dry
    assert "add rule ip istio-proxy-nat istio-redirect meta l4proto tcp redirect to :15001" in dry
    assert run("nft", "list", "ruleset", ns=ns).stdout.strip() == ""

    mizzen(ns, "--native-nftables", *SEED)
    first = run("nft", "list", "ruleset", ns=ns).stdout
    assert "table ip istio-proxy-nat" in first
    assert "skuid 1337 return" in first
    mizzen(ns, "--native-nftables", *SEED)
    assert run("nft", "list", "ruleset", ns=ns).stdout == first

    traffic_checks(ns)

    mizzen(ns, "--native-nftables", "--cleanup-only")
    assert "istio" not in run("nft", "list", "ruleset", ns=ns).stdout
    uncaptured_check(ns)


@needs_nft
def test_nftables_tproxy_ruleset_loads(ns):
    mizzen(ns, "--native-nftables", "-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "*",
           "--redirect-dns", "--capture-all-dns")
    out = run("nft", "list", "ruleset", ns=ns).stdout
    assert "table ip istio-proxy-mangle" in out and "tproxy to :15006" in out
    assert "table ip istio-proxy-raw" in out and "ct zone set 2" in out
    mizzen(ns, "--native-nftables", "--cleanup-only")
    assert "istio" not in run("nft", "list", "ruleset", ns=ns).stdout
