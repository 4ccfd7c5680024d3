//! Signed release manifests: the format, and the signature check the board runs on them.
//!
//! A manifest travels as a [`SignedManifest`] envelope: the manifest's JSON bytes (base64) plus
//! a detached signature over exactly those bytes, behind a [`Context`] label. Signing the bytes
//! rather than a re-serialised structure means the board never has to canonicalise JSON to
//! check a signature; the label keeps a signature made for one purpose from serving another.
//!
//! Two signature schemes are accepted, as ESP32 fleets use both: Ed25519, and RSA-2048
//! PKCS#1 v1.5 with SHA-256 (the scheme of ESP-IDF's secure boot v2 tooling keys).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use base64::Engine as _;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Manifests larger than this are refused before parsing: a board has little RAM to spare.
pub const MAX_SIGNED_MANIFEST_LEN: usize = 8 * 1024;
/// The manifest format this agent understands.
pub const FORMAT: u32 = 1;

/// What a release says about one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version; this agent reads [`FORMAT`].
    pub format: u32,
    pub device_type: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    /// The app's version string, as in `esp_app_desc_t::version`.
    pub version: String,
    /// The app's `esp_app_desc_t::secure_version` (anti-rollback counter).
    pub secure_version: u32,
    /// Strictly increasing per device type across all releases; a board never accepts a
    /// sequence number below the highest it has installed (replay protection).
    pub sequence: u64,
    /// Image length in bytes.
    pub size: u32,
    /// SHA-256 of the image, lowercase hex. Also its address in the release store.
    pub sha256: String,
    /// Where to fetch it; `None` means the firmware server's blob path for `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// IPFS-compatible CID of the image, an alias for `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// Delta patches to this image, keyed by the SHA-256 of the image each applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaRef>,
    /// Set when the image travels encrypted: what is fetched is then ciphertext, while
    /// `size` and `sha256` still describe the plaintext image that lands in the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Unix seconds at which the release was signed.
    pub issued_at: u64,
    /// Unix seconds after which a board refuses the manifest.
    pub expires_at: u64,
}

/// How an encrypted image is fetched and decrypted ([`crate::cipher`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub scheme: Scheme,
    /// Which image key decrypts it ([`crate::cipher::ImageKeys::key_id`]): a board without
    /// that key refuses the release before fetching a byte.
    pub key_id: String,
    /// SHA-256 of the ciphertext, lowercase hex: its address in the release store.
    pub sha256: String,
    /// Ciphertext length in bytes.
    pub size: u32,
    /// AES-256-CBC: the release's IV, 32 hex digits. esp_encrypted_img carries its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iv: Option<String>,
}

/// The encryption formats a board can decrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// AES-256-CBC with PKCS#7 padding under a fleet key; the IV is in the manifest.
    #[serde(rename = "aes-256-cbc")]
    Aes256Cbc,
    /// ESP-IDF's pre-encrypted OTA format (component `esp_encrypted_img`, RSA-3072 scheme):
    /// a 512-byte header with the AES-256-GCM key wrapped for the board's RSA key.
    #[serde(rename = "esp-encrypted-img")]
    EspEncryptedImg,
}

impl Scheme {
    pub const fn name(self) -> &'static str {
        match self {
            Scheme::Aes256Cbc => "aes-256-cbc",
            Scheme::EspEncryptedImg => "esp-encrypted-img",
        }
    }
}

/// A delta patch offered by a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaRef {
    /// SHA-256 of the image the patch applies to (the running image must match).
    pub from_sha256: String,
    /// SHA-256 of the patch file, its address in the release store.
    pub sha256: String,
    /// Patch length in bytes.
    pub size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl DeltaRef {
    pub fn from_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.from_sha256, &mut out).ok()?;
        Some(out)
    }

    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut out).ok()?;
        Some(out)
    }
}

fn default_channel() -> String {
    "stable".to_string()
}

impl Manifest {
    /// A manifest for `version` of `device_type` on `channel`, issued at `issued_at` (Unix
    /// seconds) and valid for `valid_for` seconds, with no image yet: the release store fills
    /// in size and hash when it publishes the image.
    pub fn draft(
        device_type: &str,
        channel: &str,
        version: &str,
        sequence: u64,
        issued_at: u64,
        valid_for: u64,
    ) -> Manifest {
        Manifest {
            format: FORMAT,
            device_type: device_type.to_string(),
            channel: channel.to_string(),
            version: version.to_string(),
            secure_version: 0,
            sequence,
            size: 0,
            sha256: String::new(),
            url: None,
            cid: None,
            deltas: Vec::new(),
            encryption: None,
            issued_at,
            expires_at: issued_at.saturating_add(valid_for),
        }
    }

    /// The image hash as bytes, if `sha256` is 64 hex digits.
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut out).ok()?;
        Some(out)
    }
}

/// Signature scheme of a [`SignedManifest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Alg {
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "rsa-pkcs1v15-sha256")]
    RsaPkcs1v15Sha256,
}

/// The envelope that travels over MQTT and HTTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// Base64 (standard, padded) of the manifest's JSON bytes; the signature covers these.
    pub manifest: String,
    /// Which trusted key signed it.
    pub key_id: String,
    pub alg: Alg,
    /// Base64 of the signature.
    pub signature: String,
}

/// A public key compiled into the firmware.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub id: String,
    pub key: PublicKey,
}

#[derive(Clone, Debug)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
}

impl PublicKey {
    /// An Ed25519 key from its 32 raw bytes.
    pub fn ed25519(raw: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(raw)
            .map(PublicKey::Ed25519)
            .map_err(|_| KeyError)
    }

    /// An RSA key from its PKCS#1 DER (`RSAPublicKey`). Only 2048-bit keys are accepted.
    pub fn rsa_pkcs1_der(der: &[u8]) -> Result<Self, KeyError> {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPublicKey::from_pkcs1_der(der).map_err(|_| KeyError)?;
        if key.size() != 256 {
            return Err(KeyError);
        }
        Ok(PublicKey::Rsa(key))
    }

    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Ed25519(_) => Alg::Ed25519,
            PublicKey::Rsa(_) => Alg::RsaPkcs1v15Sha256,
        }
    }
}

/// A key's bytes are not a valid key of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyError;

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a valid Ed25519 key or 2048-bit RSA public key")
    }
}

impl core::error::Error for KeyError {}

/// Why a manifest's envelope or signature was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvelopeError {
    TooLarge(usize),
    Malformed(String),
    UnknownKey(String),
    AlgMismatch { key_id: String },
    BadSignature { key_id: String },
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::TooLarge(n) => write!(
                f,
                "signed manifest is {n} bytes, more than the {MAX_SIGNED_MANIFEST_LEN} a board accepts"
            ),
            EnvelopeError::Malformed(why) => write!(f, "malformed manifest: {why}"),
            EnvelopeError::UnknownKey(id) => {
                write!(f, "signed by key '{id}', which this firmware does not trust")
            }
            EnvelopeError::AlgMismatch { key_id } => {
                write!(f, "algorithm does not match trusted key '{key_id}'")
            }
            EnvelopeError::BadSignature { key_id } => {
                write!(f, "signature does not verify with trusted key '{key_id}'")
            }
        }
    }
}

impl EnvelopeError {
    /// Signature problems and parse problems are different refusals.
    pub fn is_signature(&self) -> bool {
        matches!(
            self,
            EnvelopeError::UnknownKey(_)
                | EnvelopeError::AlgMismatch { .. }
                | EnvelopeError::BadSignature { .. }
        )
    }
}

/// What a signature is for. The signed message is the context's label, a NUL byte, then the
/// body, so a signature made for one purpose never verifies as another under the same key: a
/// release-log entry cannot pass for a manifest, nor a command for either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Manifest,
    LogEntry,
    Command,
    /// A root key's statement of the release and timestamp keys ([`crate::trust`]).
    KeySet,
    /// A release key's list of withdrawn releases.
    Revocations,
    /// The server's short-lived statement of what is current.
    Timestamp,
}

impl Context {
    pub const fn label(self) -> &'static [u8] {
        match self {
            Context::Manifest => b"otarig/manifest/v1",
            Context::LogEntry => b"otarig/release-log-entry/v1",
            Context::Command => b"otarig/command/v1",
            Context::KeySet => b"otarig/key-set/v1",
            Context::Revocations => b"otarig/revocations/v1",
            Context::Timestamp => b"otarig/timestamp/v1",
        }
    }

    /// The bytes a signature under this context covers.
    pub fn message(self, body: &[u8]) -> Vec<u8> {
        let label = self.label();
        let mut m = Vec::with_capacity(label.len() + 1 + body.len());
        m.extend_from_slice(label);
        m.push(0);
        m.extend_from_slice(body);
        m
    }
}

/// Parse an envelope and verify its signature, made for `ctx`, against the trusted keys;
/// return the signed body. Used for manifests, commands and entries of the release log.
pub fn verify_envelope(
    bytes: &[u8],
    keys: &[TrustedKey],
    ctx: Context,
) -> Result<Vec<u8>, EnvelopeError> {
    if bytes.len() > MAX_SIGNED_MANIFEST_LEN {
        return Err(EnvelopeError::TooLarge(bytes.len()));
    }
    let env: SignedManifest = serde_json::from_slice(bytes)
        .map_err(|e| EnvelopeError::Malformed(alloc::format!("envelope: {e}")))?;
    verify_parsed(&env, keys, ctx)
}

/// [`verify_envelope`] for an envelope already parsed (from a payload that carries several).
pub fn verify_parsed(
    env: &SignedManifest,
    keys: &[TrustedKey],
    ctx: Context,
) -> Result<Vec<u8>, EnvelopeError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // Decoded behind the context label, so the message is built without a second copy.
    let mut msg = ctx.message(&[]);
    let prefix = msg.len();
    b64.decode_vec(env.manifest.as_bytes(), &mut msg)
        .map_err(|e| EnvelopeError::Malformed(alloc::format!("body is not base64: {e}")))?;
    let sig = b64
        .decode(env.signature.as_bytes())
        .map_err(|e| EnvelopeError::Malformed(alloc::format!("signature is not base64: {e}")))?;
    let key = keys
        .iter()
        .find(|k| k.id == env.key_id)
        .ok_or_else(|| EnvelopeError::UnknownKey(env.key_id.clone()))?;
    if key.key.alg() != env.alg {
        return Err(EnvelopeError::AlgMismatch {
            key_id: key.id.clone(),
        });
    }
    let bad = || EnvelopeError::BadSignature {
        key_id: key.id.clone(),
    };
    match &key.key {
        PublicKey::Ed25519(vk) => {
            let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|_| bad())?;
            vk.verify_strict(&msg, &sig).map_err(|_| bad())?;
        }
        PublicKey::Rsa(pk) => {
            use rsa::signature::Verifier;
            let vk = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk.clone());
            let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).map_err(|_| bad())?;
            vk.verify(&msg, &sig).map_err(|_| bad())?;
        }
    }
    msg.drain(..prefix);
    Ok(msg)
}

/// Parse an envelope and verify its signature against the trusted keys; return the manifest.
///
/// Nothing inside the manifest is looked at before the signature verifies.
pub fn open(bytes: &[u8], keys: &[TrustedKey]) -> Result<Manifest, EnvelopeError> {
    if bytes.len() > MAX_SIGNED_MANIFEST_LEN {
        return Err(EnvelopeError::TooLarge(bytes.len()));
    }
    let env: SignedManifest = serde_json::from_slice(bytes)
        .map_err(|e| EnvelopeError::Malformed(alloc::format!("envelope: {e}")))?;
    open_parsed(&env, keys)
}

/// [`open`] for an envelope already parsed.
pub fn open_parsed(env: &SignedManifest, keys: &[TrustedKey]) -> Result<Manifest, EnvelopeError> {
    let body = verify_parsed(env, keys, Context::Manifest)?;
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| EnvelopeError::Malformed(alloc::format!("manifest body: {e}")))?;
    if manifest.format != FORMAT {
        return Err(EnvelopeError::Malformed(alloc::format!(
            "manifest format {} (this agent reads format {FORMAT})",
            manifest.format
        )));
    }
    if manifest.sha256_bytes().is_none() {
        return Err(EnvelopeError::Malformed(
            "sha256 is not 64 hex digits".to_string(),
        ));
    }
    Ok(manifest)
}

/// Wrap manifest bytes and a signature into the envelope (host side uses this to publish).
pub fn envelope(body: &[u8], key_id: &str, alg: Alg, signature: &[u8]) -> SignedManifest {
    let b64 = base64::engine::general_purpose::STANDARD;
    SignedManifest {
        manifest: b64.encode(body),
        key_id: key_id.to_string(),
        alg,
        signature: b64.encode(signature),
    }
}

/// The key ids a firmware trusts, for messages.
pub fn key_ids(keys: &[TrustedKey]) -> Vec<&str> {
    keys.iter().map(|k| k.id.as_str()).collect()
}
