//! `otarig release`: publish releases into a store directory and read its log.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use otarig_agent::manifest::{self, Manifest};
use otarig_scenario::scenario::parse_duration;
use otarig_scenario::{runner, Scenario};
use otarig_server::keys::{fixture_dir, NamedKey};
use otarig_server::release_store::ReleaseStore;

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Store an image (and patches from older images), sign its manifest, make it the latest
    /// for its device type and channel, and append a signed entry to the release log.
    Add {
        #[arg(long)]
        store: PathBuf,
        #[command(flatten)]
        release: ReleaseArgs,
        /// Older images to offer delta patches from (repeatable).
        #[arg(long)]
        delta_from: Vec<PathBuf>,
    },
    /// Put every blob a scenario's releases use (images, patches, deliberately tampered blobs)
    /// into a store, so `otarig fleet FILE --server URL` can run against `otarig serve`.
    Stage {
        scenario: PathBuf,
        #[arg(long)]
        store: PathBuf,
    },
    /// Withdraw releases: sign the device type's revocation list with one more entry (its
    /// serial one above the current list's) and serve it with every answer. Boards refuse a
    /// listed release (`revoked`) and, once they saw a list, any older one (`freshness`).
    Revoke {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        device_type: String,
        /// Release key id (a PEM file KEY.pem in --keys-dir): the list is signed like a
        /// manifest, by a key the boards trust for releases.
        #[arg(long)]
        key: String,
        #[arg(long, default_value_os_t = fixture_dir())]
        keys_dir: PathBuf,
        /// Release sequences to withdraw (repeatable).
        #[arg(long)]
        sequence: Vec<u64>,
        /// SHA-256 (hex) of images to withdraw (repeatable).
        #[arg(long)]
        image: Vec<String>,
    },
    /// Verify the release log (signatures and hash chain) and print it.
    Log {
        #[arg(long)]
        store: PathBuf,
        /// Trusted key ids (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<String>,
        #[arg(long, default_value_os_t = fixture_dir())]
        keys_dir: PathBuf,
    },
}

/// What a release is: the image, who signs it, for which boards, until when.
#[derive(clap::Args)]
pub struct ReleaseArgs {
    #[arg(long)]
    image: PathBuf,
    /// Key id: a PEM file KEY.pem in --keys-dir.
    #[arg(long)]
    key: String,
    #[arg(long, default_value_os_t = fixture_dir())]
    keys_dir: PathBuf,
    #[arg(long)]
    device_type: String,
    #[arg(long, default_value = "stable")]
    channel: String,
    #[arg(long)]
    sequence: u64,
    #[arg(long, default_value = "30d")]
    expires_in: String,
}

impl ReleaseArgs {
    /// Read and verify the image, load the key, and describe the image in a manifest.
    pub fn load(&self) -> anyhow::Result<(Vec<u8>, NamedKey, Manifest)> {
        let bytes = super::read(&self.image)?;
        let info = super::verify_image(&bytes).with_context(|| {
            format!(
                "{} is not a bootable ESP32-S3 app image",
                self.image.display()
            )
        })?;
        let desc = info.desc.as_ref().with_context(|| {
            format!(
                "{} has no app descriptor (magic 0xABCD5432 at offset 32): a release needs its version and secure_version",
                self.image.display()
            )
        })?;
        let key = NamedKey::load(&self.keys_dir, &self.key)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let ttl = parse_duration(&self.expires_in)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--expires-in {}", self.expires_in))?
            / 1000;
        let m = Manifest {
            format: manifest::FORMAT,
            device_type: self.device_type.clone(),
            channel: self.channel.clone(),
            version: desc.version.to_string(),
            secure_version: desc.secure_version,
            sequence: self.sequence,
            size: bytes.len() as u32,
            sha256: hex::encode(info.sha256),
            url: None,
            cid: None,
            deltas: Vec::new(),
            issued_at: now,
            expires_at: now + ttl,
        };
        Ok((bytes, key, m))
    }
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Add {
            store,
            release,
            delta_from,
        } => add(&store, &release, &delta_from),
        Cmd::Stage { scenario, store } => {
            let s = Scenario::load(&scenario)?;
            let n = runner::prepare(&s)?.stage_into(&ReleaseStore::open(&store)?)?;
            println!(
                "staged {n} blob(s) of {} into {}; run it with `otarig fleet {} --server URL`",
                scenario.display(),
                store.display(),
                scenario.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Log {
            store,
            trust,
            keys_dir,
        } => log(&store, &trust, &keys_dir),
        Cmd::Revoke {
            store,
            device_type,
            key,
            keys_dir,
            sequence,
            image,
        } => revoke(
            &ReleaseStore::open(&store)?,
            &device_type,
            &NamedKey::load(&keys_dir, &key)?,
            &sequence,
            &image,
        ),
    }
}

/// Add `sequences` and `images` to the device type's revocation list, re-signed with `key`
/// under the next serial.
fn revoke(
    store: &ReleaseStore,
    device_type: &str,
    key: &NamedKey,
    sequences: &[u64],
    images: &[String],
) -> anyhow::Result<ExitCode> {
    if sequences.is_empty() && images.is_empty() {
        anyhow::bail!("name what to withdraw: --sequence N or --image SHA256 (repeatable)");
    }
    let mut list = match store.statements(device_type)?.revocations {
        Some(env) => {
            let body = otarig_server::statements::body_unverified(&env)?;
            serde_json::from_slice(&body).context("the stored revocation list is not one")?
        }
        None => otarig_agent::trust::RevocationsBody {
            device_type: device_type.to_string(),
            ..Default::default()
        },
    };
    for img in images {
        let mut sha = [0u8; 32];
        hex::decode_to_slice(img, &mut sha)
            .with_context(|| format!("--image {img} is not a SHA-256 (64 hex digits)"))?;
        list.images.push(hex::encode(sha));
    }
    list.sequences.extend_from_slice(sequences);
    list.sequences.sort_unstable();
    list.sequences.dedup();
    list.images.sort();
    list.images.dedup();
    list.serial += 1;
    let signed = otarig_server::statements::revocation_list(key, &list)?;
    store.set_revocations(device_type, &signed)?;
    println!(
        "revocation list {} of {device_type}: {} sequence(s), {} image(s), signed by {}",
        list.serial,
        list.sequences.len(),
        list.images.len(),
        key.id
    );
    Ok(ExitCode::SUCCESS)
}

fn add(
    store: &std::path::Path,
    release: &ReleaseArgs,
    delta_from: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let (bytes, key, m) = release.load()?;
    let olds = delta_from
        .iter()
        .map(|p| super::read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = m.issued_at;
    let entry = ReleaseStore::open(store)?.publish(&key, m, &bytes, &olds, now)?;
    println!(
        "released {} {} (sequence {}) on {}: image {} (ipfs {}), {} patch(es), log entry {}",
        entry.device_type,
        entry.version,
        entry.sequence,
        entry.channel,
        entry.image_sha256,
        entry.image_cid,
        entry.deltas_from.len(),
        entry.seq
    );
    Ok(ExitCode::SUCCESS)
}

fn log(
    store: &std::path::Path,
    trust: &[String],
    keys_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let keys = super::keys::trusted(keys_dir, trust)?;
    let entries = ReleaseStore::open(store)?.verify_log(&keys)?;
    for e in &entries {
        println!(
            "{:>4}  {}  {}/{}  {}  seq {}  image {}",
            e.seq,
            e.published_at,
            e.device_type,
            e.channel,
            e.version,
            e.sequence,
            e.image_sha256.get(..16).unwrap_or(&e.image_sha256)
        );
    }
    println!(
        "{} entries, signatures and hash chain verified",
        entries.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each revocation adds to the list under the next serial, signed by the release key.
    #[test]
    fn revoke_accumulates_under_growing_serials() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReleaseStore::open(dir.path()).unwrap();
        let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
        revoke(&store, "board", &key, &[3], &[]).unwrap();
        let sha = hex::encode([0xAB; 32]);
        revoke(&store, "board", &key, &[3, 5], std::slice::from_ref(&sha)).unwrap();
        let env = store.statements("board").unwrap().revocations.unwrap();
        let env: otarig_agent::SignedManifest = serde_json::from_slice(&env).unwrap();
        let list = otarig_agent::trust::open_revocations(&env, &[key.trusted().unwrap()]).unwrap();
        assert_eq!(
            (list.serial, list.sequences, list.images),
            (2, vec![3, 5], vec![sha])
        );
        let e = revoke(&store, "board", &key, &[], &["xyz".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a SHA-256"), "{e}");
    }
}
