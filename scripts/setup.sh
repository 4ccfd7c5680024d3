#!/usr/bin/env bash
# Installs what the project's recipes need beyond a Rust toolchain: `just`, and (best effort)
# Mosquitto, the broker `just bench-fleet` starts for its 10,000-board run, and Python's
# bsdiff4 for `just bench-delta`'s comparison. `cargo test` itself needs nothing else.
set -euo pipefail
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v just >/dev/null; then
  echo "just $(just --version | cut -d' ' -f2) already installed"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && apt-get install -y just >/dev/null 2>&1; then
  echo "installed just from apt"
else
  cargo install --locked just
fi
if command -v python3 >/dev/null && ! python3 -c "import bsdiff4" 2>/dev/null; then
  python3 -m pip install --quiet --user bsdiff4 2>/dev/null \
    || python3 -m pip install --quiet bsdiff4 2>/dev/null \
    || echo "note: could not install Python bsdiff4; just bench-plr will skip its comparison"
fi
if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then
  echo "mosquitto already installed"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] \
    && { apt-get install -y mosquitto >/dev/null 2>&1 \
         || { apt-get update >/dev/null 2>&1 && apt-get install -y mosquitto >/dev/null 2>&1; }; }; then
  # Only the binary is wanted: the bench starts its own instance on a free port.
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
  echo "installed mosquitto from apt"
else
  echo "note: could not install mosquitto (needs apt and root); just bench-fleet's 10,000-board run needs it or --broker"
fi
