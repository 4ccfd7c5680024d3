//! `otarig check`: parse scenario files without running them.

use std::path::PathBuf;
use std::process::ExitCode;

use otarig_scenario::Scenario;

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut bad = 0;
    for f in &a.files {
        match Scenario::load(f) {
            Ok(s) => println!(
                "ok    {} ({} boards, {} release(s), {} expectation block(s))",
                f.display(),
                s.devices,
                s.releases.len(),
                s.expects.len()
            ),
            Err(e) => {
                bad += 1;
                eprintln!("error: {e}");
            }
        }
    }
    Ok(super::exit_code(bad, 0))
}
