//! `otarig plr`: the power-loss explorer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use otarig_scenario::plr::{self, Report};
use otarig_scenario::scenario::parse_duration;
use otarig_scenario::Scenario;

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    /// Cut at every flash operation of the update, one run each.
    #[arg(long, conflicts_with_all = ["random", "at"])]
    exhaustive: bool,
    /// Random cut points, double faults and tearing until --budget runs out.
    #[arg(long, conflicts_with = "at")]
    random: bool,
    /// Replay specific cuts: flash operation indices, comma-separated (a second index is a
    /// cut during recovery).
    #[arg(long, value_delimiter = ',')]
    at: Vec<u64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time budget for --random (e.g. 10m, 90s).
    #[arg(long, default_value = "60s")]
    budget: String,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write failing reproductions, one per line, to this file.
    #[arg(long)]
    failures: Option<PathBuf>,
    /// Run a deliberately broken agent variant (needs --features fault-injection):
    /// `single-copy-journal`.
    #[arg(long)]
    broken: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    switch_on_broken(a.broken.as_deref())?;
    let scenario = match Scenario::load(&a.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let report = explore(&a, &scenario)?;
    print_report(&a, &scenario, &report);
    if let Some(path) = &a.failures {
        let lines: Vec<String> = report
            .failures
            .iter()
            .map(|p| p.repro(&a.file, a.broken.as_deref()))
            .collect();
        if !lines.is_empty() {
            super::write(path, (lines.join("\n") + "\n").as_bytes())?;
        }
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn switch_on_broken(broken: Option<&str>) -> anyhow::Result<()> {
    match broken {
        None => Ok(()),
        Some("single-copy-journal") => {
            if !cfg!(feature = "fault-injection") {
                bail!("--broken needs a build with `--features fault-injection`");
            }
            otarig_agent::fault::set_single_copy_journal(true);
            Ok(())
        }
        Some(other) => bail!("unknown broken variant '{other}' (known: single-copy-journal)"),
    }
}

/// Replay the cuts of `--at`, or explore exhaustively or randomly, with a progress bar.
fn explore(a: &Args, scenario: &Scenario) -> anyhow::Result<Report> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} cut points  {per_sec}  {elapsed_precise}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tick = |done: u64, total: u64| {
        if total > 0 {
            bar.set_length(total);
        }
        bar.set_position(done);
    };
    let report = if !a.at.is_empty() {
        replay(scenario, &a.at, a.seed)?
    } else if a.exhaustive {
        plr::exhaustive(scenario, a.seed, threads, &tick)?
    } else if a.random {
        let budget = parse_duration(&a.budget)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--budget {}", a.budget))?;
        let budget = std::time::Duration::from_millis(budget);
        plr::random(scenario, a.seed, budget, threads, &tick)?
    } else {
        bail!("say --exhaustive, --random or --at K[,K2]");
    };
    bar.finish_and_clear();
    Ok(report)
}

/// One probe at the given cuts, as a report of one.
fn replay(scenario: &Scenario, at: &[u64], seed: u64) -> anyhow::Result<Report> {
    let g = plr::golden(scenario)?;
    let p = plr::probe(scenario, &g, at, seed)?;
    let mut r = Report {
        explored: 1,
        ops: g.ops,
        worst_refetch: p.refetched,
        refetch_per_cut: g.refetch_per_cut().0,
        ..Default::default()
    };
    if p.known_hazard.is_some() {
        r.known.push(p);
    } else if !p.violations.is_empty() {
        r.failures.push(p);
    }
    Ok(r)
}

fn print_report(a: &Args, scenario: &Scenario, report: &Report) {
    let (file, broken) = (a.file.as_path(), a.broken.as_deref());
    println!("scenario          {} ({})", scenario.name, file.display());
    println!("flash operations  {} in the run without a cut", report.ops);
    println!(
        "cut points        {} explored in {:.1} s ({:.0}/s)",
        report.explored,
        report.elapsed.as_secs_f64(),
        report.explored as f64 / report.elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "worst re-download {} bytes after a cut (bound {} per cut)",
        report.worst_refetch, report.refetch_per_cut
    );
    println!("violations        {}", report.failures.len());
    print_known(report, file, broken);
    for p in report.failures.iter().take(20) {
        println!("  cut at {:?} (seed {}):", p.cuts, p.seed);
        for v in &p.violations {
            println!("    - {v}");
        }
        println!("    reproduce: {}", p.repro(file, broken));
    }
}

fn print_known(report: &Report, file: &Path, broken: Option<&str>) {
    if report.known.is_empty() {
        return;
    }
    println!(
        "known hazards     {} probe(s) hit a hazard this scenario acknowledges (plr-known-hazards); first:",
        report.known.len()
    );
    for p in report.known.iter().take(3) {
        println!("  cut at {:?}: {}", p.cuts, p.violations.join("; "));
        println!("    reproduce: {}", p.repro(file, broken));
    }
}
