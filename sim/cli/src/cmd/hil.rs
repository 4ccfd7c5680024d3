//! `otarig hil`: scenarios on one board over its serial port.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use otarig_hil::bench::{control_for, BenchFile, VIRTUAL_BOARD_CONTROL};
use otarig_hil::{HilOptions, SimOnly};
use otarig_scenario::{expect, summary, Scenario};
use otarig_serial::flasher::Target;

#[derive(clap::Args)]
pub struct Args {
    /// Scenario files (default: every scenarios/*.toml and scenarios/attacks/*.toml).
    files: Vec<PathBuf>,
    /// The board's serial port: COM9, /dev/ttyACM0, /dev/ttyUSB0, /dev/pts/N.
    #[arg(long)]
    port: String,
    /// The virtual board's control socket: makes this a virtual-board run (a /dev/pts/*
    /// port with /tmp/otarig-board.sock present implies it).
    #[arg(long)]
    control: Option<PathBuf>,
    /// The bench file (Wi-Fi, host address, reset method, firmware directory).
    #[arg(long, default_value = "bench/bench.toml")]
    bench: PathBuf,
    #[command(flatten)]
    out: super::Outputs,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let implied = a.control.is_none();
    let control = control_for(&a.port, a.control.clone());
    if implied && control.is_some() {
        println!(
            "{} is a pty: using the virtual board's control socket {VIRTUAL_BOARD_CONTROL}",
            a.port
        );
    }
    let bench = BenchFile::load(&a.bench, control.is_some())?;
    let opts = HilOptions::for_bench(&a.port, control, bench, &a.bench)?;
    println!(
        "bench: {} ({}), broker and server on {}",
        a.port,
        match opts.target {
            Target::Virtual => "virtual board",
            Target::Hardware => "hardware",
        },
        opts.host
    );
    let files = if a.files.is_empty() {
        every_scenario()?
    } else {
        a.files.clone()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut verdicts = Vec::new();
    for f in &files {
        let s = Scenario::load(f)?;
        let started = Instant::now();
        let (failures, skipped) = match rt.block_on(otarig_hil::run_scenario(&s, &opts)) {
            Ok(h) => {
                for skip in &h.skipped {
                    println!("skipped   {skip}");
                }
                a.out.events(f, &h.run)?;
                let failures = expect::judge(&h.run, None);
                print!("{}", summary::render(&h.run, &failures));
                (failures, None)
            }
            Err(e) if e.downcast_ref::<SimOnly>().is_some() => {
                println!("SKIP      {} ({}): {e}", s.name, f.display());
                (Vec::new(), Some(e.to_string()))
            }
            Err(e) => {
                eprintln!("error: {}: {e:#}", f.display());
                (vec![did_not_run(f, &e)], None)
            }
        };
        println!(
            "wall      {:.1} s (real time, on {})\n",
            started.elapsed().as_secs_f64(),
            a.port
        );
        verdicts.push(summary::Verdict {
            name: s.name.clone(),
            file: f.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            failures,
            skipped,
        });
    }
    a.out.finish("otarig hil", &verdicts, 0)
}

/// Every `scenarios/*.toml` and `scenarios/attacks/*.toml` under the current directory.
fn every_scenario() -> anyhow::Result<Vec<PathBuf>> {
    otarig_scenario::scenario::files_in(std::path::Path::new("scenarios"))
        .context("no scenario files given and no scenarios/ directory here")
}

/// A scenario that could not run on the board is a failure, with why.
fn did_not_run(f: &std::path::Path, e: &anyhow::Error) -> expect::Failure {
    expect::Failure {
        at: f.display().to_string(),
        device: 0,
        check: "run".into(),
        expected: "the scenario runs on the board".into(),
        seen: format!("{e:#}"),
    }
}
