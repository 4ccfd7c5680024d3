//! `otarig keys`: signing keys.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::ValueEnum;
use otarig_agent::TrustedKey;
use otarig_server::keys::{fixture_dir, NamedKey};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Generate a PKCS#8 PEM signing key in DIR/NAME.pem.
    Gen {
        name: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        alg: KeyAlg,
        #[arg(long, default_value_os_t = fixture_dir())]
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
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeyAlg {
    Ed25519,
    Rsa,
}

/// The public halves of the named keys in `dir`, as a board trusts them.
pub fn trusted(dir: &Path, ids: &[String]) -> anyhow::Result<Vec<TrustedKey>> {
    ids.iter()
        .map(|id| NamedKey::load(dir, id)?.trusted())
        .collect()
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Gen {
            name,
            alg,
            dir,
            force,
        } => {
            let path = dir.join(format!("{name}.pem"));
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            let key = match alg {
                KeyAlg::Ed25519 => NamedKey::generate_ed25519(&name),
                KeyAlg::Rsa => NamedKey::generate_rsa(&name)?,
            };
            std::fs::create_dir_all(&dir)?;
            super::write(&path, key.to_pem()?.as_bytes())?;
            println!("wrote {}", path.display());
        }
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
