//! `otarig bench fleet`: the scale benchmark. Every board updates a 1 MiB image through a real
//! broker and the firmware server, in real time (speedup 1, so no board timer fires early
//! under load), telemetry on.
//!
//! Up to [`EMBEDDED_MAX`] boards run in this one process with the embedded broker and server.
//! More run in shards of [`BOARDS_PER_PROCESS`] (one process each, started by the command the
//! caller makes from a [`ShardLaunch`], which runs [`fleet_shard`]; see
//! [`crate::fleet::Shard`]) on one shared timeline, against the firmware server in this
//! process and a broker in its own: a process holds one descriptor per connection end and the
//! hard `ulimit -n` is finite, and the embedded rumqttd does not scale that far (its topic
//! matching is quadratic in per-device topics; README, "Scale"), so the broker is Mosquitto
//! (started here from `PATH`, or `--broker URL`). The figures are for the
//! whole fleet; peak RSS is the sum of every process's peak (broker included), which is at
//! least the real combined peak.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fleet::{check_open_files, run_fleet, BrokerConnects, FleetOptions, Shard};
use crate::mosquitto::Mosquitto;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use otarig_agent::Event;
use otarig_scenario::expect;
use otarig_scenario::runner::{self, Run, What};
use otarig_scenario::scenario::Scenario;
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::Server;
use serde::{Deserialize, Serialize};

mod cpu;
use cpu::CpuMeter;

/// Boards per shard process: each holds an MQTT and an HTTP connection (two descriptors).
///
/// Measured, not derived: at 10,000 boards on two cores, eight shards of 1,250 did the same
/// work in less CPU time than four of 2,500 (over mutual TLS 45.5–48.3 s and 90–96
/// CPU-seconds in the window against 53.6–59.6 s and 107–119, alternating; plaintext
/// 19.3–20.9 s against 21.9–25.6 s), and twelve or sixteen were no better than eight. The
/// shards' own CPU time is what fell (the broker's only with the shorter window), and glibc's
/// `_int_malloc` was a smaller share of their samples (4.5 % against 6.7 %). README, "Scale".
pub const BOARDS_PER_PROCESS: u32 = 1_250;

/// The most boards run in one process with the embedded rumqttd: beyond about this many its
/// per-topic matching dominates (2,500 boards took 101 s here), so larger fleets shard with
/// Mosquitto.
pub const EMBEDDED_MAX: u32 = 1_000;

/// Virtual ms of quiet (no event on any board) that end a run.
const QUIET_MS: u64 = 5_000;
/// The same over TLS: connecting ten thousand boards with a handshake each (Mosquitto's are
/// one at a time) is quiet for longer than that before the first board acts.
const QUIET_TLS_MS: u64 = 30_000;

fn quiet_ms(tls: bool) -> u64 {
    if tls {
        QUIET_TLS_MS
    } else {
        QUIET_MS
    }
}

/// Time the shards get to start and build the scenario before the shared timeline's zero.
const SHARD_START: Duration = Duration::from_secs(6);
/// The same over TLS, where each shard also issues its boards' certificates (1,250 ECDSA
/// keys and signatures each, eight processes on two cores for 10,000 boards).
const SHARD_START_TLS: Duration = Duration::from_secs(20);

fn scenario(devices: u32, tls: bool) -> anyhow::Result<Scenario> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/bench/fleet-1mib.toml");
    let mut s = Scenario::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    s.set_devices(devices);
    if tls {
        s.transport = otarig_scenario::scenario::Transport::Tls;
    }
    Ok(s)
}

/// The benchmark's PKI in `dir`: a root, an intermediate, a certificate for 127.0.0.1 (the
/// server's and the broker's); the files Mosquitto reads.
fn bench_pki(dir: &Path) -> anyhow::Result<crate::mosquitto::MutualTls> {
    let pki = otarig_server::pki::Pki::init(dir, true, 30)?;
    let leaf = pki.server(&["127.0.0.1".into(), "localhost".into()], 30)?;
    pki.write_server(&leaf)?;
    Ok(crate::mosquitto::MutualTls::of_pki(dir))
}

/// What one process measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Figures {
    /// When each board confirmed the update, in the shared timeline's virtual ms.
    confirmed_ms: Vec<u64>,
    served_bytes: u64,
    peak_rss: u64,
    failures: Vec<String>,
    /// Board connections the broker accepted, and the first's and last's virtual ms.
    broker_connects: u64,
    broker_span_ms: Option<(u64, u64)>,
}

impl Figures {
    fn of(run: &Run, connects: &BrokerConnects) -> Figures {
        let (broker_connects, broker_span_ms) = connects.summary();
        let confirmed: Vec<u64> = run
            .records
            .iter()
            .filter(|r| matches!(r.what, What::Agent(Event::Confirmed { .. })))
            .map(|r| r.t_ms)
            .collect();
        Figures {
            confirmed_ms: confirmed,
            served_bytes: run.served_bytes,
            peak_rss: peak_rss(std::process::id()).unwrap_or(0),
            failures: expect::judge(run, None)
                .iter()
                .map(|f| format!("{f:?}"))
                .collect(),
            broker_connects,
            broker_span_ms,
        }
    }
}

/// `otarig bench fleet --devices N [--broker URL] [--shards K]`.
/// What a shard process is told: the fleet size, which shard it is, where the broker and the
/// server are, and the shared timeline's zero (ms since the Unix epoch).
#[derive(Clone, Debug)]
pub struct ShardLaunch {
    pub devices: u32,
    pub shard: Shard,
    pub broker: String,
    pub server: String,
    pub epoch_ms: u64,
    /// Over mutual TLS: the PKI directory whose issuing CA makes the shard's certificates.
    pub pki: Option<std::path::PathBuf>,
}

/// The benchmark. `launch` makes the command that starts one shard process (the CLI re-runs
/// itself as `otarig bench fleet-shard`); it is used only when the fleet shards.
pub fn fleet(
    devices: u32,
    broker: Option<String>,
    shards: Option<u32>,
    tls: bool,
    launch: &dyn Fn(&ShardLaunch) -> Command,
) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `just bench-fleet` for real figures");
    }
    // One process with everything embedded for small fleets (unless told to shard);
    // otherwise shard processes, the server here and the broker in its own.
    let shards = match shards {
        Some(k) => Some(k.clamp(1, devices.max(1))),
        None if devices <= EMBEDDED_MAX => None,
        None => Some(devices.div_ceil(BOARDS_PER_PROCESS)),
    };
    if tls && broker.is_some() {
        bail!(
            "--tls starts its own Mosquitto with mutual TLS and the run's PKI: leave out --broker"
        );
    }
    let s = scenario(devices, tls)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    // Something moves while the run goes (stderr, drawn only on a terminal); figures come at
    // the end. A live per-state bar would need this process to take every board's telemetry,
    // which would load what is being measured.
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed:>4} {msg}",
    )?);
    spinner.set_message(format!("{devices} boards updating"));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let (figures, broker_name, broker_rss, meter) = if let Some(shards) = shards {
        // Over TLS: one PKI for the run; each shard issues its own boards' certificates.
        let pki = tempfile::tempdir()?;
        let mutual = if tls {
            Some(bench_pki(pki.path())?)
        } else {
            None
        };
        let mosquitto = match (&broker, &mutual) {
            (Some(_), _) => None,
            (None, Some(files)) => Some(Mosquitto::start_tls(files, &[])?),
            (None, None) => Some(Mosquitto::start()?),
        };
        let broker_url = match (&broker, &mosquitto) {
            (Some(url), _) => url.clone(),
            (None, Some(m)) => m.url(),
            (None, None) => unreachable!("started above"),
        };
        let pki_dir = mutual.as_ref().map(|_| pki.path());
        let broker_at = BrokerProcess {
            url: &broker_url,
            pid: mosquitto.as_ref().map(|m| m.child.id()),
        };
        let (figures, meter) = run_shards(&rt, &s, shards, &broker_at, pki_dir, &spinner, launch)?;
        let name = match &mosquitto {
            Some(m) => format!("Mosquitto (own process, {})", m.url()),
            None => broker_url,
        };
        let rss = mosquitto.as_ref().and_then(|m| peak_rss(m.child.id()));
        (figures, name, rss, Some(meter))
    } else {
        let which = match (&broker, tls) {
            (Some(b), _) => b.clone(),
            (None, true) => "Mosquitto with mutual TLS (own process)".into(),
            (None, false) => "embedded rumqttd".into(),
        };
        let broker = broker
            .as_deref()
            .map(crate::broker::BrokerEndpoint::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?;
        let connects = Arc::new(BrokerConnects::default());
        let opts = FleetOptions {
            broker,
            speedup: 1.0,
            quiet_ms: quiet_ms(tls),
            broker_connects: Some(connects.clone()),
            ..Default::default()
        };
        let run = rt.block_on(run_fleet(&s, &opts))?;
        (vec![Figures::of(&run, &connects)], which, None, None)
    };
    spinner.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    report(&figures, &s, shards, &broker_name, broker_rss, meter, wall)
}

/// The broker a sharded run's boards use: its URL, and its process if the benchmark started it.
struct BrokerProcess<'a> {
    url: &'a str,
    pid: Option<u32>,
}

/// A sharded run's CPU meter, and when the release was on its timeline (the window's start).
struct Metered {
    meter: CpuMeter,
    release: Instant,
}

/// Start the firmware server here, the shards as child processes on a shared timeline, and
/// collect what each measured, with the CPU time of every process (this one's is the
/// server's).
fn run_shards(
    rt: &tokio::runtime::Runtime,
    s: &Scenario,
    shards: u32,
    broker: &BrokerProcess<'_>,
    pki: Option<&Path>,
    spinner: &ProgressBar,
    launch: &dyn Fn(&ShardLaunch) -> Command,
) -> anyhow::Result<(Vec<Figures>, Metered)> {
    // One server for all shards, holding the scenario's blobs (what `otarig release stage`
    // does); its connections are one descriptor each here.
    check_open_files(s.devices, 1, "the firmware server's")?;
    let prep = runner::prepare(s)?;
    let dir = tempfile::tempdir().context("creating the store directory")?;
    let store = Arc::new(ReleaseStore::open(dir.path())?);
    prep.stage_into(&store)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = match pki {
        None => rt.block_on(Server::start(store, addr))?,
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading {}", dir.join(f).display()))
            };
            let auth = otarig_server::tls::ClientAuth {
                ca_pem: read("client_ca.pem")?,
                crl_pem: None,
            };
            let chain = read("server/server_chain.pem")?;
            let tls = otarig_server::tls::server_config(
                &chain,
                &read("server/server.key")?,
                Some(&auth),
            )?;
            rt.block_on(Server::start_tls(store, addr, Default::default(), tls))?
        }
    };
    let epoch = SystemTime::now()
        + if pki.is_some() {
            SHARD_START_TLS
        } else {
            SHARD_START
        };
    let epoch_ms = epoch.duration_since(UNIX_EPOCH)?.as_millis() as u64;
    // The shards run in real time (speedup 1): the release is its virtual ms after the epoch.
    let release = Instant::now()
        + epoch.duration_since(SystemTime::now()).unwrap_or_default()
        + Duration::from_millis(s.releases.first().map_or(0, |r| r.at_ms));
    let mut children = Vec::new();
    for index in 0..shards {
        let mut cmd = launch(&ShardLaunch {
            devices: s.devices,
            shard: Shard {
                index,
                count: shards,
            },
            broker: broker.url.to_string(),
            server: server.url(),
            epoch_ms,
            pki: pki.map(Path::to_path_buf),
        });
        let child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting shard {index} ({cmd:?})"))?;
        children.push(child);
    }
    let followed = std::iter::once(("server".to_string(), std::process::id()))
        .chain(children.iter().map(|c| ("shards".to_string(), c.id())))
        .chain(broker.pid.map(|pid| ("broker".to_string(), pid)));
    let meter = CpuMeter::start(followed.collect());
    let mut figures = Vec::new();
    let mut errors = Vec::new();
    // The server keeps serving on the runtime's worker threads while this thread waits.
    for (index, child) in children.into_iter().enumerate() {
        spinner.set_message(format!(
            "{} boards in {shards} shard processes; {index} of them done",
            s.devices
        ));
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().last().map(serde_json::from_str::<Figures>) {
            Some(Ok(f)) => figures.push(f),
            _ => errors.push(format!(
                "shard {index} exited with {} and no figures (its errors are above)",
                out.status
            )),
        }
    }
    let h = server.handshakes.summary();
    rt.block_on(server.shutdown());
    if h.full + h.resumed > 0 {
        println!(
            "  HTTPS handshakes {} full, {} resumed, {} of them TLS 1.2 (server side, ECDSA P-256, client certificates), {:.0}/s from the first to the last",
            h.full,
            h.resumed,
            h.tls12,
            (h.full + h.resumed) as f64 / h.span().as_secs_f64().max(1e-3)
        );
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    // This process's own share: the server's memory.
    figures.push(Figures {
        peak_rss: peak_rss(std::process::id()).unwrap_or(0),
        ..Default::default()
    });
    Ok((figures, Metered { meter, release }))
}

/// One shard of a sharded benchmark, in its own process; prints its [`Figures`] as one JSON
/// line.
pub fn fleet_shard(l: ShardLaunch) -> anyhow::Result<ExitCode> {
    let s = scenario(l.devices, l.pki.is_some())?;
    let connects = Arc::new(BrokerConnects::default());
    let opts = FleetOptions {
        broker: Some(
            crate::broker::BrokerEndpoint::parse(&l.broker).map_err(|e| anyhow::anyhow!(e))?,
        ),
        server: Some(l.server),
        speedup: 1.0,
        quiet_ms: quiet_ms(l.pki.is_some()),
        shard: Some(l.shard),
        epoch: Some(UNIX_EPOCH + Duration::from_millis(l.epoch_ms)),
        pki: l.pki,
        broker_connects: Some(connects.clone()),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let run = rt.block_on(run_fleet(&s, &opts))?;
    println!("{}", serde_json::to_string(&Figures::of(&run, &connects))?);
    Ok(ExitCode::SUCCESS)
}

fn report(
    figures: &[Figures],
    s: &Scenario,
    shards: Option<u32>,
    broker: &str,
    broker_rss: Option<u64>,
    metered: Option<Metered>,
    wall: f64,
) -> anyhow::Result<ExitCode> {
    let devices = s.devices;
    let image = s.firmware.get("v2").map_or(0, |f| f.size) as u64;
    let release = s.releases.first().map_or(0, |r| r.at_ms);
    let mut times: Vec<u64> = figures
        .iter()
        .flat_map(|f| &f.confirmed_ms)
        .map(|t| t.saturating_sub(release))
        .collect();
    times.sort_unstable();
    let confirmed = times.len() as u32;
    // After the release, when this share of the boards had confirmed (0 < share <= 1).
    let by = |share: f64| {
        let i = ((times.len() as f64 * share).ceil() as usize).clamp(1, times.len().max(1)) - 1;
        times.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let secs = by(1.0).max(1e-3);
    let mb = figures.iter().map(|f| f.served_bytes).sum::<u64>() as f64 / 1e6;
    let peak: u64 = figures.iter().map(|f| f.peak_rss).sum::<u64>() + broker_rss.unwrap_or(0);
    let failures: Vec<&String> = figures.iter().flat_map(|f| &f.failures).collect();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let processes = match shards {
        None => "one process (boards, broker and server)".to_string(),
        Some(k) => format!("{k} board process(es) + the server's + the broker's"),
    };
    println!(
        "fleet scale: {devices} boards x {:.0} KiB image, real time, broker: {broker}, {processes}",
        image as f64 / 1024.0
    );
    println!(
        "  confirmed      {confirmed} of {devices} boards ({} expectation failure(s))",
        failures.len()
    );
    println!(
        "  release -> last board confirmed   {secs:.1} s   (target < 60 s: {:.2}x of budget)",
        secs / 60.0
    );
    println!(
        "  confirmed by   {:.1} s (half), {:.1} s (99 %), {secs:.1} s (all), after the release",
        by(0.5),
        by(0.99)
    );
    println!("  boards/s       {:.0}", confirmed as f64 / secs);
    if let Some(m) = metered {
        let window = Duration::from_secs_f64(secs);
        if let Some(spent) = m.meter.stop(m.release, m.release + window) {
            print_cpu(&spent, secs);
        }
    }
    print_broker_connects(
        figures,
        s.transport == otarig_scenario::scenario::Transport::Tls,
    );
    println!("  MB/s           {:.0}   ({mb:.0} MB served)", mb / secs);
    println!(
        "  peak RSS       {:.0} MiB   (target < 4 GiB: {:.2}x of budget; {:.0} KiB per board)",
        mib(peak),
        peak as f64 / (4u64 << 30) as f64,
        peak as f64 / 1024.0 / devices.max(1) as f64
    );
    if shards.is_some() {
        let parts: Vec<String> = figures
            .iter()
            .map(|f| format!("{:.0}", mib(f.peak_rss)))
            .chain(broker_rss.map(|b| format!("broker {:.0}", mib(b))))
            .collect();
        println!("                 (MiB per process: {})", parts.join(", "));
    }
    println!(
        "  wall           {wall:.1} s (whole run: building the scenario, connecting, {:.0} s of quiet at the end)",
        quiet_ms(s.transport == otarig_scenario::scenario::Transport::Tls) as f64 / 1000.0
    );
    for f in failures.iter().take(5) {
        println!("  FAILED: {f}");
    }
    Ok(if failures.is_empty() && confirmed == devices {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The boards' accepted broker connections across processes, and their rate from the first
/// to the last: over TLS, the broker's handshakes (each a full one).
fn print_broker_connects(figures: &[Figures], tls: bool) {
    let count: u64 = figures.iter().map(|f| f.broker_connects).sum();
    let spans = figures.iter().filter_map(|f| f.broker_span_ms);
    let first = spans.clone().map(|(a, _)| a).min();
    let last = spans.map(|(_, b)| b).max();
    let (Some(first), Some(last)) = (first, last) else {
        return;
    };
    let per_s = count as f64 / (last.saturating_sub(first) as f64 / 1000.0).max(1e-3);
    let what = if tls {
        "MQTTS handshakes (broker side, full)"
    } else {
        "MQTT connections (broker side)"
    };
    println!("  {what} {count}, {per_s:.0}/s from the first to the last");
}

/// What the processes spent in the window: on a shared VM the same run takes more CPU time in
/// a slow hour, and this line tells that apart from a costlier build.
fn print_cpu(spent: &cpu::Spent, secs: f64) {
    let followed: f64 = spent.by_name.iter().map(|(_, s)| s).sum();
    let mut parts: Vec<String> = spent
        .by_name
        .iter()
        .map(|(name, s)| format!("{name} {s:.0}"))
        .collect();
    let mut total = followed;
    let mut machine = String::new();
    if let Some(m) = &spent.machine {
        parts.push(format!("the rest {:.0}", m.elsewhere));
        total += m.elsewhere;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        machine = format!(
            "; the machine {:.0} % busy on {cores} cores",
            m.busy_share * 100.0
        );
    }
    println!(
        "  CPU in window  {total:.0} CPU-seconds in {secs:.1} s: {}{machine}",
        parts.join(", ")
    );
}

/// Peak resident set size of a process so far (Linux `VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
