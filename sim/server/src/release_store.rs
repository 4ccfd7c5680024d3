//! The release store on disk, as `otarig serve --store DIR` serves it:
//!
//! ```text
//! DIR/blobs/<sha256>                       images and delta patches, by content
//! DIR/cids/<cid>                           the SHA-256 of the blob whose IPFS CIDv1 is <cid>
//! DIR/manifests/<device_type>/<channel>.json   the latest signed manifest
//! DIR/keys.json                            the fleet's key set, signed by a root key
//! DIR/revocations/<device_type>.json       the device type's signed revocation list
//! DIR/releases.log                         append-only, hash-chained, signed release log
//! DIR/acks.jsonl                           what boards reported
//! ```
//!
//! Each line of `releases.log` is a signed envelope (the manifest signature scheme) whose body
//! is a [`LogEntry`]; the entry names its position and the SHA-256 of the previous line, so
//! removing, reordering or editing a line breaks the chain and [`ReleaseStore::verify_log`]
//! says at which line. Blobs are written to a temporary file and renamed, so a crash never
//! leaves a half-written blob under its hash.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use otarig_agent::manifest::{self, Manifest, TrustedKey};
use serde::{Deserialize, Serialize};

use crate::keys::NamedKey;
use crate::store::sha256;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One published release, as recorded in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// 1 for the first line.
    pub seq: u64,
    /// SHA-256 (hex) of the previous line's bytes; zeros for the first.
    pub prev: String,
    pub published_at: u64,
    pub device_type: String,
    pub channel: String,
    pub version: String,
    pub sequence: u64,
    pub image_sha256: String,
    /// The image's IPFS CIDv1 (`ipfs add --cid-version 1`), served at `/ipfs/<cid>`.
    #[serde(default)]
    pub image_cid: String,
    pub manifest_sha256: String,
    pub deltas_from: Vec<String>,
}

/// The statements a store serves with a device type's manifests.
#[derive(Clone, Debug, Default)]
pub struct StoredStatements {
    pub keys: Option<Vec<u8>>,
    pub revocations: Option<Vec<u8>>,
}

impl StoredStatements {
    pub fn borrow(&self) -> crate::statements::Statements<'_> {
        crate::statements::Statements {
            keys: self.keys.as_deref(),
            revocations: self.revocations.as_deref(),
        }
    }
}

/// A store directory.
#[derive(Clone, Debug)]
pub struct ReleaseStore {
    root: PathBuf,
    /// Blobs read for serving, shared by clones (see [`ReleaseStore::blob`]).
    cache: Arc<Mutex<BlobCache>>,
}

/// A stored blob's bytes, and the SHA-256 of exactly those bytes: its strong ETag, equal to
/// its name unless a test stored a tampered copy under that name.
#[derive(Clone, Debug)]
pub struct Blob {
    pub bytes: bytes::Bytes,
    pub sha256: [u8; 32],
}

/// Blobs kept in memory, up to [`BLOB_CACHE_BYTES`] in all.
#[derive(Debug, Default)]
struct BlobCache {
    by_name: HashMap<[u8; 32], Blob>,
    bytes: usize,
}

/// How many blob bytes a store keeps in memory for serving. A fleet downloads the same few
/// images thousands of times; an image is at most an app partition (16 MiB on an ESP32-S3).
const BLOB_CACHE_BYTES: usize = 256 << 20;

/// Device types and channels become path components: keep them to a safe alphabet.
pub fn check_name(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.');
    if !ok {
        bail!(
            "{what} '{s}' must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
        );
    }
    Ok(())
}

impl ReleaseStore {
    /// Open (and create, if needed) a store directory.
    pub fn open(root: &Path) -> anyhow::Result<ReleaseStore> {
        for sub in ["blobs", "manifests", "cids"] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        Ok(ReleaseStore {
            root: root.to_path_buf(),
            cache: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Store bytes under their SHA-256, and index them by IPFS CID; returns the hash.
    pub fn put_blob(&self, bytes: &[u8]) -> anyhow::Result<[u8; 32]> {
        let sha = sha256(bytes);
        let path = self.blob_dir().join(hex::encode(sha));
        if !path.exists() {
            // Index first: a blob that is served under its hash is also found by its CID.
            let cid_path = self.root.join("cids").join(crate::cid::cid_v1(bytes));
            write_atomically(&cid_path, hex::encode(sha).as_bytes())?;
            write_atomically(&path, bytes)?;
        }
        Ok(sha)
    }

    /// The SHA-256 of the blob a CIDv1 (canonical form, see [`crate::cid::canonical`]) names.
    pub fn sha_of_cid(&self, cid: &str) -> Option<[u8; 32]> {
        let text = std::fs::read_to_string(self.root.join("cids").join(cid)).ok()?;
        let mut sha = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut sha).ok()?;
        Some(sha)
    }

    /// Store bytes under a given name (a copy of another store, or a deliberately tampered
    /// blob in a test).
    pub fn put_blob_as(&self, sha: &[u8; 32], bytes: &[u8]) -> anyhow::Result<()> {
        // Held across the write, so no reader caches the old bytes in between.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        write_atomically(&self.blob_dir().join(hex::encode(sha)), bytes)?;
        if let Some(old) = cache.by_name.remove(sha) {
            cache.bytes -= old.bytes.len();
        }
        Ok(())
    }

    /// The blob stored under `name` if it is in memory (never blocks).
    pub fn cached_blob(&self, name: &[u8; 32]) -> Option<Blob> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.by_name.get(name).cloned()
    }

    /// The blob stored under `name` (`None`: there is none), read from disk unless it is in
    /// memory (blocking), and kept in memory for the next request. A name's bytes only
    /// change through [`ReleaseStore::put_blob_as`], which drops the kept copy; blobs are
    /// otherwise content-addressed and written once, so the copy is never stale.
    pub fn blob(&self, name: &[u8; 32]) -> anyhow::Result<Option<Blob>> {
        if let Some(b) = self.cached_blob(name) {
            return Ok(Some(b));
        }
        let path = self.blob_dir().join(hex::encode(name));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let blob = Blob {
            sha256: sha256(&bytes),
            bytes: bytes.into(),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if blob.bytes.len() <= BLOB_CACHE_BYTES && !cache.by_name.contains_key(name) {
            // Make room, oldest-or-not: a store that serves more than this at once is
            // beyond what the cache is for.
            while cache.bytes + blob.bytes.len() > BLOB_CACHE_BYTES {
                let Some(k) = cache.by_name.keys().next().copied() else {
                    break;
                };
                if let Some(old) = cache.by_name.remove(&k) {
                    cache.bytes -= old.bytes.len();
                }
            }
            cache.bytes += blob.bytes.len();
            cache.by_name.insert(*name, blob.clone());
        }
        Ok(Some(blob))
    }

    /// Make an already signed manifest the latest for a device type and channel.
    pub fn set_latest(
        &self,
        device_type: &str,
        channel: &str,
        signed: &[u8],
    ) -> anyhow::Result<()> {
        check_name("device type", device_type)?;
        check_name("channel", channel)?;
        let path = self.manifest_path(device_type, channel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&path, signed)
    }

    fn manifest_path(&self, device_type: &str, channel: &str) -> PathBuf {
        self.root
            .join("manifests")
            .join(device_type)
            .join(format!("{channel}.json"))
    }

    /// The latest signed manifest for a device type and channel.
    pub fn latest(&self, device_type: &str, channel: &str) -> anyhow::Result<Option<Vec<u8>>> {
        check_name("device type", device_type)?;
        check_name("channel", channel)?;
        match std::fs::read(self.manifest_path(device_type, channel)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading the latest manifest"),
        }
    }

    /// Make a signed key set the one every answer carries (`otarig keys rotate`). Refuses a
    /// version not above the current one: boards would refuse it.
    pub fn set_keys(&self, signed: &[u8]) -> anyhow::Result<()> {
        let version = |env: &[u8]| -> anyhow::Result<u32> {
            let body = crate::statements::body_unverified(env)?;
            let ks: otarig_agent::trust::KeySetBody =
                serde_json::from_slice(&body).context("not a key set")?;
            Ok(ks.version)
        };
        let new = version(signed)?;
        if let Some(old) = self.keys()? {
            let old = version(&old)?;
            if new <= old {
                bail!("key set v{new} is not above v{old} already served (boards would refuse it)");
            }
        }
        write_atomically(&self.root.join("keys.json"), signed)
    }

    /// The key set every answer carries, if any.
    pub fn keys(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.read_optional(&self.root.join("keys.json"))
    }

    /// Make a signed revocation list the one served to `device_type` (`otarig release revoke`).
    pub fn set_revocations(&self, device_type: &str, signed: &[u8]) -> anyhow::Result<()> {
        check_name("device type", device_type)?;
        let dir = self.root.join("revocations");
        std::fs::create_dir_all(&dir)?;
        write_atomically(&dir.join(format!("{device_type}.json")), signed)
    }

    /// The key set and `device_type`'s revocation list, as stored (signed envelopes).
    pub fn statements(&self, device_type: &str) -> anyhow::Result<StoredStatements> {
        check_name("device type", device_type)?;
        let revocations = self
            .root
            .join("revocations")
            .join(format!("{device_type}.json"));
        Ok(StoredStatements {
            keys: self.keys()?,
            revocations: self.read_optional(&revocations)?,
        })
    }

    fn read_optional(&self, path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("releases.log")
    }

    fn log_lines(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        match std::fs::read(self.log_path()) {
            Ok(b) => Ok(b
                .split(|c| *c == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).context("reading releases.log"),
        }
    }

    /// Publish a release: store the image (and patches), sign its manifest, make it the latest
    /// for its device type and channel, and append a signed entry to the log.
    ///
    /// Refuses a sequence number not above the latest one already logged for the device type
    /// (boards would refuse it as a replay).
    pub fn publish(
        &self,
        key: &NamedKey,
        m: Manifest,
        image: &[u8],
        deltas_from: &[Vec<u8>],
        now: u64,
    ) -> anyhow::Result<LogEntry> {
        self.publish_with(key, m, image, deltas_from, None, now)
    }

    /// [`Self::publish`], the image encrypted for `encrypt` when given: only the ciphertext
    /// is stored, and the manifest's hash and size still describe the plaintext. Deltas of
    /// encrypted releases are refused (a patch against plaintext would give it away).
    pub fn publish_with(
        &self,
        key: &NamedKey,
        mut m: Manifest,
        image: &[u8],
        deltas_from: &[Vec<u8>],
        encrypt: Option<&crate::encrypt::ImageKey>,
        now: u64,
    ) -> anyhow::Result<LogEntry> {
        if encrypt.is_some() && !deltas_from.is_empty() {
            bail!("an encrypted release offers no delta patches: leave out --delta-from (a patch against the plaintext would give the image away)");
        }
        check_name("device type", &m.device_type)?;
        check_name("channel", &m.channel)?;
        let lines = self.log_lines()?;
        let mut highest = None;
        for line in &lines {
            let entry = parse_entry_unverified(line)?;
            if entry.device_type == m.device_type {
                highest = highest.max(Some(entry.sequence));
            }
        }
        if let Some(h) = highest.filter(|h| *h >= m.sequence) {
            bail!(
                "sequence {} is not above {h} already released for {} (boards would refuse it as a replay)",
                m.sequence,
                m.device_type
            );
        }
        m.sha256 = hex::encode(sha256(image));
        m.size = u32::try_from(image.len()).context("the image is over 4 GiB")?;
        // What is stored and served: the image, or only its ciphertext.
        let (served, encryption) = match encrypt {
            Some(k) => {
                let enc = crate::encrypt::encrypt(k, image, &mut rand::rngs::OsRng)?;
                (std::borrow::Cow::Owned(enc.ciphertext), Some(enc.entry))
            }
            None => (std::borrow::Cow::Borrowed(image), None),
        };
        self.put_blob(&served)?;
        m.encryption = encryption;
        m.deltas.clear();
        for old in deltas_from {
            let patch = crate::delta::make(old, image);
            let patch_sha = self.put_blob(&patch)?;
            m.deltas.push(manifest::DeltaRef {
                from_sha256: hex::encode(sha256(old)),
                sha256: hex::encode(patch_sha),
                size: patch.len() as u32,
                url: None,
            });
        }
        let signed = key.sign_manifest(&m);
        let path = self.manifest_path(&m.device_type, &m.channel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let entry = LogEntry {
            seq: lines.len() as u64 + 1,
            prev: lines
                .last()
                .map_or_else(|| GENESIS.to_string(), |l| hex::encode(sha256(l))),
            published_at: now,
            device_type: m.device_type.clone(),
            channel: m.channel.clone(),
            version: m.version.clone(),
            sequence: m.sequence,
            image_sha256: m.sha256.clone(),
            // The CID of what the store holds (the ciphertext of an encrypted release).
            image_cid: crate::cid::cid_v1(&served),
            manifest_sha256: hex::encode(sha256(&signed)),
            deltas_from: m.deltas.iter().map(|d| d.from_sha256.clone()).collect(),
        };
        let line = key.sign_envelope(manifest::Context::LogEntry, &serde_json::to_vec(&entry)?);
        // Log first: a release that is served is always in the log.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening releases.log")?;
        log.write_all(&line)?;
        log.write_all(b"\n")?;
        log.sync_all()?;
        write_atomically(&path, &signed)?;
        Ok(entry)
    }

    /// Check every line's signature and the hash chain; returns the entries.
    pub fn verify_log(&self, keys: &[TrustedKey]) -> anyhow::Result<Vec<LogEntry>> {
        verify_log_lines(&self.log_lines()?, keys)
    }

    /// Append a board's ack (already validated JSON) to `acks.jsonl`.
    /// Append one ack to acks.jsonl, unless that would take the file past `quota` bytes
    /// (then `Ok(false)`: nothing written).
    pub fn record_ack(&self, json: &serde_json::Value, quota: u64) -> anyhow::Result<bool> {
        let mut line = serde_json::to_vec(json)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("acks.jsonl"))
            .context("opening acks.jsonl")?;
        let len = f.metadata().context("reading acks.jsonl's size")?.len();
        if len.saturating_add(line.len() as u64) > quota {
            return Ok(false);
        }
        f.write_all(&line)?;
        Ok(true)
    }
}

/// Check the signature and hash chain of a release log's lines (each one envelope, in order);
/// returns the entries. Lines come from a file anyone with disk access may have edited.
pub fn verify_log_lines(lines: &[Vec<u8>], keys: &[TrustedKey]) -> anyhow::Result<Vec<LogEntry>> {
    let mut prev = GENESIS.to_string();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let body = manifest::verify_envelope(line, keys, manifest::Context::LogEntry)
            .map_err(|e| anyhow::anyhow!("releases.log line {n}: {e}"))?;
        let entry: LogEntry = serde_json::from_slice(&body)
            .with_context(|| format!("releases.log line {n}: not a log entry"))?;
        if entry.seq != n as u64 {
            bail!(
                "releases.log line {n}: entry says it is number {} (lines removed or reordered)",
                entry.seq
            );
        }
        if entry.prev != prev {
            bail!("releases.log line {n}: the previous line is not the one it was chained to (edited, removed or reordered)");
        }
        prev = hex::encode(sha256(line));
        out.push(entry);
    }
    Ok(out)
}

fn parse_entry_unverified(line: &[u8]) -> anyhow::Result<LogEntry> {
    let env: manifest::SignedManifest =
        serde_json::from_slice(line).context("releases.log has a line that is not an envelope")?;
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD
        .decode(env.manifest.as_bytes())
        .context("releases.log has a line whose body is not base64")?;
    serde_json::from_slice(&body).context("releases.log has a line that is not a log entry")
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
