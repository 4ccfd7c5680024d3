//! The subcommands, one module each, and the few helpers they share.

use std::path::{Path, PathBuf};
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
pub mod pki;
pub mod plr;
pub mod release;
pub mod run;
pub mod serve;

/// Where a run over scenario files writes its results besides the terminal.
#[derive(clap::Args)]
pub struct Outputs {
    /// Write the event stream as JSON lines (one file per scenario: NAME.jsonl in this dir).
    #[arg(long, value_name = "DIR")]
    events: Option<PathBuf>,
    /// Write a JUnit XML report (one test case per scenario).
    #[arg(long, value_name = "PATH")]
    junit: Option<PathBuf>,
}

impl Outputs {
    /// The event stream of scenario file `file`, when asked for.
    fn events(&self, file: &Path, run: &otarig_scenario::runner::Run) -> anyhow::Result<()> {
        match &self.events {
            Some(dir) => otarig_scenario::summary::write_events_file(dir, file, run),
            None => Ok(()),
        }
    }

    /// The JUnit report of `verdicts` as test suite `suite`, when asked for; then the exit
    /// code (2 if `invalid` files were met, 1 if a scenario failed, 0 otherwise).
    fn finish(
        &self,
        suite: &str,
        verdicts: &[otarig_scenario::summary::Verdict],
        invalid: usize,
    ) -> anyhow::Result<ExitCode> {
        if let Some(path) = &self.junit {
            otarig_scenario::summary::write_junit_file(path, suite, verdicts)?;
        }
        let failed = verdicts.iter().filter(|v| !v.failures.is_empty()).count();
        Ok(exit_code(invalid, failed))
    }
}

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
