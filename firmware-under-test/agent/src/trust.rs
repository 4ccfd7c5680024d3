//! The signed statements that travel with a manifest and decide whether to believe it: the key
//! set (which keys sign releases), the revocation list (which releases are withdrawn) and the
//! timestamp (what is current, and until when). TUF's root, targets-revocation and timestamp
//! roles, cut to what a board with a few KiB of RAM can hold.
//!
//! - A **key set** is signed by a root key compiled into the firmware ([`Context::KeySet`]). It
//!   names the release keys (manifests, revocation lists, commands) and the timestamp keys, with
//!   a version that only goes up. A board keeps the version and a digest of the newest set it
//!   accepted in its journal, not the set itself: every answer carries the set again, so an old
//!   set (with a compromised key) is refused for good once a newer one was seen. A set may
//!   carry `sequence_base`, the highest installed sequence a board takes on when it adopts the
//!   set: how the root undoes a fast-forward made with a compromised release key.
//! - A **revocation list** is signed by a release key ([`Context::Revocations`]) for one device
//!   type: sequences and images no board may install, with a serial that only goes up (kept in
//!   the journal when an install starts, so a stripped or older list is noticed).
//! - A **timestamp** is signed by an online timestamp key ([`Context::Timestamp`]) at every
//!   answer, valid for minutes: it names the manifest the server serves now and the revocation
//!   list's serial. A board with a set clock that requires it refuses a manifest without a
//!   fresh timestamp that names it, so a mirror cannot freeze a board on an old (but unexpired)
//!   release, nor hide a revocation, for longer than the timestamp's lifetime.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{self, Alg, Context, EnvelopeError, PublicKey, SignedManifest, TrustedKey};

/// Keys of one role in a key set, at most.
pub const MAX_KEYS: usize = 4;
/// Entries of each kind in a revocation list, at most.
pub const MAX_REVOKED: usize = 32;

/// One public key in a key set: `public` is base64 of the raw 32 Ed25519 bytes or the RSA
/// key's PKCS#1 DER.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    pub alg: Alg,
    pub public: String,
}

impl KeyEntry {
    fn trusted(&self) -> Result<TrustedKey, String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.public.as_bytes())
            .map_err(|e| format!("key '{}' is not base64: {e}", self.id))?;
        let key = match self.alg {
            Alg::Ed25519 => <&[u8; 32]>::try_from(raw.as_slice())
                .ok()
                .and_then(|r| PublicKey::ed25519(r).ok()),
            Alg::RsaPkcs1v15Sha256 => PublicKey::rsa_pkcs1_der(&raw).ok(),
        };
        let key =
            key.ok_or_else(|| format!("key '{}' is not a valid {:?} key", self.id, self.alg))?;
        Ok(TrustedKey {
            id: self.id.clone(),
            key,
        })
    }
}

/// What a root key signs: the keys that sign everything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetBody {
    /// Above every earlier set's; version 0 is the firmware's compiled-in keys.
    pub version: u32,
    /// Keys that sign manifests, revocation lists and commands.
    pub release: Vec<KeyEntry>,
    /// Keys that sign timestamps.
    #[serde(default)]
    pub timestamp: Vec<KeyEntry>,
    /// When set, a board adopting this set takes this as its highest installed sequence,
    /// even if that is lower: the recovery from a fast-forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_base: Option<u64>,
}

/// A key set whose root signature verified, ready to check signatures with.
#[derive(Clone, Debug)]
pub struct KeySet {
    pub version: u32,
    /// The first 16 bytes of the SHA-256 of the signed body: two different sets with the same
    /// version are told apart.
    pub digest: [u8; 16],
    pub release: Vec<TrustedKey>,
    pub timestamp: Vec<TrustedKey>,
    pub sequence_base: Option<u64>,
}

/// A release key holder's list of withdrawn releases for one device type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationsBody {
    pub device_type: String,
    /// Above every earlier list's for the device type.
    pub serial: u64,
    #[serde(default)]
    pub sequences: Vec<u64>,
    /// SHA-256 (hex) of withdrawn images.
    #[serde(default)]
    pub images: Vec<String>,
}

impl RevocationsBody {
    /// Whether the release `sequence` with image `sha256` is withdrawn.
    pub fn revokes(&self, sequence: u64, sha256: &[u8; 32]) -> bool {
        self.sequences.contains(&sequence)
            || self
                .images
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&hex::encode(sha256)))
    }
}

/// The server's short-lived statement of what is current.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampBody {
    pub device_type: String,
    pub channel: String,
    /// The manifest served with it: its sequence and image hash.
    pub sequence: u64,
    pub sha256: String,
    /// Serial of the revocation list served with it (0: none).
    pub revocations: u64,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
}

/// Why a key set, revocation list or timestamp was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatementError {
    Envelope(EnvelopeError),
    Body(String),
}

impl core::fmt::Display for StatementError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StatementError::Envelope(e) => e.fmt(f),
            StatementError::Body(why) => f.write_str(why),
        }
    }
}

fn open<T: for<'de> Deserialize<'de>>(
    env: &SignedManifest,
    keys: &[TrustedKey],
    ctx: Context,
) -> Result<(T, Vec<u8>), StatementError> {
    let body = manifest::verify_parsed(env, keys, ctx).map_err(StatementError::Envelope)?;
    let parsed = serde_json::from_slice(&body)
        .map_err(|e| StatementError::Body(format!("{}: {e}", what(ctx))))?;
    Ok((parsed, body))
}

fn what(ctx: Context) -> &'static str {
    match ctx {
        Context::KeySet => "key set",
        Context::Revocations => "revocation list",
        Context::Timestamp => "timestamp",
        _ => "statement",
    }
}

/// Verify a key set against the root keys and read its keys.
pub fn open_keyset(env: &SignedManifest, roots: &[TrustedKey]) -> Result<KeySet, StatementError> {
    let (b, body): (KeySetBody, _) = open(env, roots, Context::KeySet)?;
    if b.release.is_empty() || b.release.len() > MAX_KEYS || b.timestamp.len() > MAX_KEYS {
        return Err(StatementError::Body(format!(
            "key set v{} names {} release and {} timestamp keys (1 to {MAX_KEYS} release keys, at most {MAX_KEYS} timestamp keys)",
            b.version,
            b.release.len(),
            b.timestamp.len()
        )));
    }
    let convert = |entries: &[KeyEntry]| -> Result<Vec<TrustedKey>, StatementError> {
        entries
            .iter()
            .map(|e| e.trusted().map_err(StatementError::Body))
            .collect()
    };
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&Sha256::digest(&body)[..16]);
    Ok(KeySet {
        version: b.version,
        digest,
        release: convert(&b.release)?,
        timestamp: convert(&b.timestamp)?,
        sequence_base: b.sequence_base,
    })
}

/// Verify a revocation list against the release keys.
pub fn open_revocations(
    env: &SignedManifest,
    keys: &[TrustedKey],
) -> Result<RevocationsBody, StatementError> {
    let (b, _): (RevocationsBody, _) = open(env, keys, Context::Revocations)?;
    if b.sequences.len() > MAX_REVOKED || b.images.len() > MAX_REVOKED {
        return Err(StatementError::Body(format!(
            "revocation list {} holds {} sequences and {} images (at most {MAX_REVOKED} of each)",
            b.serial,
            b.sequences.len(),
            b.images.len()
        )));
    }
    Ok(b)
}

/// Verify a timestamp against the timestamp keys.
pub fn open_timestamp(
    env: &SignedManifest,
    keys: &[TrustedKey],
) -> Result<TimestampBody, StatementError> {
    open(env, keys, Context::Timestamp).map(|(b, _)| b)
}

impl TimestampBody {
    /// The statement for what a server answers now.
    pub fn new(
        m: &manifest::Manifest,
        revocations: u64,
        issued_at: u64,
        valid_for: u64,
    ) -> TimestampBody {
        TimestampBody {
            device_type: m.device_type.to_string(),
            channel: m.channel.to_string(),
            sequence: m.sequence,
            sha256: m.sha256.clone(),
            revocations,
            issued_at,
            expires_at: issued_at.saturating_add(valid_for),
        }
    }
}

/// The entry of a key set for a trusted key (host side: `otarig keys rotate`).
pub fn key_entry(k: &TrustedKey) -> Result<KeyEntry, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let public = match &k.key {
        PublicKey::Ed25519(vk) => b64.encode(vk.to_bytes()),
        PublicKey::Rsa(pk) => {
            use rsa::pkcs1::EncodeRsaPublicKey;
            let der = pk.to_pkcs1_der().map_err(|e| e.to_string())?;
            b64.encode(der.as_bytes())
        }
    };
    Ok(KeyEntry {
        id: k.id.clone(),
        alg: k.key.alg(),
        public,
    })
}
