//! `otarig manifest`: sign and verify release manifests.

use std::path::PathBuf;
use std::process::ExitCode;

use otarig_agent::manifest;
use otarig_server::keys::fixture_dir;

use super::release::ReleaseArgs;

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Sign a manifest for an image.
    Sign {
        #[command(flatten)]
        release: ReleaseArgs,
        #[arg(long)]
        url: Option<String>,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Verify a signed manifest against trusted keys and print it.
    Verify {
        file: PathBuf,
        /// Trusted key ids (PEM files in --keys-dir); repeatable.
        #[arg(long = "trust", required = true)]
        trust: Vec<String>,
        #[arg(long, default_value_os_t = fixture_dir())]
        keys_dir: PathBuf,
    },
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Sign { release, url, out } => {
            let (_, key, mut m) = release.load()?;
            m.url = url;
            super::write(&out, &key.sign_manifest(&m))?;
            println!(
                "wrote {} ({} {} seq {}, signed by {})",
                out.display(),
                m.device_type,
                m.version,
                m.sequence,
                key.id
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            file,
            trust,
            keys_dir,
        } => {
            let bytes = super::read(&file)?;
            let keys = super::keys::trusted(&keys_dir, &trust)?;
            match manifest::open(&bytes, &keys) {
                Ok(m) => {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("refused: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
