//! The release store's core: content-addressed blobs, the latest signed manifest per device
//! type and channel, and the acks boards send back. In-process and synchronous, so the
//! deterministic runner calls it directly; the HTTP server is a thin shell around it.

use std::collections::HashMap;
use std::sync::Arc;

use otarig_agent::Ack;

use crate::statements::{Statements, TimestampSigner};
use sha2::{Digest, Sha256};

/// What a range request gets back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// Bytes `[offset, offset + data.len())`; shorter than asked when the blob ends.
    Bytes(Vec<u8>),
    NotFound,
    /// `offset` is at or past the end of the blob (HTTP 416).
    RangeNotSatisfiable {
        len: u64,
    },
}

/// An ack as the server recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckRecord {
    pub device: String,
    pub ack: Ack,
    /// The same (device, sequence, outcome) was acked before: counted once.
    pub duplicate: bool,
}

#[derive(Default, Debug, Clone)]
pub struct Store {
    blobs: HashMap<[u8; 32], Arc<Vec<u8>>>,
    manifests: HashMap<(String, String), Arc<Vec<u8>>>,
    /// The fleet's current key set (a signed envelope).
    keys: Option<Arc<Vec<u8>>>,
    /// Each device type's current revocation list.
    revocations: HashMap<String, Arc<Vec<u8>>>,
    timestamps: Option<Arc<TimestampSigner>>,
    acks: Vec<AckRecord>,
    served_bytes: u64,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Store a blob under its SHA-256.
    pub fn put_blob(&mut self, bytes: Vec<u8>) -> [u8; 32] {
        let h = sha256(&bytes);
        self.blobs.entry(h).or_insert_with(|| Arc::new(bytes));
        h
    }

    /// Store bytes under a hash that is not theirs (fault injection: a tampered or truncated
    /// copy served where the manifest's hash points).
    pub fn put_blob_as(&mut self, sha: [u8; 32], bytes: Vec<u8>) {
        self.blobs.insert(sha, Arc::new(bytes));
    }

    /// Every blob, for copying the store to disk.
    pub fn blobs(&self) -> impl Iterator<Item = (&[u8; 32], &Arc<Vec<u8>>)> {
        self.blobs.iter()
    }

    pub fn blob(&self, sha: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(sha).cloned()
    }

    /// Make `signed` the latest manifest for a device type and channel.
    pub fn publish(&mut self, device_type: &str, channel: &str, signed: Vec<u8>) {
        self.manifests.insert(
            (device_type.to_string(), channel.to_string()),
            Arc::new(signed),
        );
    }

    pub fn latest(&self, device_type: &str, channel: &str) -> Option<Arc<Vec<u8>>> {
        self.manifests
            .get(&(device_type.to_string(), channel.to_string()))
            .cloned()
    }

    /// Make `signed` the key set every answer carries.
    pub fn set_keys(&mut self, signed: Vec<u8>) {
        self.keys = Some(Arc::new(signed));
    }

    /// Make `signed` the revocation list of `device_type`'s answers.
    pub fn set_revocations(&mut self, device_type: &str, signed: Vec<u8>) {
        self.revocations
            .insert(device_type.to_string(), Arc::new(signed));
    }

    /// Sign a timestamp into every answer from now on.
    pub fn set_timestamps(&mut self, signer: TimestampSigner) {
        self.timestamps = Some(Arc::new(signer));
    }

    /// The key set and revocation list served to `device_type`.
    pub fn statements(&self, device_type: &str) -> Statements<'_> {
        Statements {
            keys: self.keys.as_deref().map(Vec::as_slice),
            revocations: self.revocations.get(device_type).map(|r| r.as_slice()),
        }
    }

    /// The answer to a poll that serves `manifest` to a board of `device_type` at `now_s`.
    pub fn answer(&self, device_type: &str, manifest: &[u8], now_s: u64) -> Option<Vec<u8>> {
        self.statements(device_type)
            .answer(manifest, self.timestamps.as_deref(), now_s)
            .ok()
    }

    /// Serve `len` bytes of blob `sha` from `offset` (a single HTTP Range).
    pub fn serve(&mut self, sha: &[u8; 32], offset: u64, len: u64) -> Served {
        let Some(blob) = self.blobs.get(sha) else {
            return Served::NotFound;
        };
        let total = blob.len() as u64;
        if offset >= total {
            return Served::RangeNotSatisfiable { len: total };
        }
        let end = offset.saturating_add(len).min(total);
        self.served_bytes += end - offset;
        Served::Bytes(blob[offset as usize..end as usize].to_vec())
    }

    pub fn served_bytes(&self) -> u64 {
        self.served_bytes
    }

    /// Record an ack; returns false when it repeats one already counted.
    pub fn ack(&mut self, device: &str, ack: Ack) -> bool {
        let duplicate = self.acks.iter().any(|r| {
            r.device == device
                && r.ack.sequence == ack.sequence
                && r.ack.outcome.name() == ack.outcome.name()
        });
        self.acks.push(AckRecord {
            device: device.to_string(),
            ack,
            duplicate,
        });
        !duplicate
    }

    pub fn acks(&self) -> &[AckRecord] {
        &self.acks
    }
}
