//! `otarig`: run scenarios, build and sign releases.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use otarig::appimage::{self, AppSpec, Behaviour, BootBehaviour, NetworkBehaviour, SelfTest};
use otarig::keys::{fixture_dir, NamedKey};
use otarig::runner::{self, RunOptions};
use otarig::scenario::{parse_duration, Scenario};
use otarig::{expect, summary};

mod bench;
use otarig_agent::manifest::{self, Manifest};

#[derive(Parser)]
#[command(
    name = "otarig",
    version,
    about = "OTA update test rig for ESP32-S3 fleets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios on the deterministic simulator and check their expectations.
    Run {
        /// Scenario files (scenarios/*.toml).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override the fleet size.
        #[arg(long)]
        devices: Option<u32>,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Write the event stream as JSON lines (one file per scenario: NAME.jsonl in this dir).
        #[arg(long, value_name = "DIR")]
        events: Option<PathBuf>,
        /// Write a JUnit XML report (one test case per scenario).
        #[arg(long, value_name = "PATH")]
        junit: Option<PathBuf>,
    },
    /// A virtual ESP32-S3 behind a pseudo-terminal, for the HIL runner (Linux).
    Board {
        /// Serve on a new pty (the only transport today).
        #[arg(long, required = true)]
        pty: bool,
        /// Control socket for reset, download mode and power (a pty has no DTR/RTS).
        #[arg(long, default_value = VIRTUAL_BOARD_CONTROL)]
        control: PathBuf,
        /// Take the firmware's build settings (device type, trusted keys, agent timeouts)
        /// from a scenario; without it: otarig-devkit-s3, keys ed25519-test and rsa-test.
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
    /// Run scenarios on one board over its serial port (a real ESP32-S3, or `otarig board`).
    Hil {
        /// Scenario files (default: every scenarios/*.toml).
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
        /// Write the event stream as JSON lines (NAME.jsonl in this dir).
        #[arg(long, value_name = "DIR")]
        events: Option<PathBuf>,
        /// Write a JUnit XML report (one test case per scenario).
        #[arg(long, value_name = "PATH")]
        junit: Option<PathBuf>,
    },
    /// Run scenarios with every board on the wire: an MQTT connection to the broker (embedded,
    /// or --broker) and HTTP to the firmware server, both on loopback.
    Fleet {
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
        /// Write the event stream as JSON lines (NAME.jsonl in this dir).
        #[arg(long, value_name = "DIR")]
        events: Option<PathBuf>,
        /// Write a JUnit XML report (one test case per scenario).
        #[arg(long, value_name = "PATH")]
        junit: Option<PathBuf>,
    },
    /// Check scenario files without running them.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Power-loss explorer: cut power at flash operations and check the board recovers.
    Plr {
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
    },
    /// Delta patches: make, apply, inspect, import BSDIFF40.
    Delta {
        #[command(subcommand)]
        cmd: DeltaCmd,
    },
    /// Benchmarks (run with --release): `plr` explorer rates, `delta` sizes and throughput.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Run the firmware server over a release store directory.
    Serve {
        #[arg(long)]
        store: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Publish releases into a store directory and inspect its release log.
    Release {
        #[command(subcommand)]
        cmd: ReleaseCmd,
    },
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// ESP-IDF app images for simulated firmware.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Signed release manifests.
    Manifest {
        #[command(subcommand)]
        cmd: ManifestCmd,
    },
}

#[derive(Subcommand)]
enum DeltaCmd {
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

#[derive(Subcommand)]
enum BenchCmd {
    /// Exhaustive power-loss exploration of 1 MiB full and delta updates: cut points per
    /// second and wall time.
    Plr {
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Patch sizes and apply throughput on 1 MiB image pairs, against Python bsdiff4 (bz2)
    /// when `python3 -c "import bsdiff4"` works.
    Delta,
    /// N boards each update a 1 MiB image through the embedded broker and server, in real
    /// time: boards/s, MB/s, peak RSS and RSS per board.
    Fleet {
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        /// An external broker (mqtt://HOST:PORT) instead of the embedded rumqttd (one
        /// process) or a Mosquitto started for the run (shards).
        #[arg(long)]
        broker: Option<String>,
        /// Board processes. Default: up to 1,000 boards, none (boards, embedded broker and
        /// server in this one process); more, one per 2,500 boards, with the firmware server
        /// in this process and the broker (Mosquitto, or --broker) in its own.
        #[arg(long)]
        shards: Option<u32>,
    },
    /// One shard of a sharded `bench fleet` (started by it; prints its figures as JSON).
    #[command(hide = true)]
    FleetShard {
        #[arg(long)]
        devices: u32,
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        shards: u32,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        server: String,
        /// Virtual time 0, in ms since the Unix epoch.
        #[arg(long)]
        epoch_ms: u64,
    },
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Store an image (and patches from older images), sign its manifest, make it the latest
    /// for its device type and channel, and append a signed entry to the release log.
    Add {
        #[arg(long)]
        store: PathBuf,
        #[command(flatten)]
        release: ReleaseArgs,
        /// Older images to offer delta patches from (repeatable).
        #[arg(long)]
        delta_from: Vec<PathBuf>,
    },
    /// Put every blob a scenario's releases use (images, patches, deliberately tampered blobs)
    /// into a store, so `otarig fleet FILE --server URL` can run against `otarig serve`.
    Stage {
        scenario: PathBuf,
        #[arg(long)]
        store: PathBuf,
    },
    /// Verify the release log (signatures and hash chain) and print it.
    Log {
        #[arg(long)]
        store: PathBuf,
        /// Trusted key ids (repeatable).
        #[arg(long = "trust", required = true)]
        trust: Vec<String>,
        #[arg(long, default_value_os_t = fixture_dir())]
        keys_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Generate a PKCS#8 PEM signing key in DIR/NAME.pem.
    Gen {
        name: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        alg: KeyAlg,
        #[arg(long, default_value_os_t = fixture_dir())]
        dir: PathBuf,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Write a key's public half the way firmware compiles it in: OUT/NAME.ed25519 (32 raw
    /// bytes) or OUT/NAME.rsa.der (PKCS#1 DER).
    Export {
        name: String,
        #[arg(long, default_value_os_t = fixture_dir())]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlg {
    Ed25519,
    Rsa,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build an app image.
    Build {
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "otarig-demo")]
        project: String,
        #[arg(long, default_value_t = 0)]
        secure_version: u32,
        /// Size in bytes (approximate to 16 bytes).
        #[arg(long, default_value_t = 256 * 1024)]
        size: u32,
        #[arg(long, value_enum, default_value = "pass")]
        self_test: SelfTestArg,
        #[arg(long)]
        crash_on_boot: bool,
        #[arg(long)]
        no_network: bool,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Verify an image as the bootloader would and print its descriptor.
    Info { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum SelfTestArg {
    Pass,
    Fail,
}

/// What a release is: the image, who signs it, for which boards, until when.
#[derive(clap::Args)]
struct ReleaseArgs {
    #[arg(long)]
    image: PathBuf,
    /// Key id: a PEM file KEY.pem in --keys-dir.
    #[arg(long)]
    key: String,
    #[arg(long, default_value_os_t = fixture_dir())]
    keys_dir: PathBuf,
    #[arg(long)]
    device_type: String,
    #[arg(long, default_value = "stable")]
    channel: String,
    #[arg(long)]
    sequence: u64,
    #[arg(long, default_value = "30d")]
    expires_in: String,
}

impl ReleaseArgs {
    /// Read and verify the image, load the key, and describe the image in a manifest.
    fn load(&self) -> anyhow::Result<(Vec<u8>, NamedKey, Manifest)> {
        let bytes = read(&self.image)?;
        let info = verify_bytes(&bytes).with_context(|| {
            format!(
                "{} is not a bootable ESP32-S3 app image",
                self.image.display()
            )
        })?;
        let key = NamedKey::load(&self.keys_dir, &self.key)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let ttl = parse_duration(&self.expires_in).map_err(anyhow::Error::msg)? / 1000;
        let m = Manifest {
            format: manifest::FORMAT,
            device_type: self.device_type.clone(),
            channel: self.channel.clone(),
            version: info.desc.version.to_string(),
            secure_version: info.desc.secure_version,
            sequence: self.sequence,
            size: bytes.len() as u32,
            sha256: hex::encode(info.sha256),
            url: None,
            cid: None,
            deltas: Vec::new(),
            issued_at: now,
            expires_at: now + ttl,
        };
        Ok((bytes, key, m))
    }
}

#[derive(Subcommand)]
enum ManifestCmd {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Simulated power cuts and reboots drop MQTT connections mid-packet, even
                // mid-CONNECT; rumqttd's router and server log each as an error. RUST_LOG
                // overrides this default (RUST_LOG=rumqttd=info shows the broker).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,rumqttd::router=off,rumqttd::server=off",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            files,
            devices,
            seed,
            events,
            junit,
        } => run(&files, devices, seed, events.as_deref(), junit.as_deref()),
        Cmd::Plr {
            file,
            exhaustive,
            random,
            at,
            seed,
            budget,
            threads,
            failures,
            broken,
        } => plr(
            &file,
            exhaustive,
            random,
            &at,
            seed,
            &budget,
            threads,
            failures.as_deref(),
            broken.as_deref(),
        ),
        Cmd::Delta { cmd } => delta_cmd(cmd),
        Cmd::Fleet {
            files,
            devices,
            broker,
            server,
            telemetry_period,
            speedup,
            events,
            junit,
        } => {
            let opts = otarig::fleet::FleetOptions {
                devices,
                broker,
                server,
                speedup,
                telemetry_ms: match telemetry_period.trim() {
                    "0" => 0,
                    t => parse_duration(t)
                        .map_err(|e| anyhow::anyhow!("--telemetry-period {t}: {e}"))?,
                },
                ..Default::default()
            };
            fleet(&files, opts, events.as_deref(), junit.as_deref())
        }
        Cmd::Serve { store, listen } => serve(&store, listen),
        Cmd::Board {
            pty: _,
            control,
            scenario,
        } => board(&control, scenario.as_deref()),
        Cmd::Hil {
            files,
            port,
            control,
            bench,
            events,
            junit,
        } => hil(
            &files,
            &port,
            control,
            &bench,
            events.as_deref(),
            junit.as_deref(),
        ),
        Cmd::Release { cmd } => release_cmd(cmd),
        Cmd::Bench {
            cmd: BenchCmd::Plr { threads },
        } => bench::plr(threads),
        Cmd::Bench {
            cmd: BenchCmd::Delta,
        } => bench::delta(),
        Cmd::Bench {
            cmd:
                BenchCmd::Fleet {
                    devices,
                    broker,
                    shards,
                },
        } => bench::fleet(devices, broker, shards),
        Cmd::Bench {
            cmd:
                BenchCmd::FleetShard {
                    devices,
                    shard,
                    shards,
                    broker,
                    server,
                    epoch_ms,
                },
        } => bench::fleet_shard(
            devices,
            otarig::fleet::Shard {
                index: shard,
                count: shards,
            },
            broker,
            server,
            epoch_ms,
        ),
        Cmd::Check { files } => {
            let mut bad = 0;
            for f in &files {
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
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Keys {
            cmd: KeysCmd::Export { name, dir, out },
        } => {
            let key = NamedKey::load(&dir, &name)?.trusted()?;
            let (file, bytes) = match &key.key {
                otarig_agent::PublicKey::Ed25519(k) => {
                    (format!("{name}.ed25519"), k.to_bytes().to_vec())
                }
                otarig_agent::PublicKey::Rsa(k) => {
                    use rsa::pkcs1::EncodeRsaPublicKey;
                    (
                        format!("{name}.rsa.der"),
                        k.to_pkcs1_der()?.as_bytes().to_vec(),
                    )
                }
            };
            std::fs::create_dir_all(&out)?;
            let path = out.join(file);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keys {
            cmd:
                KeysCmd::Gen {
                    name,
                    alg,
                    dir,
                    force,
                },
        } => {
            let path = dir.join(format!("{name}.pem"));
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            let key = match alg {
                KeyAlg::Ed25519 => NamedKey::generate_ed25519(&name),
                KeyAlg::Rsa => NamedKey::generate_rsa(&name)?,
            };
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, key.to_pem()?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    version,
                    project,
                    secure_version,
                    size,
                    self_test,
                    crash_on_boot,
                    no_network,
                    out,
                },
        } => {
            let spec = AppSpec {
                project,
                version,
                secure_version,
                size,
                behaviour: Behaviour {
                    self_test: match self_test {
                        SelfTestArg::Pass => SelfTest::Pass,
                        SelfTestArg::Fail => SelfTest::Fail,
                    },
                    boot: if crash_on_boot {
                        BootBehaviour::Crash
                    } else {
                        BootBehaviour::Ok
                    },
                    network: if no_network {
                        NetworkBehaviour::Never
                    } else {
                        NetworkBehaviour::Ok
                    },
                },
                chip_id: otarig_agent::image::CHIP_ID_ESP32S3,
            };
            let bytes = appimage::build(&spec);
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes, sha256 {})",
                out.display(),
                bytes.len(),
                hex::encode(otarig::store::sha256(&bytes))
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Image {
            cmd: ImageCmd::Info { file },
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let info = verify_bytes(&bytes).with_context(|| {
                format!("{} is not a bootable ESP32-S3 app image", file.display())
            })?;
            println!("version         {}", info.desc.version);
            println!("project         {}", info.desc.project_name);
            println!("secure_version  {}", info.desc.secure_version);
            println!("segments        {}", info.segment_count);
            println!("length          {} bytes", info.len);
            println!("sha256          {}", hex::encode(info.sha256));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Manifest {
            cmd: ManifestCmd::Sign { release, url, out },
        } => {
            let (_, key, mut m) = release.load()?;
            m.url = url;
            std::fs::write(&out, key.sign_manifest(&m))
                .with_context(|| format!("writing {}", out.display()))?;
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
        Cmd::Manifest {
            cmd:
                ManifestCmd::Verify {
                    file,
                    trust,
                    keys_dir,
                },
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let keys = trust
                .iter()
                .map(|id| NamedKey::load(&keys_dir, id)?.trusted())
                .collect::<anyhow::Result<Vec<_>>>()?;
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

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn fleet(
    files: &[PathBuf],
    base: otarig::fleet::FleetOptions,
    events: Option<&Path>,
    junit: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let speedup = base.speedup;
    let rt = tokio::runtime::Runtime::new()?;
    let mut failed = false;
    let mut verdicts = Vec::new();
    for f in files {
        let scenario = match Scenario::load(f) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        let progress = std::sync::Arc::new(otarig::fleet::FleetProgress::default());
        let opts = otarig::fleet::FleetOptions {
            progress: Some(progress.clone()),
            ..base.clone()
        };
        let bar = fleet_bar(f, &progress, base.telemetry_ms > 0);
        let started = std::time::Instant::now();
        let run = rt.block_on(otarig::fleet::run_fleet(&scenario, &opts));
        bar.finish_and_clear();
        let run = run?;
        let failures = expect::judge(&run, None);
        if let Some(dir) = events {
            summary::write_events_file(dir, f, &run)?;
        }
        print!("{}", summary::render(&run, &failures));
        println!(
            "wall      {:.2} s (real sockets, {speedup}x virtual time)\n",
            started.elapsed().as_secs_f64()
        );
        failed |= !failures.is_empty();
        verdicts.push(summary::Verdict {
            name: scenario.name.clone(),
            file: f.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            failures,
            skipped: None,
        });
    }
    if let Some(path) = junit {
        summary::write_junit_file(path, "otarig fleet", &verdicts)?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A live bar for a fleet run: boards heard from (by telemetry through the broker), and how
/// many are in each activity and on each version.
fn fleet_bar(
    file: &Path,
    progress: &std::sync::Arc<otarig::fleet::FleetProgress>,
    telemetry: bool,
) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:24}] {pos}/{len} boards  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{}: starting", file.display()));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let (b, p, name) = (bar.clone(), progress.clone(), file.display().to_string());
    std::thread::spawn(move || {
        while !b.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let boards = p.boards.load(std::sync::atomic::Ordering::Relaxed);
            b.set_length(boards);
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

/// Where `otarig board --pty` listens for reset and power commands unless told otherwise.
const VIRTUAL_BOARD_CONTROL: &str = "/tmp/otarig-board.sock";

fn board(control: &Path, scenario: Option<&Path>) -> anyhow::Result<ExitCode> {
    use otarig::virtual_board;
    let opts = match scenario {
        Some(p) => virtual_board::options_for(&Scenario::load(p)?)?,
        None => virtual_board::BoardOptions {
            flash_size: 4 << 20,
            device_type: "otarig-devkit-s3".into(),
            trusted_keys: ["ed25519-test", "rsa-test"]
                .iter()
                .map(|id| NamedKey::load(&fixture_dir(), id)?.trusted())
                .collect::<anyhow::Result<_>>()?,
            boot_config: otarig::board::BootConfig::default(),
            agent: None,
        },
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let b = virtual_board::start(opts, control).await?;
        println!(
            "virtual ESP32-S3 on {} (control socket {}); blank flash: waiting in download mode",
            b.pty.display(),
            b.control.display()
        );
        println!(
            "run scenarios on it: just hil --port {} --control {} scenarios/full-update.toml",
            b.pty.display(),
            b.control.display()
        );
        tokio::signal::ctrl_c().await?;
        b.stop();
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The bench file (`bench/bench.example.toml` documents it).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BenchFile {
    #[serde(default)]
    wifi: Option<BenchWifi>,
    host: Option<std::net::IpAddr>,
    reset: Option<String>,
    firmware_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BenchWifi {
    #[serde(default)]
    ssid: String,
    #[serde(default)]
    password: String,
}

fn hil(
    files: &[PathBuf],
    port: &str,
    control: Option<PathBuf>,
    bench_path: &Path,
    events: Option<&Path>,
    junit: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    use otarig_hil::flasher::Target;
    use otarig_hil::reset::ResetMethod;
    // A pty with the virtual board's default control socket next to it: that board.
    let default_control = Path::new(VIRTUAL_BOARD_CONTROL);
    let control = control.or_else(|| {
        (port.starts_with("/dev/pts/") && default_control.exists()).then(|| {
            println!(
                "{port} is a pty: using the virtual board's control socket {VIRTUAL_BOARD_CONTROL}"
            );
            default_control.to_path_buf()
        })
    });
    let bench: BenchFile = match std::fs::read_to_string(bench_path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", bench_path.display()))?,
        Err(_) if control.is_some() => BenchFile::default(),
        Err(e) => bail!(
            "{}: {e}. A real board needs a bench file: copy bench/bench.example.toml to bench/bench.toml and fill it in",
            bench_path.display()
        ),
    };
    let (target, reset) = match (&control, bench.reset.as_deref()) {
        (Some(c), _) => (Target::Virtual, ResetMethod::Control(c.clone())),
        (None, Some(r)) if r.starts_with("control:") => (
            Target::Virtual,
            ResetMethod::Control(PathBuf::from(&r["control:".len()..])),
        ),
        (None, Some(r)) if r.starts_with("command:") => (
            Target::Hardware,
            ResetMethod::Command(r["command:".len()..].to_string()),
        ),
        (None, Some("rts") | None) => (Target::Hardware, ResetMethod::Rts),
        (None, Some(other)) => bail!(
            "{}: reset = \"{other}\" is not rts, command:CMD or control:PATH",
            bench_path.display()
        ),
    };
    let wifi = bench.wifi.unwrap_or_default();
    let host = match (bench.host, target) {
        (Some(h), _) => h,
        (None, Target::Virtual) => std::net::Ipv4Addr::LOCALHOST.into(),
        (None, Target::Hardware) => bail!(
            "{}: set host = \"<this PC's address on the board's network>\" so the board can reach the broker and server",
            bench_path.display()
        ),
    };
    let opts = otarig::hil::HilOptions {
        port: port.to_string(),
        target,
        reset,
        host,
        wifi_ssid: std::env::var("OTARIG_WIFI_SSID").unwrap_or(wifi.ssid),
        wifi_password: std::env::var("OTARIG_WIFI_PASSWORD").unwrap_or(wifi.password),
        step_timeout: std::time::Duration::from_secs(30),
        quiet: std::time::Duration::from_secs(5),
        idle_skip: std::time::Duration::from_secs(2),
        log_dir: bench.log_dir.or_else(|| Some(PathBuf::from("target/hil"))),
        progress: true,
        firmware_dir: bench.firmware_dir,
    };
    println!(
        "bench: {port} ({}), broker and server on {host}",
        if target == Target::Virtual {
            "virtual board"
        } else {
            "hardware"
        }
    );
    let all: Vec<PathBuf>;
    let files = if files.is_empty() {
        let mut v: Vec<PathBuf> = std::fs::read_dir("scenarios")
            .context("no scenario files given and no scenarios/ directory here")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        all = v;
        &all[..]
    } else {
        files
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut verdicts = Vec::new();
    let mut failed = false;
    for f in files {
        let s = Scenario::load(f)?;
        let started = std::time::Instant::now();
        let result = rt.block_on(otarig::hil::run_scenario(&s, &opts));
        let mut skipped = None;
        let failures = match result {
            Ok(h) => {
                for skip in &h.skipped {
                    println!("skipped   {skip}");
                }
                if let Some(dir) = events {
                    summary::write_events_file(dir, f, &h.run)?;
                }
                let failures = expect::judge(&h.run, None);
                print!("{}", summary::render(&h.run, &failures));
                failures
            }
            Err(e) if e.downcast_ref::<otarig::hil::SimOnly>().is_some() => {
                println!("SKIP      {} ({}): {e}", s.name, f.display());
                skipped = Some(e.to_string());
                Vec::new()
            }
            Err(e) => {
                eprintln!("error: {}: {e:#}", f.display());
                vec![expect::Failure {
                    at: f.display().to_string(),
                    device: 0,
                    check: "run".into(),
                    expected: "the scenario runs on the board".into(),
                    seen: format!("{e:#}"),
                }]
            }
        };
        println!(
            "wall      {:.1} s (real time, on {port})\n",
            started.elapsed().as_secs_f64()
        );
        failed |= !failures.is_empty();
        verdicts.push(summary::Verdict {
            name: s.name.clone(),
            file: f.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            failures,
            skipped,
        });
    }
    if let Some(path) = junit {
        summary::write_junit_file(path, "otarig hil", &verdicts)?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn serve(store: &Path, listen: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let store = std::sync::Arc::new(otarig::release_store::ReleaseStore::open(store)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let server = otarig::server::Server::start(store.clone(), listen).await?;
        println!(
            "serving {} on {} (Ctrl-C stops)",
            store.root().display(),
            server.url()
        );
        tokio::signal::ctrl_c().await?;
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn release_cmd(cmd: ReleaseCmd) -> anyhow::Result<ExitCode> {
    use otarig::release_store::ReleaseStore;
    match cmd {
        ReleaseCmd::Add {
            store,
            release,
            delta_from,
        } => {
            let (bytes, key, m) = release.load()?;
            let olds = delta_from
                .iter()
                .map(|p| read(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let now = m.issued_at;
            let entry = ReleaseStore::open(&store)?.publish(&key, m, &bytes, &olds, now)?;
            println!(
                "released {} {} (sequence {}) on {}: image {} (ipfs {}), {} patch(es), log entry {}",
                entry.device_type,
                entry.version,
                entry.sequence,
                entry.channel,
                entry.image_sha256,
                entry.image_cid,
                entry.deltas_from.len(),
                entry.seq
            );
        }
        ReleaseCmd::Stage { scenario, store } => {
            let s = Scenario::load(&scenario)?;
            let prep = runner::prepare(&s)?;
            let n = prep.stage_into(&ReleaseStore::open(&store)?)?;
            println!(
                "staged {n} blob(s) of {} into {}; run it with `otarig fleet {} --server URL`",
                scenario.display(),
                store.display(),
                scenario.display()
            );
        }
        ReleaseCmd::Log {
            store,
            trust,
            keys_dir,
        } => {
            let keys = trust
                .iter()
                .map(|id| NamedKey::load(&keys_dir, id)?.trusted())
                .collect::<anyhow::Result<Vec<_>>>()?;
            let entries = ReleaseStore::open(&store)?.verify_log(&keys)?;
            for e in &entries {
                println!(
                    "{:>4}  {}  {}/{}  {}  seq {}  image {}",
                    e.seq,
                    e.published_at,
                    e.device_type,
                    e.channel,
                    e.version,
                    e.sequence,
                    &e.image_sha256[..16]
                );
            }
            println!(
                "{} entries, signatures and hash chain verified",
                entries.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn delta_cmd(cmd: DeltaCmd) -> anyhow::Result<ExitCode> {
    use otarig::delta;
    match cmd {
        DeltaCmd::Make { old, new, out } => {
            let (a, b) = (read(&old)?, read(&new)?);
            let p = delta::make(&a, &b);
            std::fs::write(&out, &p).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes, {:.2} % of the new image)",
                out.display(),
                p.len(),
                p.len() as f64 * 100.0 / b.len().max(1) as f64
            );
        }
        DeltaCmd::Apply { old, patch, out } => {
            let new = delta::apply(&read(&old)?, &read(&patch)?)
                .with_context(|| format!("applying {}", patch.display()))?;
            std::fs::write(&out, &new).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes, SHA-256 verified)",
                out.display(),
                new.len()
            );
        }
        DeltaCmd::Info { patch } => {
            let p = read(&patch)?;
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
        }
        DeltaCmd::ImportBsdiff40 { old, patch, out } => {
            let p = delta::import_bsdiff40(&read(&old)?, &read(&patch)?)
                .with_context(|| format!("importing {}", patch.display()))?;
            std::fs::write(&out, &p).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} bytes)", out.display(), p.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_bytes(bytes: &[u8]) -> anyhow::Result<otarig_agent::image::ImageInfo> {
    otarig_agent::image::verify(bytes.len() as u32, |off, buf| {
        let off = off as usize;
        let src = bytes.get(off..off + buf.len()).ok_or(())?;
        buf.copy_from_slice(src);
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(
    files: &[PathBuf],
    devices: Option<u32>,
    seed: Option<u64>,
    events: Option<&Path>,
    junit: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let mut verdicts = Vec::new();
    let bar = if files.len() > 1 {
        let b = ProgressBar::new(files.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut failed = 0;
    let mut invalid = 0;
    for f in files {
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
        let result = runner::run(
            &scenario,
            &RunOptions {
                devices,
                seed,
                ..Default::default()
            },
        )?;
        let failures = expect::judge(&result, None);
        if let Some(dir) = events {
            summary::write_events_file(dir, f, &result)?;
        }
        bar.suspend(|| {
            print!("{}", summary::render(&result, &failures));
            println!("wall      {:.2} s\n", started.elapsed().as_secs_f64());
        });
        if !failures.is_empty() {
            failed += 1;
        }
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
    if let Some(path) = junit {
        summary::write_junit_file(path, "otarig run", &verdicts)?;
    }
    Ok(if invalid > 0 {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[allow(clippy::too_many_arguments)]
fn plr(
    file: &Path,
    exhaustive: bool,
    random: bool,
    at: &[u64],
    seed: u64,
    budget: &str,
    threads: Option<usize>,
    failures_out: Option<&Path>,
    broken: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use otarig::plr;
    match broken {
        None => {}
        Some("single-copy-journal") => {
            if !cfg!(feature = "fault-injection") {
                bail!("--broken needs a build with `--features fault-injection`");
            }
            otarig_agent::fault::set_single_copy_journal(true);
        }
        Some(other) => bail!("unknown broken variant '{other}' (known: single-copy-journal)"),
    }
    let scenario = match Scenario::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
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
    let report = if !at.is_empty() {
        let g = plr::golden(&scenario)?;
        let p = plr::probe(&scenario, &g, at, seed)?;
        let mut r = plr::Report {
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
        r
    } else if exhaustive {
        plr::exhaustive(&scenario, seed, threads, &tick)?
    } else if random {
        let budget =
            std::time::Duration::from_millis(parse_duration(budget).map_err(anyhow::Error::msg)?);
        plr::random(&scenario, seed, budget, threads, &tick)?
    } else {
        bail!("say --exhaustive, --random or --at K[,K2]");
    };
    bar.finish_and_clear();
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
    if !report.known.is_empty() {
        println!(
            "known hazards     {} probe(s) hit a hazard this scenario acknowledges (plr-known-hazards); first:",
            report.known.len()
        );
        for p in report.known.iter().take(3) {
            println!("  cut at {:?}: {}", p.cuts, p.violations.join("; "));
            println!("    reproduce: {}", p.repro(file, broken));
        }
    }
    let mut lines = Vec::new();
    for p in report.failures.iter().take(20) {
        println!("  cut at {:?} (seed {}):", p.cuts, p.seed);
        for v in &p.violations {
            println!("    - {v}");
        }
        println!("    reproduce: {}", p.repro(file, broken));
    }
    for p in &report.failures {
        lines.push(p.repro(file, broken));
    }
    if let Some(path) = failures_out {
        if !lines.is_empty() {
            std::fs::write(path, lines.join("\n") + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
