//! `otarig fleet`: scenarios with every board on real sockets.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use otarig_fleet::fleet::{run_fleet, FleetOptions, FleetProgress};
use otarig_scenario::scenario::parse_duration;
use otarig_scenario::{expect, summary, Scenario};

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long)]
    devices: Option<u32>,
    /// External broker (mqtt://HOST:PORT) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// External firmware server (http://HOST:PORT, e.g. `otarig serve`) instead of the
    /// embedded one; stage the scenario on its store first (`otarig release stage`).
    #[arg(long)]
    server: Option<String>,
    /// How often each board publishes telemetry, in virtual time ("0" turns it off).
    #[arg(long, default_value = "1s")]
    telemetry_period: String,
    /// Virtual time runs this many times faster than the wall clock.
    #[arg(long, default_value_t = 50.0)]
    speedup: f64,
    #[command(flatten)]
    out: super::Outputs,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let base = FleetOptions {
        devices: a.devices,
        broker: a
            .broker
            .as_deref()
            .map(otarig_fleet::broker::BrokerEndpoint::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?,
        server: a.server,
        speedup: a.speedup,
        telemetry_ms: match a.telemetry_period.trim() {
            "0" => 0,
            t => parse_duration(t).map_err(|e| anyhow::anyhow!("--telemetry-period {t}: {e}"))?,
        },
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut verdicts = Vec::new();
    for f in &a.files {
        let scenario = match Scenario::load(f) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        let progress = Arc::new(FleetProgress::default());
        let opts = FleetOptions {
            progress: Some(progress.clone()),
            ..base.clone()
        };
        let bar = fleet_bar(f, &progress, base.telemetry_ms > 0);
        let started = Instant::now();
        let run = rt.block_on(run_fleet(&scenario, &opts));
        bar.finish_and_clear();
        let run = run?;
        let failures = expect::judge(&run, None);
        a.out.events(f, &run)?;
        print!("{}", summary::render(&run, &failures));
        println!(
            "wall      {:.2} s (real sockets, {}x virtual time)\n",
            started.elapsed().as_secs_f64(),
            base.speedup
        );
        verdicts.push(summary::Verdict {
            name: scenario.name.clone(),
            file: f.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            failures,
            skipped: None,
        });
    }
    a.out.finish("otarig fleet", &verdicts, 0)
}

/// A live bar for a fleet run: boards heard from (by telemetry through the broker), and how
/// many are in each activity and on each version.
fn fleet_bar(file: &Path, progress: &Arc<FleetProgress>, telemetry: bool) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:24}] {pos}/{len} boards  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{}: starting", file.display()));
    bar.enable_steady_tick(Duration::from_millis(200));
    let (b, p, name) = (bar.clone(), progress.clone(), file.display().to_string());
    std::thread::spawn(move || {
        while !b.is_finished() {
            std::thread::sleep(Duration::from_millis(250));
            b.set_length(p.boards.load(Ordering::Relaxed));
            if !telemetry {
                b.set_message(format!("{name} (telemetry off)"));
                continue;
            }
            let (acts, versions) = p.counts();
            b.set_position(acts.iter().map(|(_, n)| *n as u64).sum());
            let fmt = |v: &[(String, u32)]| {
                v.iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            b.set_message(format!("{} | on {}", fmt(&acts), fmt(&versions)));
        }
    });
    bar
}
