# The commands people type. `just --list` shows them.

# Run every test: unit tests, every scenario (with its can_fail and replays twins), heap figure.
test:
    cargo test --workspace

# Run scenarios on the simulator and print a summary (default: all of them).
run *FILES="scenarios/*.toml":
    cargo run --release -p otarig -- run {{FILES}}

# Check scenario files without running them.
check *FILES="scenarios/*.toml":
    cargo run --release -p otarig -- check {{FILES}}

# Print the agent's peak heap during a 1 MiB update.
heap:
    cargo test -p otarig --test agent_heap -- --nocapture

# Formatting and lints, as CI expects them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Build the agent crate alone, as firmware would (no_std, no std features of dependencies).
agent:
    cargo build -p otarig-agent
