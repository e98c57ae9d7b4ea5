#!/usr/bin/env bash
# Installs what `make run` and `make test` need on a bare Debian machine: the system packages
# (PostgreSQL, Redis, a JRE, Maven, promtool) and the project in .venv. Safe to re-run; changes
# nothing that is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null \
  || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1 || true)
[ "${java_major:-0}" -ge 17 ] 2>/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
# promtool checks and unit-tests the alert rules (tests/unit/test_alert_rules.py); Debian ships it
# in the prometheus package.
command -v promtool >/dev/null || missing+=(prometheus)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "bootstrap: missing ${missing[*]} and no root. Fix: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  # Only promtool is wanted, but the package also enables and starts a Prometheus server on
  # :9090 (the port of the compose stack's Prometheus). Stop and disable the one just installed.
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
    if [ -d /run/systemd/system ]; then
      "${as_root[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
      "${as_root[@]}" invoke-rc.d prometheus stop >/dev/null 2>&1 || true
      "${as_root[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
  fi
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: Python >= 3.11 needed, found $(python3 --version). Fix: apt-get install -y python3.11" >&2
  exit 1
}
# The stream's native pgoutput decoder (native/, Rust) is built by uv sync, with cargo: rustup
# puts it in ~/.cargo/bin, which a non-login shell may not have on its PATH.
command -v cargo >/dev/null || [ ! -x "$HOME/.cargo/bin/cargo" ] || export PATH="$HOME/.cargo/bin:$PATH"
rust_version=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p' || true)
if ! command -v cargo >/dev/null || [ "$(printf '%s\n' 1.85 "${rust_version:-0}" | sort -V | head -n1)" != 1.85 ]; then
  echo "bootstrap: Rust >= 1.85 with cargo is needed to build native/ (found: ${rust_version:-none})." \
    "Fix: install it with rustup (https://rustup.rs), or 'rustup update', then re-run" >&2
  exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q --disable-pip-version-check 'uv>=0.5'
# --inexact keeps uv itself (and pip) in the venv; --frozen installs exactly uv.lock.
# Bytecode is compiled here, once: where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this was built on) Python never caches it, and every process (a stream, each Dagster run)
# compiled its imports again at start: a stream's imports 1.7-2.2 s instead of 0.7 s, loading
# the Dagster definitions 3.1 s instead of 1.5 s.
UV_LINK_MODE=copy .venv/bin/uv sync -q --frozen --inexact --extra dev --compile-bytecode
.venv/bin/python -m compileall -q engagement_dagster >/dev/null
