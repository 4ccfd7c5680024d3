//! # otarig-serial
//!
//! The layer that talks to ESP32-S3 boards over a serial line, real or virtual:
//! - [`flasher`]: writing images with espflash as a library (reset into the ROM loader, or no
//!   reset for the virtual board), verified by MD5;
//! - [`rom`]: the ESP32-S3 ROM serial loader protocol, as the virtual board answers it;
//! - [`pty`]: the pseudo-terminal the virtual board lives behind;
//! - [`reset`]: hard reset and power control (RTS, an external power-switch command, or the
//!   virtual board's control socket).
//!
//! It must never depend on the simulator, scenarios or the CLI: what runs on top (scenarios,
//! the console protocol's meaning, the checker) is in `otarig-hil`, and the virtual board that
//! answers this loader is in `otarig-fleet`.

pub mod flasher;
pub mod pty;
pub mod reset;
pub mod rom;

/// The serial port crate this layer is built on (for the console reader above it).
pub use serialport;
