#!/usr/bin/env bash
# Installs what the tests and recipes need beyond a Rust toolchain: Mosquitto (the tests start
# it from PATH for mutual TLS; `just bench-fleet` for its 10,000-board run), `just`, and (best
# effort) Python's bsdiff4 for `just bench-delta`'s comparison. Idempotent; starts no service.
set -euo pipefail
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

# apt-get install, refreshing the package lists once if the first try fails (a fresh machine).
apt_install() {
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || return 1
  apt-get install -y "$@" >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y "$@" >/dev/null 2>&1; }
}

if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then
  echo "mosquitto already installed"
elif apt_install mosquitto; then
  # Only the binary is wanted: tests and benches start their own instances on free ports.
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
  echo "installed mosquitto from apt"
else
  echo "error: could not install mosquitto (needs apt and root): install it yourself (Debian/Ubuntu: apt install mosquitto; macOS: brew install mosquitto); the tests start it from PATH" >&2
  exit 1
fi

if command -v just >/dev/null; then
  echo "just $(just --version | cut -d' ' -f2) already installed"
elif apt_install just; then
  echo "installed just from apt"
else
  cargo install --locked just
fi

if command -v python3 >/dev/null && ! python3 -c "import bsdiff4" 2>/dev/null; then
  python3 -m pip install --quiet --user bsdiff4 2>/dev/null \
    || python3 -m pip install --quiet bsdiff4 2>/dev/null \
    || echo "note: could not install Python bsdiff4; just bench-plr will skip its comparison"
fi
