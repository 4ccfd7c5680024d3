//! `otarig run`: scenarios on the deterministic simulator.

use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use otarig_scenario::runner::{self, RunOptions};
use otarig_scenario::{expect, summary, Scenario};

#[derive(clap::Args)]
pub struct Args {
    /// Scenario files (scenarios/*.toml).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Override the fleet size.
    #[arg(long)]
    devices: Option<u32>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    out: super::Outputs,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let bar = if a.files.len() > 1 {
        let b = ProgressBar::new(a.files.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let opts = RunOptions {
        devices: a.devices,
        seed: a.seed,
        ..Default::default()
    };
    let mut verdicts = Vec::new();
    let mut invalid = 0;
    for f in &a.files {
        bar.set_message(f.display().to_string());
        let scenario = match Scenario::load(f) {
            Ok(s) => s,
            Err(e) => {
                bar.suspend(|| eprintln!("error: {e}"));
                invalid += 1;
                bar.inc(1);
                continue;
            }
        };
        let started = std::time::Instant::now();
        let result = runner::run(&scenario, &opts)?;
        let failures = expect::judge(&result, None);
        a.out.events(f, &result)?;
        bar.suspend(|| {
            print!("{}", summary::render(&result, &failures));
            println!("wall      {:.2} s\n", started.elapsed().as_secs_f64());
        });
        verdicts.push(summary::Verdict {
            name: scenario.name.clone(),
            file: f.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            failures,
            skipped: None,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    a.out.finish("otarig run", &verdicts, invalid)
}
