//! # otarig-esp32s3
//!
//! A simulated ESP32-S3 as ESP-IDF v5.x sees it, usable on its own by anyone who wants a
//! faithful flash and bootloader model:
//! - [`flash`]: NOR flash (4 KiB sectors erase to 0xFF, programs only clear bits), numbered
//!   flash operations, power cuts that tear the operation they land on, and copy-on-write
//!   sectors shared between boards;
//! - [`partition`]: ESP-IDF's partition table (CSV and the binary at 0x8000);
//! - [`otadata`]: the two `esp_ota_select_entry_t` sectors;
//! - [`appimage`]: ESP-IDF app images that carry what the simulated app does when it boots;
//! - [`board`]: eFuse, the 2nd stage bootloader with rollback and anti-rollback, and
//!   `esp_ota_ops` as the agent's `Platform`;
//! - [`boot_log`]: what the ROM and the bootloader print on the console.
//!
//! Depends on `otarig-agent`'s traits and image format only. It must never depend on the
//! server, scenarios, networking or an async runtime: a chip knows nothing of who updates it.

pub mod appimage;
pub mod board;
pub mod boot_log;
pub mod flash;
pub mod nvs;
pub mod otadata;
pub mod partition;
