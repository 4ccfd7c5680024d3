#!/usr/bin/env bash
# Installs what the project's recipes need beyond a Rust toolchain: `just`.
# `cargo test` itself needs nothing else (no system libraries, no services).
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
