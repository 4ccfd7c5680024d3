//! The statements served with a manifest ([`otarig_agent::trust`]): key sets a root key signs,
//! revocation lists a release key signs, and the timestamps the server signs at each answer.

use anyhow::Context as _;
use base64::Engine as _;
use otarig_agent::manifest::{Context, Manifest, SignedManifest};
use otarig_agent::protocol;
use otarig_agent::trust::{self, KeySetBody, RevocationsBody, TimestampBody};

use crate::keys::NamedKey;

/// The server's online key for timestamps and how long each one is valid.
#[derive(Clone, Debug)]
pub struct TimestampSigner {
    pub key: NamedKey,
    pub valid_for_s: u64,
}

/// Default lifetime of a timestamp: long enough for a board to poll, fetch and start an
/// install, short enough that a frozen answer goes stale within a poll or two.
pub const TIMESTAMP_VALID_FOR_S: u64 = 10 * 60;

impl TimestampSigner {
    /// A timestamp for the manifest `manifest_env` (an envelope's JSON bytes) and revocation
    /// list `revocations` (0: none), issued at `now_s`.
    pub fn sign(
        &self,
        manifest_env: &[u8],
        revocations: u64,
        now_s: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let m: Manifest = serde_json::from_slice(&body_unverified(manifest_env)?)
            .context("the served manifest's body is not a manifest")?;
        let body = TimestampBody::new(&m, revocations, now_s, self.valid_for_s);
        Ok(self
            .key
            .sign_envelope(Context::Timestamp, &serde_json::to_vec(&body)?))
    }
}

/// The body of a signed envelope, signature unchecked: the server reads what it serves itself.
pub fn body_unverified(env: &[u8]) -> anyhow::Result<Vec<u8>> {
    let e: SignedManifest = serde_json::from_slice(env).context("not a signed envelope")?;
    base64::engine::general_purpose::STANDARD
        .decode(e.manifest.as_bytes())
        .context("the envelope's body is not base64")
}

/// A revocation list's serial (0 when it cannot be read).
pub fn revocations_serial(env: &[u8]) -> u64 {
    body_unverified(env)
        .ok()
        .and_then(|b| serde_json::from_slice::<RevocationsBody>(&b).ok())
        .map_or(0, |r| r.serial)
}

/// What the statements of one device type's answers are.
#[derive(Clone, Copy, Debug, Default)]
pub struct Statements<'a> {
    /// The fleet's current key set.
    pub keys: Option<&'a [u8]>,
    /// The device type's revocation list.
    pub revocations: Option<&'a [u8]>,
}

impl Statements<'_> {
    /// The answer to a poll: the manifest, the statements, and (with a signer) a fresh
    /// timestamp.
    pub fn answer(
        &self,
        manifest: &[u8],
        timestamps: Option<&TimestampSigner>,
        now_s: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let serial = self.revocations.map_or(0, revocations_serial);
        let ts = timestamps
            .map(|s| s.sign(manifest, serial, now_s))
            .transpose()?;
        protocol::release_payload(manifest, self.keys, self.revocations, ts.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The retained announcement: the same without a timestamp (it would go stale on the
    /// broker; a board that requires one polls for it).
    pub fn announcement(&self, manifest: &[u8]) -> anyhow::Result<Vec<u8>> {
        protocol::release_payload(manifest, self.keys, self.revocations, None)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// A key set signed by `root`: `release` keys sign manifests, revocation lists and commands,
/// `timestamp` keys sign timestamps; boards adopting it take `sequence_base` (if any) as their
/// highest installed sequence.
pub fn key_set(
    root: &NamedKey,
    version: u32,
    release: &[NamedKey],
    timestamp: &[NamedKey],
    sequence_base: Option<u64>,
) -> anyhow::Result<Vec<u8>> {
    if version == 0 {
        anyhow::bail!("key set version 0 is the firmware's own keys; start at 1");
    }
    if release.is_empty() || release.len() > trust::MAX_KEYS || timestamp.len() > trust::MAX_KEYS {
        anyhow::bail!(
            "a key set names 1 to {} release keys and at most {} timestamp keys",
            trust::MAX_KEYS,
            trust::MAX_KEYS
        );
    }
    let entries = |keys: &[NamedKey]| -> anyhow::Result<Vec<trust::KeyEntry>> {
        keys.iter()
            .map(|k| trust::key_entry(&k.trusted()?).map_err(|e| anyhow::anyhow!("{e}")))
            .collect()
    };
    let body = KeySetBody {
        version,
        release: entries(release)?,
        timestamp: entries(timestamp)?,
        sequence_base,
    };
    Ok(root.sign_envelope(Context::KeySet, &serde_json::to_vec(&body)?))
}

/// A revocation list for `device_type`, signed by a release key.
pub fn revocation_list(key: &NamedKey, body: &RevocationsBody) -> anyhow::Result<Vec<u8>> {
    if body.sequences.len() > trust::MAX_REVOKED || body.images.len() > trust::MAX_REVOKED {
        anyhow::bail!(
            "a revocation list holds at most {} sequences and {} images (boards refuse longer ones)",
            trust::MAX_REVOKED,
            trust::MAX_REVOKED
        );
    }
    Ok(key.sign_envelope(Context::Revocations, &serde_json::to_vec(body)?))
}
