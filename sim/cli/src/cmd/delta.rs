//! `otarig delta`: make, apply, inspect and import delta patches.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use otarig_server::delta;

use super::{read, write};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Make a patch from OLD to NEW.
    Make {
        old: PathBuf,
        new: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Apply PATCH to OLD (with the agent's streaming applier) and check the result's hash.
    Apply {
        old: PathBuf,
        patch: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Print a patch's header.
    Info { patch: PathBuf },
    /// Transcode a BSDIFF40 patch (Python bsdiff4, qbsdiff) into this project's container.
    ImportBsdiff40 {
        old: PathBuf,
        patch: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
    },
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Make { old, new, out } => {
            let (a, b) = (read(&old)?, read(&new)?);
            let p = delta::make(&a, &b);
            write(&out, &p)?;
            println!(
                "wrote {} ({} bytes, {:.2} % of the new image)",
                out.display(),
                p.len(),
                p.len() as f64 * 100.0 / b.len().max(1) as f64
            );
        }
        Cmd::Apply { old, patch, out } => {
            let new = delta::apply(&read(&old)?, &read(&patch)?)
                .with_context(|| format!("applying {}", patch.display()))?;
            write(&out, &new)?;
            println!(
                "wrote {} ({} bytes, SHA-256 verified)",
                out.display(),
                new.len()
            );
        }
        Cmd::Info { patch } => info(&patch)?,
        Cmd::ImportBsdiff40 { old, patch, out } => {
            let p = delta::import_bsdiff40(&read(&old)?, &read(&patch)?)
                .with_context(|| format!("importing {}", patch.display()))?;
            write(&out, &p)?;
            println!("wrote {} ({} bytes)", out.display(), p.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn info(patch: &std::path::Path) -> anyhow::Result<()> {
    let p = read(patch)?;
    let h = otarig_agent::delta::Header::parse(&p)
        .map_err(|e| anyhow::anyhow!("{}: {e}", patch.display()))?;
    println!(
        "codec        LZ4, {} blocks of {} bytes",
        h.blocks, h.block_size
    );
    println!(
        "old          {} bytes, sha256 {}",
        h.old_size,
        hex::encode(h.old_sha256)
    );
    println!(
        "new          {} bytes, sha256 {}",
        h.new_size,
        hex::encode(h.new_sha256)
    );
    println!("raw bsdiff   {} bytes, patch {} bytes", h.raw_size, p.len());
    Ok(())
}
