#!/usr/bin/env bash
# The one test command: installs what is missing, builds, runs the unit tests, then the
# end-to-end tests (real Envoy, real sockets, network namespaces, iptables). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }

step "setup"
scripts/setup.sh

# Console scripts installed by pip (envoy) live beside the interpreter.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

step "format (cargo fmt --check)"
cargo fmt --all -- --check

step "build"
if [ -f Cargo.lock ]; then
  cargo build --release --workspace --locked
else
  cargo build --release --workspace
fi

step "unit tests"
cargo test --release --workspace

step "end-to-end tests"
export MIZZEN_BIN="$PWD/target/release/mizzen"
# A hard upper bound on the e2e run; each test also bounds itself.
timeout --signal=TERM --kill-after=30 1500 python3 -m pytest -q tests/e2e
