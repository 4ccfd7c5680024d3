//! The parts of esp-idf-svc 0.52 and esp-idf-sys 0.37 this shell uses, declared with the
//! same paths, names and signatures, so that the shell type-checks on the host
//! (`cargo check`, run by `cargo test` in `sim/scenario/tests/firmware_shell.rs`). Every item
//! says where its signature comes from. Compiled only when the target is not ESP-IDF, and
//! never linked or run: the host build's `main` does not reach the shell.
//!
//! What this checks: every call the shell makes exists with these argument and result types
//! (the `esp_err_t` constants are `i32`, as esp-idf-sys's bindgen callback generates them).
//! What it cannot check: the signatures themselves against a real ESP-IDF build, and
//! anything at run time.

pub mod eventloop;
pub mod hal;
pub mod handle;
pub mod http;
pub mod io;
pub mod log;
pub mod mqtt;
pub mod nvs;
pub mod sntp;
pub mod sys;
pub mod tls;
pub mod wifi;

/// What a host-only declaration does if it were ever called: nothing can be run on the host.
#[track_caller]
pub(crate) fn host_only() -> ! {
    panic!("esp-idf-svc is not available on the host: this shell runs on an ESP32-S3 only")
}
