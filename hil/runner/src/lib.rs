//! # otarig-hil
//!
//! The HIL runner: one scenario on one board over its serial port, real or virtual, judged by
//! the same checker as the simulator.
//!
//! For each scenario: the embedded broker and the firmware server start on an address the
//! board can reach; the board is flashed with espflash (partition table, the scenario's
//! starting firmware in its slot, otadata erased); it is provisioned over its console (Wi-Fi,
//! broker and server URLs, device id); then the runner plays the scenario's timeline (releases
//! announced over MQTT, commands and payloads, server faults, power cuts at a download
//! progress point) and records what the board's console says. The records feed
//! [`otarig_scenario::expect::judge`] exactly as a simulated run's do.
//!
//! Real time, with one liberty: when the board has been quiet for [`HilOptions::idle_skip`] and
//! the next step is further away, the runner takes it at once (a release 10 minutes after the
//! last one finds the board in the same idle state sooner). Scenario knobs only a simulator
//! can honour are skipped with a message, never silently: cuts at a given flash operation,
//! forced installs, and checks of otadata states or bootloader decisions the console does not
//! show.
//!
//! Built on `otarig-serial` (flashing, reset, power), the scenario engine, the server and the
//! fleet's embedded broker. Nothing below it may depend on it; only the CLI does.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod bench;

use anyhow::{bail, Context};
use otarig_agent::console::{self, BoardLine, HostCommand};
use otarig_agent::protocol::{self, Leaf};
use otarig_agent::{Event, OtaImgState};
use otarig_serial::flasher::{self, Image, Target};
use otarig_serial::reset::ResetMethod;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::sync::mpsc;

use otarig_esp32s3::board::BoardEvent;
use otarig_fleet::broker::EmbeddedBroker;
use otarig_scenario::runner::{
    prepare, prepare_with, DeviceReport, Record, Run, SignedRelease, What,
};
use otarig_scenario::scenario::{Check, FaultKind, PayloadTopic, Scenario, ServerFault, Step};
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::Server;

/// How to reach the board and its bench.
#[derive(Clone, Debug)]
pub struct HilOptions {
    pub port: String,
    pub target: Target,
    pub reset: ResetMethod,
    /// The address the board reaches the broker and server on (printed). 127.0.0.1 for the
    /// virtual board; the bench PC's LAN address for a real one.
    pub host: std::net::IpAddr,
    pub wifi_ssid: String,
    pub wifi_password: String,
    /// Longest wait for any one thing the board should do.
    pub step_timeout: Duration,
    /// The run ends once the timeline is played and the board has been quiet this long.
    pub quiet: Duration,
    pub idle_skip: Duration,
    /// Where each scenario's whole console is saved (NAME.console.log).
    pub log_dir: Option<PathBuf>,
    /// Show espflash progress bars.
    pub progress: bool,
    /// A real board's firmware builds (`just fw-build` output): `bootloader.bin` and one
    /// `VERSION[-VARIANT].bin` per scenario firmware (see [`firmware_file`]).
    pub firmware_dir: Option<PathBuf>,
}

/// The build of a scenario firmware for a real board: `VERSION.bin`, or with a variant suffix
/// for the behaviours the firmware's build flags select (`-selftest-fail`, `-crash`,
/// `-no-network`). What only the simulator can make (another chip id, a size) is refused.
pub fn firmware_file(
    dir: &std::path::Path,
    fw: &otarig_scenario::scenario::Firmware,
) -> anyhow::Result<Vec<u8>> {
    use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
    if fw.chip_id != otarig_agent::image::CHIP_ID_ESP32S3 {
        bail!(
            "firmware '{}' has chip id {}: only the simulator builds images for another chip",
            fw.id,
            fw.chip_id
        );
    }
    let mut name = fw.version.clone();
    if fw.self_test == SelfTest::Fail {
        name.push_str("-selftest-fail");
    }
    if fw.boot == BootBehaviour::Crash {
        name.push_str("-crash");
    }
    if fw.network == NetworkBehaviour::Never {
        name.push_str("-no-network");
    }
    let path = dir.join(format!("{name}.bin"));
    std::fs::read(&path).with_context(|| {
        format!(
            "firmware '{}' ({name}) for the real board: {} is missing; build it with `just fw-build {}`",
            fw.id,
            path.display(),
            fw.version
        )
    })
}

/// What a HIL run produced.
pub struct HilRun {
    pub run: Run,
    /// Scenario parts skipped because only the simulator can do them.
    pub skipped: Vec<String>,
    pub console: Vec<String>,
}

const DEVICE: u32 = 0;

/// A scenario that only the simulator can play; the runner reports it skipped, with why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimOnly(pub String);

/// Checks a console cannot support (otadata states, bootloader rejections): sim-only.
fn sim_only_check(c: &Check) -> bool {
    matches!(c, Check::UpdateSlotState(_) | Check::BootloaderRejected(_))
}

/// What the runner knows of the board, from its console.
#[derive(Default)]
struct Observed {
    records: Vec<Record>,
    acks: HashSet<(u64, &'static str)>,
    last_booted: Option<Event>,
    confirmed_since_boot: bool,
    bricked: Option<String>,
    image_size: u64,
    last_line_at: Option<Instant>,
    progress_pct: u32,
    /// A release is being worked on (between its first download event and its ack): silence
    /// then is a timeout or a backoff, not the end.
    busy: bool,
}

impl Observed {
    fn take(&mut self, t_ms: u64, line: &str) -> Result<(), String> {
        self.last_line_at = Some(Instant::now());
        let mut push = |what| {
            self.records.push(Record {
                t_ms,
                device: DEVICE,
                what,
            })
        };
        if line.starts_with("ESP-ROM:") {
            return Ok(());
        }
        if let Some(rest) = line
            .split_once("boot: Loaded app from partition ")
            .map(|(_, r)| r)
        {
            // "ota_0: version 2.0.0, sha256 …" (virtual) or "at offset 0x10000" (ESP-IDF).
            let (slot, version) = match rest.split_once(": version ") {
                Some((s, v)) => (s.to_string(), v.split(',').next().unwrap_or("").to_string()),
                None => (rest.to_string(), String::new()),
            };
            self.bricked = None;
            push(What::Board(BoardEvent::BootloaderStarted {
                slot,
                version,
                secure_version: 0,
                sha256: String::new(),
                otadata_valid: 0,
            }));
            return Ok(());
        }
        if line.contains("No bootable app partitions") {
            self.bricked = Some(line.to_string());
            return Ok(());
        }
        if line.contains("marked ABORTED, rolling back") {
            let slot = line.split_whitespace().nth(3).unwrap_or("").to_string();
            push(What::Board(BoardEvent::BootloaderAborted { slot }));
            return Ok(());
        }
        match console::parse_board_line(line)? {
            BoardLine::Event { event, .. } => {
                match &event {
                    Event::Booted { .. } => {
                        self.last_booted = Some(event.clone());
                        self.confirmed_since_boot = false;
                        self.progress_pct = 0;
                    }
                    Event::Confirmed { .. } => self.confirmed_since_boot = true,
                    Event::Downloading { size, .. } => {
                        self.image_size = *size as u64;
                        self.busy = true;
                    }
                    Event::Progress { written, size, .. } => {
                        self.progress_pct = (*written as u64 * 100 / (*size).max(1) as u64) as u32
                    }
                    Event::BootSet { slot, .. } => {
                        push(What::Board(BoardEvent::BootPartitionSet {
                            slot: slot.to_string(),
                        }))
                    }
                    _ => {}
                }
                push(What::Agent(event));
            }
            BoardLine::Ack { ack, .. } => {
                self.busy = false;
                let fresh = self.acks.insert((ack.sequence, ack.outcome.name()));
                push(What::Ack {
                    ack,
                    duplicate: !fresh,
                });
            }
            BoardLine::Notice { .. } | BoardLine::Log => {}
        }
        Ok(())
    }

    fn report(&self, id: &str, fetched: u64, cuts: u32) -> DeviceReport {
        let (version, slot, state, sha) = match &self.last_booted {
            Some(Event::Booted {
                version,
                slot,
                sha256,
                state,
            }) => (
                Some(version.clone()),
                Some(slot.to_string()),
                if self.confirmed_since_boot {
                    OtaImgState::Valid.name().to_string()
                } else {
                    state.map_or("none", |s| s.name()).to_string()
                },
                Some(*sha256),
            ),
            _ => (None, None, "none".to_string(), None),
        };
        DeviceReport {
            index: DEVICE,
            id: id.to_string(),
            version: if self.bricked.is_some() {
                None
            } else {
                version
            },
            running_slot: slot,
            running_state: state,
            update_slot_state: None,
            bricked: self.bricked.clone(),
            crash_loop: None,
            fetched_bytes: fetched,
            image_size: self.image_size,
            power_cuts: cuts,
            running_sha256: sha,
            efuse: 0,
            flash_ops: 0,
        }
    }
}

/// The serial console: lines in on a channel (a reader thread), commands out.
struct Console {
    lines: mpsc::UnboundedReceiver<String>,
    /// Replaced by the reader when it reopens the port.
    out: Arc<std::sync::Mutex<Box<dyn otarig_serial::serialport::SerialPort>>>,
    log: Vec<String>,
    /// Tells the reader thread to let go of the port (the next scenario flashes through it).
    stop: Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Console {
    fn open(port: &str) -> anyhow::Result<Console> {
        let open = |port: &str| {
            otarig_serial::serialport::new(port, 115_200)
                .timeout(Duration::from_millis(100))
                .open()
        };
        let p = open(port).with_context(|| format!("opening the console on {port}"))?;
        let out = Arc::new(std::sync::Mutex::new(
            p.try_clone().context("cloning the serial port")?,
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (halt, writer, name) = (stop.clone(), out.clone(), port.to_string());
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(p);
            let mut buf = Vec::new();
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        if buf.ends_with(b"\n") {
                            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                            buf.clear();
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        // A reset through USB-Serial-JTAG takes the port away for a moment:
                        // reopen it for up to 10 s before giving up.
                        tracing::info!("console {name}: {e}; reopening");
                        let again = (0..50).find_map(|_| {
                            std::thread::sleep(Duration::from_millis(200));
                            if halt.load(std::sync::atomic::Ordering::Relaxed) {
                                return None;
                            }
                            open(&name).ok()
                        });
                        let Some(p) = again else { break };
                        if let (Ok(w), Ok(mut out)) = (p.try_clone(), writer.lock()) {
                            *out = w;
                        }
                        r = BufReader::new(p);
                    }
                }
            }
        });
        Ok(Console {
            lines: rx,
            out,
            log: Vec::new(),
            stop,
            reader: Some(reader),
        })
    }

    fn send(&mut self, cmd: &HostCommand) -> anyhow::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(console::command_line(cmd).as_bytes())
            .context("writing to the console")?;
        out.flush()?;
        Ok(())
    }

    /// The last lines, for error messages.
    fn tail(&self) -> String {
        let n = self.log.len().saturating_sub(15);
        self.log[n..].join("\n    ")
    }
}

/// Run one scenario on the board.
pub async fn run_scenario(scenario: &Scenario, opts: &HilOptions) -> anyhow::Result<HilRun> {
    let started = Instant::now();
    let mut s = scenario.clone();
    s.set_devices(1);
    let mut skipped = Vec::new();
    for e in &mut s.expects {
        e.checks.retain(|c| {
            let keep = !sim_only_check(c);
            if !keep {
                skipped.push(format!("{}: check {} (simulator only: the console does not show otadata states or bootloader rejections)", e.at, c.key()));
            }
            keep
        });
    }
    let prep = match (opts.target, &opts.firmware_dir) {
        (Target::Virtual, _) => prepare(&s)?,
        (Target::Hardware, Some(dir)) => prepare_with(&s, &|fw| firmware_file(dir, fw))?,
        (Target::Hardware, None) => bail!(
            "a real board runs the firmware built for it: set firmware-dir in the bench file (the output of `just fw-build`)"
        ),
    };
    let id = s.device_id(DEVICE);

    // Broker and server where the board can reach them.
    let host = opts.host;
    let broker = tokio::task::spawn_blocking(move || EmbeddedBroker::start_on(host, 8)).await??;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ReleaseStore::open(dir.path())?);
    prep.stage_into(&store)?;
    let server = Server::start(store.clone(), std::net::SocketAddr::new(host, 0)).await?;
    let mut faults = s.server_faults_for(DEVICE);
    let first_size = s
        .releases
        .first()
        .map_or(0, |r| prep.images[&r.firmware].len() as u64);
    let mut cut_at: Option<u32> = None;
    for f in &s.faults {
        match &f.kind {
            FaultKind::PowerLoss(pl) if pl.progress.is_some() && !pl.sim_only() => {
                cut_at = pl.progress;
                // Pace the download so the cut lands near its point: about ten seconds.
                let rate = (first_size / 10).max(16 * 1024) as u32;
                faults.push((ServerFault::Throttle(rate), None));
            }
            FaultKind::PowerLoss(pl) => {
                return Err(SimOnly(format!(
                    "a power cut in phase {:?}{} needs the simulator (a bench cuts power at a download progress point)",
                    pl.phase,
                    pl.op.map(|n| format!(", operation {n}")).unwrap_or_default()
                ))
                .into())
            }
            FaultKind::ForceInstall { .. } => {
                return Err(SimOnly(
                    "force-install writes a slot behind the agent: simulator only".into(),
                )
                .into())
            }
            _ => {}
        }
    }
    if !faults.is_empty() {
        server.faults.set(&id, faults);
    }
    let broker_url = format!("mqtt://{}", broker.addr);
    tracing::info!(broker = %broker_url, server = %server.url(), "bench services for {}", s.name);

    // Flash what the scenario's boards start with: partition table, the starting firmware in
    // its slot, otadata erased.
    let mut images = Vec::new();
    if let (Target::Hardware, Some(dir)) = (opts.target, &opts.firmware_dir) {
        // ESP32-S3's second-stage bootloader lives at 0x0 (built with app rollback enabled).
        let path = dir.join("bootloader.bin");
        let data = std::fs::read(&path)
            .with_context(|| format!("{} is missing (just fw-build)", path.display()))?;
        images.push(Image {
            name: "bootloader".into(),
            addr: 0,
            data,
        });
    }
    images.push(Image {
        name: "partition table".into(),
        addr: otarig_esp32s3::partition::TABLE_OFFSET,
        data: prep.proto.table().to_binary(),
    });
    // A fresh board per scenario: otadata (espflash never writes it), the agent's journal
    // (it remembers the last release sequence, which would refuse this scenario's releases as
    // replays) and NVS (provisioning follows) are erased by writing 0xFF.
    let table = prep.proto.table();
    let erased = [
        table.otadata(),
        table.find(otarig_esp32s3::partition::AGENT_LABEL),
        table.find("nvs"),
    ];
    for p in erased.into_iter().flatten() {
        images.push(Image {
            name: format!("{} (erased)", p.label),
            addr: p.offset,
            data: vec![0xFF; p.size as usize],
        });
    }
    let start_slot = prep
        .proto
        .table()
        .app_slots()
        .into_iter()
        .find(|sl| sl.kind == prep.start_slot)
        .context("the scenario's partition table lost its starting slot")?;
    let start_image = &prep.images[&s.start_firmware];
    images.push(Image {
        name: format!("app {} -> {}", s.start_firmware, start_slot.kind),
        addr: start_slot.address,
        data: start_image.to_vec(),
    });
    opts.reset.download_mode()?;
    let port = opts.port.clone();
    let target = opts.target;
    let show = opts.progress;
    tokio::task::spawn_blocking(move || {
        let mut bars = if show {
            flasher::Bars::new("flashing")
        } else {
            flasher::Bars::quiet()
        };
        flasher::flash(&port, target, &images, &mut bars)
    })
    .await??;

    let mut con = Console::open(&opts.port)?;
    let mut seen = Observed::default();
    let t0 = Instant::now();
    let now_ms = |t0: Instant| t0.elapsed().as_millis() as u64;

    // Provision, and wait for the board to say so.
    con.send(&HostCommand::Provision {
        device: id.clone(),
        broker: broker_url.clone(),
        server: server.url(),
        channel: Some(s.channel_for(DEVICE).to_string()),
        wifi_ssid: opts.wifi_ssid.clone(),
        wifi_password: opts.wifi_password.clone(),
    })?;
    let deadline = Instant::now() + opts.step_timeout;
    loop {
        let line = tokio::time::timeout_at(deadline.into(), con.lines.recv()).await;
        match line {
            Ok(Some(l)) => {
                con.log.push(l.clone());
                // What it says before that (its first, unprovisioned boot) is not the
                // scenario's: the simulated boards start provisioned.
                if l.contains("\"kind\":\"provisioned\"") {
                    break;
                }
            }
            _ => bail!(
                "{} did not confirm provisioning within {:?}; last console lines:\n    {}",
                opts.port,
                opts.step_timeout,
                con.tail()
            ),
        }
    }

    // The server's MQTT client.
    let mut o = MqttOptions::new(
        format!("otarig-hil-{}", std::process::id()),
        broker.addr.ip().to_string(),
        broker.addr.port(),
    );
    o.set_max_packet_size(
        otarig_fleet::broker::MAX_PACKET,
        otarig_fleet::broker::MAX_PACKET,
    );
    let (control, mut control_loop) = AsyncClient::new(o, 64);
    let control_task = tokio::spawn(async move { while control_loop.poll().await.is_ok() {} });

    // The timeline, with idle time skipped.
    let steps = s.timeline();
    let mut skew = 0u64; // ms of idle time skipped so far
    let mut cuts = 0u32;
    let mut next = 0usize;
    let mut last_step = Instant::now();
    let hard_deadline = Instant::now() + opts.step_timeout * 20;
    loop {
        let t = now_ms(t0) + skew;
        if next < steps.len() {
            let (at, _) = &steps[next];
            // Quiet since its last line and since the last step: the board had time to act.
            let quiet = seen
                .last_line_at
                .is_none_or(|l| l.elapsed() >= opts.idle_skip)
                && last_step.elapsed() >= opts.idle_skip;
            if *at > t && quiet {
                skew += at - t;
            }
            if *at <= now_ms(t0) + skew {
                match &steps[next].1 {
                    Step::Release(k) => {
                        let SignedRelease {
                            device_type: dt,
                            channel: ch,
                            manifest: signed,
                            ..
                        } = &prep.releases[*k];
                        store.set_latest(dt, ch, signed)?;
                        let payload =
                            protocol::announcement(signed).map_err(|e| anyhow::anyhow!("{e}"))?;
                        control
                            .publish(
                                protocol::release_topic(protocol::DEFAULT_PREFIX, dt, ch),
                                QoS::AtLeastOnce,
                                true,
                                payload,
                            )
                            .await?;
                    }
                    Step::Fault(n) => match &s.faults[*n].kind {
                        FaultKind::Command { cmd, repeat, .. } => {
                            let payload = protocol::command(&format!("c-{n}"), *cmd);
                            for _ in 0..*repeat {
                                control
                                    .publish(
                                        protocol::device_topic(
                                            protocol::DEFAULT_PREFIX,
                                            &id,
                                            Leaf::Cmd,
                                        ),
                                        QoS::AtLeastOnce,
                                        false,
                                        payload.clone(),
                                    )
                                    .await?;
                            }
                        }
                        FaultKind::Payload { topic, text, .. } => {
                            let topic = match topic {
                                PayloadTopic::Cmd => {
                                    protocol::device_topic(protocol::DEFAULT_PREFIX, &id, Leaf::Cmd)
                                }
                                PayloadTopic::Release => protocol::release_topic(
                                    protocol::DEFAULT_PREFIX,
                                    &s.device_type,
                                    &s.channel,
                                ),
                            };
                            control
                                .publish(topic, QoS::AtLeastOnce, false, text.clone().into_bytes())
                                .await?;
                        }
                        _ => {}
                    },
                }
                next += 1;
                last_step = Instant::now();
                continue;
            }
        } else if !seen.busy && seen.last_line_at.is_some_and(|l| l.elapsed() >= opts.quiet) {
            break;
        }
        if Instant::now() > hard_deadline {
            bail!(
                "{}: the scenario did not settle within {:?}; last console lines:\n    {}",
                s.name,
                opts.step_timeout * 20,
                con.tail()
            );
        }
        if let Ok(Some(l)) =
            tokio::time::timeout(Duration::from_millis(100), con.lines.recv()).await
        {
            con.log.push(l.clone());
            if let Err(e) = seen.take(now_ms(t0) + skew, &l) {
                tracing::warn!("console line not understood ({e}): {l}");
            }
            if let Some(pct) = cut_at {
                if seen.progress_pct >= pct {
                    cut_at = None;
                    cuts += 1;
                    tracing::info!("power cut at {}% of the download", seen.progress_pct);
                    let (out, reset) = (con.out.clone(), opts.reset.clone());
                    tokio::task::spawn_blocking(move || {
                        let mut port = out.lock().unwrap_or_else(|p| p.into_inner());
                        reset.power_cut(&mut **port, Duration::from_millis(300))
                    })
                    .await??;
                }
            }
        }
    }
    let fetched = server.faults.served(&id);
    let _ = control.disconnect().await;
    control_task.abort();
    server.shutdown().await;
    if let Some(dir) = &opts.log_dir {
        std::fs::create_dir_all(dir)?;
        let stem = s
            .path
            .file_stem()
            .and_then(|x| x.to_str())
            .unwrap_or("scenario");
        let mut f = std::fs::File::create(dir.join(format!("{stem}.console.log")))?;
        for l in &con.log {
            writeln!(f, "{l}")?;
        }
    }
    let report = seen.report(&id, fetched, cuts);
    let end_ms = now_ms(t0) + skew;
    tracing::info!(
        "{} done in {:.1} s",
        s.name,
        started.elapsed().as_secs_f64()
    );
    Ok(HilRun {
        run: Run {
            scenario: s,
            records: seen.records,
            devices: vec![report],
            end_ms,
            served_bytes: fetched,
        },
        skipped,
        console: std::mem::take(&mut con.log),
    })
}
