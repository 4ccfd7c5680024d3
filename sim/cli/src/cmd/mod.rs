//! The subcommands, one module each, and the few helpers they share.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

pub mod bench;
pub mod board;
pub mod check;
pub mod delta;
pub mod fleet;
pub mod hil;
pub mod image;
pub mod keys;
pub mod manifest;
pub mod plr;
pub mod release;
pub mod run;
pub mod serve;

/// Read a file the user named, saying which one when it fails.
fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Write a file the user named, saying which one when it fails.
fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Verify an app image as the bootloader would (`esp_image_verify`).
fn verify_image(bytes: &[u8]) -> anyhow::Result<otarig_agent::image::ImageInfo> {
    otarig_agent::image::verify(bytes.len() as u32, |off, buf| {
        let off = off as usize;
        let src = bytes.get(off..off + buf.len()).ok_or(())?;
        buf.copy_from_slice(src);
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The exit code of a run over scenario files: 2 if a file was invalid, 1 if a scenario
/// failed, 0 otherwise.
fn exit_code(invalid: usize, failed: usize) -> ExitCode {
    if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
