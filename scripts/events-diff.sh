#!/usr/bin/env bash
# Compare the event streams of every scenario at a git revision and in the working tree.
#   scripts/events-diff.sh REV        (e.g. HEAD~1, main)
# Runs are deterministic per seed, so a change that must not alter behaviour (a refactoring)
# must leave every NAME.jsonl byte-identical. Exit 0 when they are, 1 with the diff otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/events-diff.sh REV}"
out="target/events-diff"
rm -rf "$out"
mkdir -p "$out"
git worktree add --detach --force "$out/base" "$rev" >/dev/null
trap 'git worktree remove --force "$out/base" >/dev/null 2>&1 || true' EXIT
# One target directory for both builds: dependencies compile once.
export CARGO_TARGET_DIR="$PWD/target"
# A revision from before the crate split still names its binary package `otarig`.
(cd "$out/base" && cargo build -p otarig --quiet)
cp target/debug/otarig "$out/otarig-base"
cargo build -p otarig --quiet
cp target/debug/otarig "$out/otarig-here"
"$out/otarig-base" run --events "$out/base-events" scenarios/*.toml scenarios/attacks/*.toml >/dev/null || true
"$out/otarig-here" run --events "$out/here-events" scenarios/*.toml scenarios/attacks/*.toml >/dev/null || true
if diff -r "$out/base-events" "$out/here-events"; then
  echo "event streams identical: $(ls "$out/here-events" | wc -l) scenarios, $rev vs the working tree"
else
  echo "event streams differ between $rev and the working tree (above)" >&2
  exit 1
fi
