# The commands people type. `just --list` shows them.

# Run every test: unit tests, every scenario (with its can_fail and replays twins), heap figure.
test:
    cargo test --workspace

# Run scenarios on the simulator and print a summary (default: all of them).
run *FILES="scenarios/*.toml scenarios/attacks/*.toml":
    cargo run --release -p otarig -- run {{FILES}}

# Example: just fleet scenarios/rollout-halt.toml --devices 1000
# Run scenarios with every board on real sockets (embedded broker and firmware server).
fleet *ARGS:
    cargo run --release -p otarig -- fleet {{ARGS}}

# Check scenario files without running them.
check *FILES="scenarios/*.toml scenarios/attacks/*.toml":
    cargo run --release -p otarig -- check {{FILES}}

# Print the agent's peak heap during a 1 MiB update.
heap:
    cargo test -p otarig-scenario --test agent_heap -- --nocapture

# Formatting and lints, as CI expects them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo fmt --manifest-path firmware-under-test/esp32s3/Cargo.toml -- --check
    cargo clippy --manifest-path firmware-under-test/esp32s3/Cargo.toml --target-dir target/fw-host-check --all-targets -- -D warnings

# Refactoring check: every scenario's event stream at REV and in the working tree must match.
events-diff REV="HEAD":
    scripts/events-diff.sh {{REV}}

# Build the agent crate alone, as firmware would (no_std, no std features of dependencies).
agent:
    cargo build -p otarig-agent

# Power-loss explorer, exhaustive, on one scenario: just plr scenarios/delta-update.toml
plr FILE *ARGS:
    cargo run --release -p otarig -- plr {{FILE}} --exhaustive {{ARGS}}

# Nightly-style random power-loss fuzzing over every scenario within a budget (e.g. 10m).
fuzz-plr DURATION="10m":
    scripts/fuzz-plr.sh {{DURATION}}

# libFuzzer on one parser: just fuzz manifest 60 (targets: manifest patch image scenario
# partition_table bsdiff40 mqtt_payloads serial signed_bodies journal_and_otadata release_log
# applier_resume http_server nvs_image encrypted_image chunk_frames). Needs `cargo install cargo-fuzz`; RUSTC_BOOTSTRAP lets stable
# Rust take the nightly flags cargo-fuzz passes.
fuzz TARGET SECONDS="60":
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz/targets {{TARGET}} -- -max_total_time={{SECONDS}}

# Exhaustive power-loss runs over 1 MiB full, delta, encrypted (both formats) and chunked updates, then patch sizes and
# apply throughput against Python bsdiff4.
bench-plr:
    cargo run --release -p otarig -- bench plr
    cargo run --release -p otarig -- bench delta

# Decrypt throughput of encrypted images (AES-256-CBC, esp_encrypted_img) next to SHA-256, and
# the chunked protocol's per-chunk HMAC check.
bench-crypto:
    cargo run --release -p otarig -- bench crypto

# Patch sizes and apply throughput against Python bsdiff4 (pip install bsdiff4).
bench-delta:
    cargo run --release -p otarig -- bench delta

# Scale: 1,000 then 10,000 boards each update a 1 MiB image through a real broker and the
# firmware server. Up to 1,000 boards run in one process with the embedded broker; more run in
# shard processes against a Mosquitto the command starts (scripts/setup.sh installs it).
# Every size runs; the recipe fails if any did.
bench-fleet *SIZES="1000 10000":
    cargo build --release -p otarig
    status=0; for n in {{SIZES}}; do ./target/release/otarig bench fleet --devices $n || status=1; done; exit $status

# The same over mutual TLS: HTTPS and MQTTS (Mosquitto), a certificate per board.
bench-fleet-tls *SIZES="1000 10000":
    cargo build --release -p otarig
    status=0; for n in {{SIZES}}; do ./target/release/otarig bench fleet --devices $n --tls || status=1; done; exit $status

# A virtual ESP32-S3 behind a pty, for `just hil` without hardware (Linux). Prints its port.
board *ARGS:
    cargo run --release -p otarig -- board --pty {{ARGS}}

# A real board needs bench/bench.toml (see bench/bench.example.toml); a /dev/pts/N port of
# `just board` is found by its control socket. Without scenarios: every scenarios/*.toml and scenarios/attacks/*.toml.
# Run scenarios on one board over its serial port: just hil --port COM9 [SCENARIO...]
hil *ARGS:
    cargo run --release -p otarig -- hil {{ARGS}}

# Needs the Espressif Rust toolchain (espup install; see the README's bench section).
# Build the ESP32-S3 firmware under test and its variants into firmware-under-test/esp32s3/dist.
fw-build *VERSIONS="1.0.0 2.0.0 3.0.0":
    firmware-under-test/esp32s3/build-variants.sh {{VERSIONS}}
