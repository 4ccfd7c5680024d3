//! `otarig keys`: signing keys.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::ValueEnum;
use otarig_agent::TrustedKey;
use otarig_server::keys::{fixture_dir, write_private, NamedKey};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Generate a PKCS#8 PEM signing key in DIR/NAME.pem, readable by its owner only (0600).
    /// DIR has no default: a private key must not land in the repository by accident.
    /// Image keys: `--alg aes-256` writes DIR/NAME.hex (the fleet key for AES-256-CBC
    /// releases); `--alg rsa-3072` writes DIR/NAME.pem for the boards and DIR/NAME.pub.pem
    /// for the release host (esp_encrypted_img releases).
    Gen {
        name: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        alg: KeyAlg,
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Write a key's public half the way firmware compiles it in: OUT/NAME.ed25519 (32 raw
    /// bytes) or OUT/NAME.rsa.der (PKCS#1 DER).
    Export {
        name: String,
        #[arg(long, default_value_os_t = fixture_dir())]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Rotate the release (and timestamp) keys: sign a key set with a root key the firmware
    /// embeds, one version above the store's current one, and serve it with every answer.
    /// Boards adopt it at their next answer and trust only its keys from then on.
    Rotate {
        #[arg(long)]
        store: PathBuf,
        /// Root key id (ROOT.pem in --dir); keep root keys offline.
        #[arg(long)]
        root: String,
        /// Release key ids (repeatable, 1 to 4).
        #[arg(long, required = true)]
        release: Vec<String>,
        /// Timestamp key ids (repeatable, up to 4).
        #[arg(long)]
        timestamp: Vec<String>,
        /// Boards adopting the set take this as their highest installed sequence: undoes a
        /// fast-forward signed with a compromised key.
        #[arg(long)]
        sequence_base: Option<u64>,
        #[arg(long, default_value_os_t = fixture_dir())]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeyAlg {
    Ed25519,
    Rsa,
    /// An image key for `release add --encrypt aes-256-cbc`.
    #[value(name = "aes-256")]
    Aes256,
    /// An image key pair for `release add --encrypt esp-encrypted-img`.
    #[value(name = "rsa-3072")]
    Rsa3072,
    /// A fleet key for the chunked protocol (`serve --chunk-psk`, `pki nvs --chunk-psk`):
    /// 32 random bytes as hex, NAME.psk.
    Psk,
}

/// The public halves of the named keys in `dir`, as a board trusts them.
pub fn trusted(dir: &Path, ids: &[String]) -> anyhow::Result<Vec<TrustedKey>> {
    ids.iter()
        .map(|id| NamedKey::load(dir, id)?.trusted())
        .collect()
}

fn load_all(dir: &Path, ids: &[String]) -> anyhow::Result<Vec<NamedKey>> {
    ids.iter().map(|id| NamedKey::load(dir, id)).collect()
}

/// Sign and store the next key set.
fn rotate(
    store: &otarig_server::release_store::ReleaseStore,
    root: &NamedKey,
    release: &[NamedKey],
    timestamp: &[NamedKey],
    sequence_base: Option<u64>,
) -> anyhow::Result<()> {
    let current = match store.keys()? {
        Some(env) => {
            let body = otarig_server::statements::body_unverified(&env)?;
            let ks: otarig_agent::trust::KeySetBody =
                serde_json::from_slice(&body).context("the stored key set is not one")?;
            ks.version
        }
        None => 0,
    };
    let version = current + 1;
    let signed =
        otarig_server::statements::key_set(root, version, release, timestamp, sequence_base)?;
    store.set_keys(&signed)?;
    let ids = |keys: &[NamedKey]| {
        keys.iter()
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "key set v{version} signed by {}: release keys {}; timestamp keys {}{}",
        root.id,
        ids(release),
        if timestamp.is_empty() {
            "none".into()
        } else {
            ids(timestamp)
        },
        sequence_base.map_or(String::new(), |b| format!("; sequence base {b}"))
    );
    Ok(())
}

/// `keys gen --alg aes-256|rsa-3072`: an image key (and an RSA key's public half).
fn image_key(dir: &Path, name: &str, path: &Path, alg: KeyAlg) -> anyhow::Result<ExitCode> {
    use otarig_agent::cipher::Scheme;
    let scheme = match alg {
        KeyAlg::Aes256 => Scheme::Aes256Cbc,
        _ => Scheme::EspEncryptedImg,
    };
    let (private, public) = otarig_server::encrypt::generate(scheme)?;
    write_private(path, private.as_bytes())?;
    let id = otarig_server::encrypt::ImageKey::load(path)?.key_id();
    println!(
        "wrote {} (key id {id}, for {} releases)",
        path.display(),
        scheme.name()
    );
    if scheme == Scheme::EspEncryptedImg {
        let public_path = dir.join(format!("{name}.pub.pem"));
        std::fs::write(&public_path, public)
            .with_context(|| format!("writing {}", public_path.display()))?;
        println!("wrote {} (for the release host)", public_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Gen {
            name,
            alg,
            dir,
            force,
        } => {
            let ext = match alg {
                KeyAlg::Aes256 => "hex",
                KeyAlg::Psk => "psk",
                _ => "pem",
            };
            let path = dir.join(format!("{name}.{ext}"));
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = match alg {
                KeyAlg::Ed25519 => NamedKey::generate_ed25519(&name),
                KeyAlg::Rsa => NamedKey::generate_rsa(&name)?,
                KeyAlg::Aes256 | KeyAlg::Rsa3072 => return image_key(&dir, &name, &path, alg),
                KeyAlg::Psk => {
                    let hex = otarig_server::chunked::generate_fleet_key(&mut rand::rngs::OsRng);
                    write_private(&path, format!("{hex}\n").as_bytes())?;
                    println!(
                        "wrote {} (the chunked protocol's fleet key: for `otarig serve --chunk-psk` and `otarig pki nvs --chunk-psk`; boards get only their own derived key)",
                        path.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            };
            write_private(&path, key.to_pem()?.as_bytes())?;
            println!("wrote {}", path.display());
        }
        Cmd::Rotate {
            store,
            root,
            release,
            timestamp,
            sequence_base,
            dir,
        } => rotate(
            &otarig_server::release_store::ReleaseStore::open(&store)?,
            &NamedKey::load(&dir, &root)?,
            &load_all(&dir, &release)?,
            &load_all(&dir, &timestamp)?,
            sequence_base,
        )?,
        Cmd::Export { name, dir, out } => {
            let key = NamedKey::load(&dir, &name)?.trusted()?;
            let (file, bytes) = match &key.key {
                otarig_agent::PublicKey::Ed25519(k) => {
                    (format!("{name}.ed25519"), k.to_bytes().to_vec())
                }
                otarig_agent::PublicKey::Rsa(k) => {
                    use rsa::pkcs1::EncodeRsaPublicKey;
                    (
                        format!("{name}.rsa.der"),
                        k.to_pkcs1_der()?.as_bytes().to_vec(),
                    )
                }
            };
            std::fs::create_dir_all(&out)?;
            let path = out.join(file);
            super::write(&path, &bytes)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let gen = |force| Cmd::Gen {
            name: "k".into(),
            alg: KeyAlg::Ed25519,
            dir: dir.path().to_path_buf(),
            force,
        };
        run(gen(false)).unwrap();
        let path = dir.path().join("k.pem");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let e = run(gen(false)).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        run(gen(true)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "after --force: mode {mode:o}");
        }
        assert!(NamedKey::load(dir.path(), "k").is_ok());
    }
}

#[cfg(test)]
mod rotate_tests {
    use super::*;

    /// `keys rotate` signs the next version with the root key.
    #[test]
    fn rotate_signs_the_next_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = otarig_server::release_store::ReleaseStore::open(dir.path()).unwrap();
        let fx = fixture_dir();
        let root = NamedKey::load(&fx, "ed25519-root").unwrap();
        let release = load_all(&fx, &["ed25519-release-2".into()]).unwrap();
        rotate(&store, &root, &release, &[], None).unwrap();
        rotate(&store, &root, &release, &[], Some(4)).unwrap();
        let env: otarig_agent::SignedManifest =
            serde_json::from_slice(&store.keys().unwrap().unwrap()).unwrap();
        let ks = otarig_agent::trust::open_keyset(&env, &[root.trusted().unwrap()]).unwrap();
        assert_eq!((ks.version, ks.sequence_base), (2, Some(4)));
        assert_eq!(ks.release[0].id, "ed25519-release-2");
    }
}
