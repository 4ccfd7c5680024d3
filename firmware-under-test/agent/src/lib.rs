//! # otarig-agent
//!
//! The over-the-air update logic that ships on the board, written once and run everywhere:
//! on the ESP32-S3 inside the esp-idf-svc shell, in the simulated fleet, and in the
//! power-loss explorer.
//!
//! It is a sans-IO state machine in the style of rustls and quinn-proto: [`Agent::handle`]
//! takes an [`Input`] (boot, network up, manifest, image bytes, timer) and queues
//! [`Action`]s (fetch a byte range, publish, reboot) for the shell to carry out. It touches
//! storage only through [`Platform`], whose methods are ESP-IDF's `esp_ota_*`,
//! `esp_partition_*` and `esp_efuse_*` calls.
//!
//! What it guarantees, and the simulator checks on every scenario:
//! - nothing is written to the boot selection before the image is complete, hashes to the
//!   signed manifest's SHA-256 and passes `esp_ota_end`'s validation;
//! - a power cut at any flash operation resumes the download from its last durable checkpoint
//!   (see [`journal`]) rather than from zero, and never leaves the board without a bootable
//!   image;
//! - a new image confirms itself only after its self-test passed and it reached the network,
//!   otherwise it rolls back (ESP-IDF `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`);
//! - manifests are refused, with the name of the failed [`Check`], when the signature, device
//!   type, expiry, sequence number or anti-rollback `secure_version` is wrong.
//!
//! `#![no_std]` + `alloc`; no heap buffer grows with the image size.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod agent;
pub mod chunk;
pub mod cipher;
pub mod console;
pub mod delta;
pub mod event;
#[doc(hidden)]
pub mod fault;
pub mod image;
pub mod journal;
pub mod manifest;
pub mod platform;
pub mod protocol;
pub mod trust;

pub use agent::{
    Action, Activity, Agent, Config, FetchMode, Input, Peer, Telemetry, MAX_SEQUENCE_STEP,
};
pub use event::{Ack, Check, Event, Outcome};
pub use manifest::{Manifest, PublicKey, SignedManifest, TrustedKey};
pub use platform::{EspError, EspResult, OtaImgState, Platform, Slot, SlotKind};
