//! # otarig
//!
//! A simulated ESP32-S3 fleet for testing over-the-air updates: faithful boards (NOR flash,
//! partition table, otadata, bootloader with rollback and anti-rollback, eFuse), the release
//! store, scenario files, the deterministic runner and the expectations checker. The update
//! logic itself is `otarig-agent`, the same crate that runs on the real board.
//!
//! Module map:
//! - [`flash`], [`partition`], [`otadata`], [`board`]: the simulated hardware and ESP-IDF;
//! - [`appimage`]: building ESP-IDF app images that carry a simulated behaviour;
//! - [`keys`], [`store`], [`release_store`], [`cid`], [`server`]: signing releases and serving them;
//! - [`scenario`], [`runner`], [`expect`], [`summary`]: scenarios, runs and their verdicts.

pub mod appimage;
pub mod board;
pub mod board_http;
pub mod broker;
pub mod cid;
pub mod delta;
pub mod expect;
pub mod flash;
pub mod fleet;
pub mod fuzzing;
pub mod hil;
pub mod keys;
pub mod otadata;
pub mod partition;
pub mod plr;
pub mod release_store;
pub mod rollout;
pub mod runner;
pub mod scenario;
pub mod server;
pub mod store;
pub mod summary;
pub mod virtual_board;
