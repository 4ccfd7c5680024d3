#!/usr/bin/env bash
# Installs what the project's recipes need beyond a Rust toolchain: `just`, and (best effort,
# for `just bench-plr`'s comparison) Python's bsdiff4. `cargo test` itself needs nothing else.
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
