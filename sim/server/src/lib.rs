//! # otarig-server
//!
//! The fleet operator's side of an OTA update, usable without any simulated board:
//! - [`keys`]: signing keys (PKCS#8 PEM) and their public halves as firmware compiles them in;
//! - [`store`]: the in-process core (blobs by SHA-256, latest signed manifest per device type
//!   and channel, acks), called directly by the deterministic runner;
//! - [`release_store`]: the same on disk, with the signed, hash-chained release log;
//! - [`cid`]: IPFS-compatible CIDs of release blobs;
//! - [`delta`]: making delta patches (the agent applies them);
//! - [`chunked`]: the chunked OTA protocol's sessions and frames (`/ota/*`);
//! - [`rollout`]: staged rollouts that halt on failures;
//! - [`server`]: the HTTP server around the store, with injectable faults.
//!
//! It must never depend on the simulated chip (`otarig-esp32s3`), scenario files, the fleet or
//! the HIL layer: the server serves real boards exactly as it serves simulated ones.

pub mod chunked;
pub mod cid;
pub mod delta;
pub mod encrypt;
pub mod keys;
pub mod pki;
pub mod release_store;
pub mod rollout;
pub mod server;
pub mod statements;
pub mod store;
pub mod tls;
