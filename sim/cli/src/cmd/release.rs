//! `otarig release`: publish releases into a store directory and read its log.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use otarig_agent::manifest::{self, Manifest};
use otarig_scenario::scenario::parse_duration;
use otarig_scenario::{runner, Scenario};
use otarig_server::keys::{fixture_dir, NamedKey};
use otarig_server::release_store::ReleaseStore;

/// `--encrypt`'s formats ([`otarig_agent::cipher::Scheme`]).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EncryptArg {
    /// AES-256-CBC, PKCS#7 padding, a fresh IV per release, under the fleet key.
    #[value(name = "aes-256-cbc")]
    Aes256Cbc,
    /// ESP-IDF's esp_encrypted_img (RSA-3072 scheme): byte-compatible with
    /// esp_enc_img_gen.py and esp_encrypted_img_decrypt_data.
    #[value(name = "esp-encrypted-img")]
    EspEncryptedImg,
}

impl EncryptArg {
    fn scheme(self) -> otarig_agent::cipher::Scheme {
        match self {
            EncryptArg::Aes256Cbc => otarig_agent::cipher::Scheme::Aes256Cbc,
            EncryptArg::EspEncryptedImg => otarig_agent::cipher::Scheme::EspEncryptedImg,
        }
    }
}

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
        /// Encrypt the image: only the ciphertext is stored and served; the manifest's
        /// SHA-256 still covers the plaintext. Needs --image-key.
        #[arg(
            long,
            value_enum,
            requires = "image_key",
            conflicts_with = "delta_from"
        )]
        encrypt: Option<EncryptArg>,
        /// The image key (`otarig keys gen NAME --alg aes-256|rsa-3072`): NAME.hex for
        /// aes-256-cbc, NAME.pub.pem (or the private NAME.pem) for esp-encrypted-img.
        #[arg(long, requires = "encrypt")]
        image_key: Option<PathBuf>,
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
            encryption: None,
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
            encrypt,
            image_key,
        } => {
            let encrypt = match (encrypt, image_key) {
                (Some(scheme), Some(path)) => Some(image_key_for(scheme, &path)?),
                _ => None,
            };
            add(&store, &release, &delta_from, encrypt.as_ref())
        }
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

/// Load `--image-key` and check it fits `--encrypt`.
fn image_key_for(
    scheme: EncryptArg,
    path: &std::path::Path,
) -> anyhow::Result<otarig_server::encrypt::ImageKey> {
    let key = otarig_server::encrypt::ImageKey::load(path)?;
    if key.scheme() != scheme.scheme() {
        anyhow::bail!(
            "--image-key {} is a key for {}, not {} (`otarig keys gen NAME --alg {}` makes one)",
            path.display(),
            key.scheme().name(),
            scheme.scheme().name(),
            match scheme {
                EncryptArg::Aes256Cbc => "aes-256",
                EncryptArg::EspEncryptedImg => "rsa-3072",
            }
        );
    }
    Ok(key)
}

fn add(
    store: &std::path::Path,
    release: &ReleaseArgs,
    delta_from: &[PathBuf],
    encrypt: Option<&otarig_server::encrypt::ImageKey>,
) -> anyhow::Result<ExitCode> {
    let (bytes, key, m) = release.load()?;
    let olds = delta_from
        .iter()
        .map(|p| super::read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = m.issued_at;
    let entry = ReleaseStore::open(store)?.publish_with(&key, m, &bytes, &olds, encrypt, now)?;
    if let Some(k) = encrypt {
        println!(
            "encrypted ({}) for key {}: only the ciphertext is in the store",
            k.scheme().name(),
            k.key_id()
        );
    }
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
