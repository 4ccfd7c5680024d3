//! The fleet on the wire: every board is a tokio task with its own MQTT connection (rumqttc)
//! to the broker and its own HTTP client to the firmware server, running the same agent on its
//! own simulated flash. The broker is embedded (or external, by URL) and the server is the real
//! one over a store directory; both listen on loopback.
//!
//! Time is scaled: the agent and the scenario see virtual milliseconds that run `speedup`
//! times faster than the wall clock, so a scenario's minutes pass in seconds while network
//! I/O is real. The run ends at the scenario's duration, or earlier once every release and
//! fault is out and nothing has happened on any board for `quiet_ms` of virtual time.
//!
//! The same expectations checker judges the result: the fleet produces the same [`Run`] as the
//! deterministic runner (event records and final flash of every board).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hyper::body::Incoming;
use otarig_agent::protocol::{self, Leaf};
use otarig_agent::{Action, Agent, Config, Event, Input};
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::board_http::{self, BoardHttp};
use crate::broker::EmbeddedBroker;
use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
use otarig_esp32s3::board::{BoardEvent, BootOutcome};
use otarig_scenario::runner::{
    self, new_device, prepare, report, Dev, Record, Run, RunOptions, SignedRelease, What, EPOCH_MS,
};
use otarig_scenario::scenario::{FaultKind, PayloadTopic, Scenario, Step};
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::Server;

const PREFIX: &str = protocol::DEFAULT_PREFIX;

/// Fleet runs started by this process (names each run's operator MQTT client).
static RUNS: AtomicU64 = AtomicU64::new(0);

/// How to run a fleet.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub devices: Option<u32>,
    /// `mqtt://host:port` of an external broker instead of the embedded one.
    pub broker: Option<String>,
    /// `http://host:port` of an external firmware server (`otarig serve`) instead of the
    /// embedded one. It must already hold the scenario's blobs (`otarig release stage`); the
    /// fleet still announces each release over MQTT at its time.
    pub server: Option<String>,
    /// Virtual milliseconds per real millisecond.
    pub speedup: f64,
    /// End the run after this much virtual quiet (no event on any board).
    pub quiet_ms: u64,
    /// Each board publishes telemetry this often (virtual ms; 0: never).
    pub telemetry_ms: u64,
    /// Filled in as the run goes, from the telemetry the broker delivers (for a progress bar).
    pub progress: Option<Arc<FleetProgress>>,
    /// Simulate only this share of the fleet (the scale benchmark runs one per process; see
    /// [`Shard`]).
    pub shard: Option<Shard>,
    /// The wall-clock time of virtual time 0, so that shards in different processes share one
    /// timeline (the run waits for it if it is ahead). `None`: when the boards are created.
    pub epoch: Option<std::time::SystemTime>,
}

/// One of `count` processes that together simulate a fleet: it runs boards `i` with
/// `i % count == index`, and shard 0 alone speaks for the operator (clears and publishes the
/// retained release announcements). Each board keeps its id, channel and behaviour, so the
/// union of the shards is the same fleet. Needs an external broker and server, and no staged
/// rollout or injected fault (those are steered from one process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    fn holds(&self, device: u32) -> bool {
        device % self.count == self.index
    }
    fn speaks(&self) -> bool {
        self.index == 0
    }
}

/// How many boards have each value, sorted by value.
pub type Tally = Vec<(String, u32)>;

/// What the operator sees of a running fleet: each board's latest telemetry sample as
/// received from the broker (so it shows what a real fleet dashboard would, not the boards'
/// memory).
#[derive(Debug, Default)]
pub struct FleetProgress {
    latest: Mutex<std::collections::HashMap<String, (String, String)>>,
    samples: AtomicU64,
    pub boards: AtomicU64,
}

impl FleetProgress {
    fn sample(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(field("device"), (field("activity"), field("version")));
    }

    /// Telemetry samples received so far.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Boards by activity and by running version, from their latest sample, sorted by name.
    pub fn counts(&self) -> (Tally, Tally) {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_activity = std::collections::BTreeMap::new();
        let mut by_version = std::collections::BTreeMap::new();
        for (activity, version) in latest.values() {
            *by_activity.entry(activity.clone()).or_insert(0) += 1;
            *by_version.entry(version.clone()).or_insert(0) += 1;
        }
        (
            by_activity.into_iter().collect(),
            by_version.into_iter().collect(),
        )
    }
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            devices: None,
            broker: None,
            server: None,
            speedup: 50.0,
            quiet_ms: 150_000,
            telemetry_ms: 1_000,
            progress: None,
            shard: None,
            epoch: None,
        }
    }
}

#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    speedup: f64,
}

impl Clock {
    fn now(&self) -> u64 {
        (self.start.elapsed().as_secs_f64() * 1000.0 * self.speedup) as u64
    }
    fn real(&self, virtual_ms: u64) -> Duration {
        Duration::from_secs_f64(virtual_ms as f64 / 1000.0 / self.speedup)
    }
    async fn sleep_until(&self, at: u64) {
        let now = self.now();
        if at > now {
            tokio::time::sleep(self.real(at - now)).await;
        }
    }
}

/// What every board task of one run shares. The virtual board uses it for its single board.
pub(crate) struct Shared {
    clock: Clock,
    records: Mutex<Vec<Record>>,
    last_activity: AtomicU64,
    server: String,
    broker: (String, u16),
    cfg: Config,
    acked: Mutex<HashSet<(String, u64, &'static str)>>,
    telemetry_ms: u64,
    /// No network at all (a virtual board not provisioned yet).
    offline: bool,
    /// Where a virtual board prints its console (events as console-protocol lines).
    console: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Shared {
    /// For one virtual board: real time, its provisioned broker and server (None: offline),
    /// events rendered to `console`.
    pub(crate) fn for_virtual_board(
        cfg: Config,
        network: Option<((String, u16), String)>,
        console: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> anyhow::Result<Shared> {
        let offline = network.is_none();
        let (broker, server) = network.unwrap_or_else(|| ((String::new(), 0), String::new()));
        Ok(Shared {
            clock: Clock {
                start: Instant::now(),
                speedup: 1.0,
            },
            records: Mutex::new(Vec::new()),
            last_activity: AtomicU64::new(0),
            server,
            broker,
            cfg,
            acked: Mutex::new(HashSet::new()),
            telemetry_ms: 1_000,
            offline,
            console: Some(console),
        })
    }

    fn record(&self, device: u32, what: What) {
        let t = self.clock.now();
        self.last_activity.fetch_max(t, Ordering::Relaxed);
        if let Some(console) = &self.console {
            let id = &self.cfg.device_id;
            let line = match &what {
                What::Agent(e) => Some(otarig_agent::console::event_line(id, t, e)),
                What::Ack { ack, .. } => Some(otarig_agent::console::ack_line(id, t, ack)),
                What::Board(b) => Some(otarig_esp32s3::boot_log::bootloader_log(t, b)),
                _ => None,
            };
            if let Some(line) = line {
                let _ = console.send(line);
            }
        }
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        r.push(Record {
            t_ms: t,
            device,
            what,
        });
    }
}

pub(crate) enum Ctl {
    Force(Arc<Vec<u8>>),
    /// The bench asked over the console for a `report` event.
    Report,
}

enum Net {
    ConnAck,
    Publish(String, Vec<u8>),
}

enum Io {
    Manifest(Vec<u8>),
    /// A range's answer arrived; its body is read by the board task itself (straight from
    /// the connection into the agent, no copy and no hop through another task).
    Response {
        offset: u32,
        body: Incoming,
    },
    FetchFailed(String),
}

/// A body being read into the agent: where its next byte goes, and when waiting for it
/// stops (each read has its own timeout, like `esp_http_client`'s `timeout_ms`).
struct Reading {
    body: Incoming,
    pos: u32,
    timeout: Duration,
    deadline: tokio::time::Instant,
}

impl Reading {
    fn new(body: Incoming, pos: u32, timeout: Duration) -> Reading {
        Reading {
            body,
            pos,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
        }
    }
}

/// Why a fetch ended when the network went quiet.
fn no_data() -> String {
    format!("no data within {} s", runner::FETCH_TIMEOUT_MS / 1000)
}

enum BootEnd {
    Stop,
    Reboot(u64),
    PowerCut,
}

fn parse_broker(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    let port: u16 = port
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("broker URL '{url}': port is not a number"))?;
    if host.is_empty() {
        bail!("broker URL '{url}' has no host (expected mqtt://HOST:PORT)");
    }
    Ok((host.to_string(), port))
}

/// Refuse early, saying what to do, when `boards` connections at `per_board` descriptors each
/// do not fit this process's open-files limit (`ulimit -n`; Linux). Running out halfway would
/// fail boards at random instead. `whose` names the connections, for the message.
pub fn check_open_files(boards: u32, per_board: u64, whose: &str) -> anyhow::Result<()> {
    let needed = boards as u64 * per_board + 256;
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        });
    if let Some(limit) = limit.filter(|l| *l < needed) {
        bail!(
            "{boards} boards need about {needed} open files for {whose} connections in this process ({per_board} per board); the limit is {limit} (ulimit -n). Raise it (ulimit -n {needed}; past the hard limit that needs root or LimitNOFILE), or run fewer boards per process: `otarig bench fleet` spreads them over shard processes"
        );
    }
    Ok(())
}

/// Run a scenario over real sockets.
pub async fn run_fleet(scenario: &Scenario, opts: &FleetOptions) -> anyhow::Result<Run> {
    let mut s = scenario.clone();
    if let Some(n) = opts.devices {
        s.set_devices(n);
    }
    if opts.shard.is_some() {
        if opts.server.is_none() || opts.broker.is_none() {
            bail!("a fleet shard needs an external broker and server (--broker, --server)");
        }
        if s.releases.iter().any(|r| r.rollout.is_some()) || !s.faults.is_empty() {
            bail!("a fleet shard runs no staged rollout or injected fault: those are steered from one process");
        }
    }
    let speaks = opts.shard.is_none_or(|sh| sh.speaks());
    // Each board holds an MQTT and an HTTP connection; an embedded broker or server holds
    // the other end of one.
    let here = match opts.shard {
        Some(sh) => s.devices.div_ceil(sh.count),
        None => s.devices,
    };
    let per_board = 2 + opts.broker.is_none() as u64 + opts.server.is_none() as u64;
    check_open_files(here, per_board, "the boards'")?;
    let prep = prepare(&s)?;
    let dir = tempfile::tempdir().context("creating the store directory")?;
    let (local, server_url) = match &opts.server {
        None => {
            let store = Arc::new(ReleaseStore::open(dir.path())?);
            prep.stage_into(&store)?;
            let server = Server::start(store.clone(), "127.0.0.1:0".parse()?).await?;
            server.faults.set_speedup(opts.speedup.max(1.0));
            for i in 0..s.devices {
                let faults = s.server_faults_for(i);
                if !faults.is_empty() {
                    server.faults.set(&s.device_id(i), faults);
                }
            }
            let url = server.url();
            (Some((server, store)), url)
        }
        Some(url) => {
            check_external_server(&s, &prep, url).await?;
            (None, url.trim_end_matches('/').to_string())
        }
    };
    let broker = match &opts.broker {
        Some(url) => parse_broker(url)?,
        None => {
            let devices = s.devices as usize;
            let b =
                tokio::task::spawn_blocking(move || EmbeddedBroker::start(devices * 2)).await??;
            (b.addr.ip().to_string(), b.addr.port())
        }
    };
    let start = match opts
        .epoch
        .map(|e| e.duration_since(std::time::SystemTime::now()))
    {
        // The epoch is ahead: wait for it.
        Some(Ok(ahead)) => {
            tokio::time::sleep(ahead).await;
            Instant::now()
        }
        Some(Err(behind)) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
        None => Instant::now(),
    };
    let clock = Clock {
        start,
        speedup: opts.speedup.max(1.0),
    };
    let shared = Arc::new(Shared {
        clock,
        records: Mutex::new(Vec::new()),
        last_activity: AtomicU64::new(0),
        server: server_url,
        broker: broker.clone(),
        cfg: prep.cfg_template.clone(),
        acked: Mutex::new(HashSet::new()),
        telemetry_ms: opts.telemetry_ms,
        offline: false,
        console: None,
    });
    let progress = opts.progress.clone();
    if let Some(p) = &progress {
        p.boards.store(s.devices as u64, Ordering::Relaxed);
    }

    // The server's own MQTT client: release announcements and commands.
    let mut o = MqttOptions::new(
        // Unique per run, not just per process: two runs on one broker (shards in one
        // process, concurrent tests) would otherwise take over each other's session.
        format!(
            "otarig-server-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ),
        broker.0.clone(),
        broker.1,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(crate::broker::MAX_PACKET, crate::broker::MAX_PACKET);
    let (control, mut control_loop) = AsyncClient::new(o, 256);
    // What the broker confirmed: the connection (false) or a publish (true).
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<bool>();
    let control_task = tokio::spawn(async move {
        loop {
            match control_loop.poll().await {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = acked_tx.send(false);
                }
                Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => {
                    let _ = acked_tx.send(true);
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    if let Some(pr) = &progress {
                        pr.sample(&p.payload);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await, // reconnects on the next poll
            }
        }
    });
    // A broker that outlives runs (an external one) still holds the retained announcements of
    // earlier runs: clear this fleet's release topics before any board subscribes, and wait for
    // the broker to confirm, which also proves it is reachable.
    let mut channels: Vec<&str> = std::iter::once(s.channel.as_str())
        .chain(s.channel_of.iter().map(|(c, _)| c.as_str()))
        .collect();
    channels.sort();
    channels.dedup();
    for ch in channels.iter().filter(|_| speaks) {
        control
            .publish(
                protocol::release_topic(PREFIX, &s.device_type, ch),
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await?;
    }
    if opts.progress.is_some() && opts.telemetry_ms > 0 {
        let all = protocol::device_topic(PREFIX, "+", Leaf::Telemetry);
        control.subscribe(all, QoS::AtMostOnce).await?;
    }
    // Every run proves the broker answers (a shard that does not speak only connects).
    let (mut connected, mut cleared) = (false, 0);
    let clears = if speaks { channels.len() } else { 0 };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !connected || cleared < clears {
        match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
            Ok(Some(false)) => connected = true,
            Ok(Some(true)) => cleared += 1,
            _ => bail!(
                "the MQTT broker at {}:{} did not acknowledge within 10 s: is it running and reachable?",
                broker.0,
                broker.1
            ),
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let first_size = s
        .releases
        .first()
        .map(|r| prep.images[&r.firmware].len() as u64)
        .unwrap_or(0);
    // Boards that install the same release write the same sectors: share them.
    let pool = Arc::new(otarig_esp32s3::flash::SectorPool::default());
    let mut boards: Vec<(u32, JoinHandle<Dev>)> = Vec::new();
    let mut controls = Vec::new();
    for i in 0..s.devices {
        if opts.shard.is_some_and(|sh| !sh.holds(i)) {
            controls.push(None);
            continue;
        }
        let mut dev = new_device(&s, &prep.proto, &RunOptions::default(), first_size, i);
        dev.board.flash.set_pool(pool.clone());
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        controls.push(Some(ctl_tx));
        let (sh, stop) = (shared.clone(), stop_rx.clone());
        boards.push((
            i,
            tokio::spawn(async move {
                // Stagger connects: thousands of simultaneous CONNECTs overwhelm a small machine.
                tokio::time::sleep(Duration::from_millis(i as u64 % 1000 * 2)).await;
                board_task(i, dev, sh, stop, ctl_rx).await
            }),
        ));
    }

    // The timeline of releases and faults, in virtual time.
    let timeline = s.timeline();
    let mut rollouts: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    for (at, step) in timeline {
        shared.clock.sleep_until(at).await;
        match step {
            Step::Release(k) if s.releases[k].rollout.is_some() => {
                let SignedRelease {
                    channel: ch,
                    manifest: signed,
                    sequence: seq,
                    version,
                    ..
                } = prep.releases[k].clone();
                shared.record(
                    u32::MAX,
                    What::Release {
                        sequence: seq,
                        version,
                    },
                );
                let eligible: Vec<u32> =
                    (0..s.devices).filter(|i| s.channel_for(*i) == ch).collect();
                let plan = s.releases[k].rollout.clone().context("rollout plan")?;
                rollouts.push(tokio::spawn(run_rollout(
                    shared.clone(),
                    otarig_server::rollout::Rollout::new(plan, eligible),
                    RolloutCtx {
                        release: prep.releases[k].clone(),
                        signed,
                        ids: (0..s.devices).map(|i| s.device_id(i)).collect(),
                        offers: local
                            .as_ref()
                            .map(|(srv, _)| srv.offers.clone())
                            .context("a staged rollout needs the embedded server")?,
                        store: local
                            .as_ref()
                            .map(|(_, st)| st.clone())
                            .context("a staged rollout needs the embedded server")?,
                        control: control.clone(),
                    },
                )));
            }
            Step::Release(k) => {
                let SignedRelease {
                    device_type: dt,
                    channel: ch,
                    manifest: signed,
                    sequence: seq,
                    version,
                } = prep.releases[k].clone();
                if let Some((_, store)) = &local {
                    store.set_latest(&dt, &ch, &signed)?;
                }
                shared.record(
                    u32::MAX,
                    What::Release {
                        sequence: seq,
                        version,
                    },
                );
                if speaks {
                    announce(&control, &dt, &ch, &signed).await?;
                }
            }
            Step::Fault(n) => {
                let f = &s.faults[n];
                let targets: Vec<u32> = (0..s.devices).filter(|i| f.devices.contains(*i)).collect();
                match &f.kind {
                    FaultKind::Command { cmd, repeat, .. } => {
                        let payload = protocol::command(&format!("c-{n}"), *cmd);
                        for i in &targets {
                            let topic = protocol::device_topic(PREFIX, &s.device_id(*i), Leaf::Cmd);
                            for _ in 0..*repeat {
                                control
                                    .publish(
                                        topic.clone(),
                                        QoS::AtLeastOnce,
                                        false,
                                        payload.clone(),
                                    )
                                    .await?;
                            }
                        }
                    }
                    FaultKind::Payload { topic, text, .. } => {
                        for i in &targets {
                            let t = match topic {
                                PayloadTopic::Cmd => {
                                    protocol::device_topic(PREFIX, &s.device_id(*i), Leaf::Cmd)
                                }
                                PayloadTopic::Release => {
                                    protocol::release_topic(PREFIX, &s.device_type, &s.channel)
                                }
                            };
                            control
                                .publish(t, QoS::AtLeastOnce, false, text.clone())
                                .await?;
                            if matches!(topic, PayloadTopic::Release) {
                                break; // one publish reaches every board
                            }
                        }
                    }
                    FaultKind::ForceInstall { firmware, .. } => {
                        for i in &targets {
                            if let Some(Some(c)) = controls.get(*i as usize) {
                                let _ = c.send(Ctl::Force(prep.images[firmware].clone())).await;
                            }
                        }
                    }
                    FaultKind::PowerLoss(_) | FaultKind::Server { .. } => {}
                }
            }
        }
    }
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.clock.now();
        let quiet =
            now.saturating_sub(shared.last_activity.load(Ordering::Relaxed)) >= opts.quiet_ms;
        // A rollout between waves is quiet too, but not over.
        if now >= s.duration_ms || (quiet && rollouts.iter().all(|r| r.is_finished())) {
            break;
        }
    }
    let end_ms = shared.clock.now().min(s.duration_ms);
    for r in rollouts {
        r.abort();
    }
    let _ = stop_tx.send(true);
    let mut devs = Vec::new();
    for (i, b) in boards {
        devs.push((i, b.await.context("a board task failed")?));
    }
    let _ = control.disconnect().await;
    control_task.abort();
    if let Some((server, _)) = local {
        server.shutdown().await;
    }
    let mut records =
        std::mem::take(&mut *shared.records.lock().unwrap_or_else(|p| p.into_inner()));
    records.sort_by_key(|r| r.t_ms);
    let devices = devs.iter().map(|(i, d)| report(*i, d)).collect::<Vec<_>>();
    let served_bytes = devices.iter().map(|d| d.fetched_bytes).sum();
    Ok(Run {
        scenario: s,
        records,
        devices,
        end_ms,
        served_bytes,
    })
}

/// Before boards use an external firmware server: refuse what only the embedded server can
/// do, and check the server holds every blob the scenario's releases need.
async fn check_external_server(
    s: &Scenario,
    prep: &runner::Prepared,
    url: &str,
) -> anyhow::Result<()> {
    let file = s.path.display();
    if s.releases.iter().any(|r| r.rollout.is_some()) {
        bail!("{file}: staged rollouts are driven by the embedded firmware server; run without --server");
    }
    if s.faults
        .iter()
        .any(|f| matches!(f.kind, FaultKind::Server { .. }))
    {
        bail!("{file}: server faults are injected by the embedded firmware server; run without --server");
    }
    let http = BoardHttp::new();
    for (sha, _) in prep.store.blobs() {
        let blob = format!("{}/blobs/{}", url.trim_end_matches('/'), hex::encode(sha));
        let r = tokio::time::timeout(Duration::from_secs(10), http.get(&blob, Some((0, 0))))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
            .and_then(|r| r)
            .with_context(|| format!("the firmware server at {url} does not answer (is `otarig serve --store DIR` running there?)"))?;
        if !r.status().is_success() {
            bail!(
                "the firmware server at {url} answers {} for {blob}: stage the scenario's releases first with `otarig release stage {file} --store DIR` on the server's store",
                r.status()
            );
        }
    }
    Ok(())
}

/// Make a signed manifest the retained release announcement of a device type and channel.
async fn announce(
    control: &AsyncClient,
    device_type: &str,
    channel: &str,
    signed: &[u8],
) -> anyhow::Result<()> {
    let payload = protocol::announcement(signed).map_err(|e| anyhow::anyhow!("{e}"))?;
    let topic = protocol::release_topic(PREFIX, device_type, channel);
    control
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await?;
    Ok(())
}

struct RolloutCtx {
    release: SignedRelease,
    signed: Vec<u8>,
    /// Device id of every board, by index.
    ids: Vec<String>,
    offers: Arc<otarig_server::server::Offers>,
    store: Arc<ReleaseStore>,
    control: AsyncClient,
}

/// Drive one staged rollout: offer each wave to its boards (and tell them to look now), judge
/// it after the interval from the acks, then grow, halt or finish.
async fn run_rollout(
    sh: Arc<Shared>,
    mut r: otarig_server::rollout::Rollout,
    cx: RolloutCtx,
) -> anyhow::Result<()> {
    let SignedRelease {
        device_type: dt,
        channel: ch,
        sequence: seq,
        ..
    } = cx.release.clone();
    let id = |b: u32| cx.ids[b as usize].clone();
    let mut wave = r.start();
    loop {
        sh.record(
            u32::MAX,
            What::Rollout {
                sequence: seq,
                message: format!("wave {} starts: {} board(s)", r.wave() + 1, wave.len()),
            },
        );
        for b in &wave {
            cx.offers.offer(&id(*b), cx.signed.clone());
            let cmd = protocol::command(
                &format!("rollout-{seq}-{}", r.wave()),
                protocol::CommandKind::UpdateNow,
            );
            cx.control
                .publish(
                    protocol::device_topic(PREFIX, &id(*b), Leaf::Cmd),
                    QoS::AtLeastOnce,
                    false,
                    cmd,
                )
                .await?;
        }
        let until = sh.clock.now() + r.plan().interval_ms;
        sh.clock.sleep_until(until).await;
        let failed: HashSet<String> = {
            let records = sh.records.lock().unwrap_or_else(|p| p.into_inner());
            records
                .iter()
                .filter_map(|rec| match &rec.what {
                    What::Ack { ack, .. }
                        if ack.sequence == seq
                            && ack.outcome != otarig_agent::Outcome::Installed =>
                    {
                        Some(id(rec.device))
                    }
                    _ => None,
                })
                .collect()
        };
        match r.check(|b| failed.contains(&id(b))) {
            otarig_server::rollout::Step::Next(boards) => wave = boards,
            otarig_server::rollout::Step::Halted {
                wave,
                failed,
                members,
            } => {
                sh.record(
                    u32::MAX,
                    What::Rollout {
                        sequence: seq,
                        message: format!(
                            "halted after wave {}: {failed} of {members} board(s) failed",
                            wave + 1
                        ),
                    },
                );
                return Ok(());
            }
            otarig_server::rollout::Step::Done => {
                cx.store.set_latest(&dt, &ch, &cx.signed)?;
                announce(&cx.control, &dt, &ch, &cx.signed).await?;
                sh.record(
                    u32::MAX,
                    What::Rollout {
                        sequence: seq,
                        message: "complete".into(),
                    },
                );
                return Ok(());
            }
        }
    }
}

fn drain_board(sh: &Shared, i: u32, dev: &mut Dev) {
    for e in dev.board.take_events() {
        if let BoardEvent::OtaBegin { slot, .. } = &e {
            dev.update_slot = Some(slot.clone());
        }
        sh.record(i, What::Board(e));
    }
}

pub(crate) async fn board_task(
    i: u32,
    mut dev: Dev,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut ctl: mpsc::Receiver<Ctl>,
) -> Dev {
    loop {
        if *stop.borrow() {
            break;
        }
        let outcome = dev.board.boot();
        drain_board(&sh, i, &mut dev);
        let wait = match outcome {
            BootOutcome::App(booted) => {
                dev.behaviour = booted.behaviour;
                if booted.behaviour.boot == BootBehaviour::Crash {
                    dev.crash_streak += 1;
                    dev.crashed_version = booted.info.desc.version.to_string();
                    sh.record(i, What::AppCrashed);
                    2_000
                } else {
                    dev.crash_streak = 0;
                    match run_boot(i, &mut dev, &sh, &mut stop, &mut ctl).await {
                        BootEnd::Stop => break,
                        BootEnd::Reboot(after) => after,
                        BootEnd::PowerCut => {
                            dev.cuts += 1;
                            dev.off_for_ms
                        }
                    }
                }
            }
            BootOutcome::Bricked(reason) => {
                dev.bricked = Some(reason);
                let _ = stop.changed().await;
                break;
            }
            BootOutcome::PowerLost => {
                dev.cuts += 1;
                dev.off_for_ms
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(sh.clock.real(wait)) => {}
        }
    }
    dev
}

/// One boot of one board: the agent, its MQTT connection and its HTTP requests.
async fn run_boot(
    i: u32,
    dev: &mut Dev,
    sh: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
    ctl: &mut mpsc::Receiver<Ctl>,
) -> BootEnd {
    let mut cfg = sh.cfg.clone();
    cfg.device_id = dev.id.clone();
    cfg.channel = dev.channel.clone();
    let mut agent = Agent::new(cfg);
    // A boot's own connection: a reboot drops it, as a board's does.
    let http = BoardHttp::new();
    let (net_tx, mut net_rx) = mpsc::channel::<Net>(64);
    let (io_tx, mut io_rx) = mpsc::channel::<Io>(2);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let client = if dev.behaviour.network == NetworkBehaviour::Ok && !sh.offline {
        let mut o = MqttOptions::new(dev.id.clone(), sh.broker.0.clone(), sh.broker.1);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(crate::broker::MAX_PACKET, crate::broker::MAX_PACKET);
        let (client, mut events) = AsyncClient::new(o, 64);
        tasks.push(tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                        if net_tx.send(Net::ConnAck).await.is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        if net_tx
                            .send(Net::Publish(p.topic, p.payload.to_vec()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
        Some(client)
    } else {
        None
    };
    let mut wake: Option<u64> = None;
    let mut self_test_at: Option<u64> = None;
    let booted_at = sh.clock.now();
    let mut telemetry_at = (sh.telemetry_ms > 0).then(|| booted_at + sh.telemetry_ms);
    let mut pending: Vec<Action> = Vec::new();
    let mut reading: Option<Reading> = None;

    macro_rules! feed {
        ($input:expr) => {{
            agent.handle(&mut dev.board, EPOCH_MS + sh.clock.now(), $input);
            drain_board(sh, i, dev);
            if !dev.board.is_powered() {
                tasks.iter().for_each(JoinHandle::abort);
                return BootEnd::PowerCut;
            }
            while let Some(a) = agent.poll_action() {
                pending.push(a);
            }
        }};
    }

    feed!(Input::Boot);
    loop {
        for a in std::mem::take(&mut pending) {
            match a {
                Action::RunSelfTest => self_test_at = Some(sh.clock.now() + 200),
                Action::WakeAt(t) => wake = Some(t.saturating_sub(EPOCH_MS)),
                Action::Reboot => {
                    tasks.iter().for_each(JoinHandle::abort);
                    if let Some(c) = &client {
                        let _ = c.try_disconnect();
                    }
                    return BootEnd::Reboot(300);
                }
                Action::PollManifest => tasks.push(spawn_poll(
                    sh.clone(),
                    http.clone(),
                    io_tx.clone(),
                    dev.id.clone(),
                    dev.channel.clone(),
                )),
                Action::Fetch {
                    sha256,
                    offset,
                    len,
                    ..
                } => tasks.push(spawn_fetch(
                    sh.clone(),
                    http.clone(),
                    io_tx.clone(),
                    dev.id.clone(),
                    sha256,
                    offset,
                    len,
                )),
                Action::Report(e) => {
                    if let Event::Downloading { size, .. } = &e {
                        dev.image_size = *size as u64;
                    }
                    if let Some(c) = &client {
                        let payload = protocol::event_json(&dev.id, sh.clock.now(), &e).to_string();
                        let _ = c.try_publish(
                            protocol::device_topic(PREFIX, &dev.id, Leaf::Status),
                            QoS::AtMostOnce,
                            false,
                            payload,
                        );
                    }
                    sh.record(i, What::Agent(e));
                }
                Action::Ack(ack) => {
                    let fresh = sh.acked.lock().unwrap_or_else(|p| p.into_inner()).insert((
                        dev.id.clone(),
                        ack.sequence,
                        ack.outcome.name(),
                    ));
                    let body = protocol::ack_json(&dev.id, &ack).to_string();
                    if let Some(c) = &client {
                        let _ = c.try_publish(
                            protocol::device_topic(PREFIX, &dev.id, Leaf::Ack),
                            QoS::AtLeastOnce,
                            false,
                            body.clone(),
                        );
                    }
                    let (http, url) = (http.clone(), format!("{}/ack", sh.server));
                    tasks.push(tokio::spawn(async move {
                        let _ = http.post_json(&url, body).await;
                    }));
                    sh.record(
                        i,
                        What::Ack {
                            ack,
                            duplicate: !fresh,
                        },
                    );
                }
            }
        }
        tasks.retain(|t| !t.is_finished());
        let sleep_for =
            |at: Option<u64>| at.map(|t| sh.clock.real(t.saturating_sub(sh.clock.now())));
        let (wake_in, test_in) = (sleep_for(wake), sleep_for(self_test_at));
        let telemetry_in = sleep_for(telemetry_at);
        tokio::select! {
            _ = stop.changed() => {
                tasks.iter().for_each(JoinHandle::abort);
                return BootEnd::Stop;
            }
            Some(n) = net_rx.recv() => match n {
                Net::ConnAck => {
                    if let Some(c) = &client {
                        let _ = c.subscribe(protocol::release_topic(PREFIX, &sh.cfg.device_type, &dev.channel), QoS::AtLeastOnce).await;
                        let _ = c.subscribe(protocol::device_topic(PREFIX, &dev.id, Leaf::Cmd), QoS::AtLeastOnce).await;
                    }
                    feed!(Input::Online);
                }
                Net::Publish(topic, payload) => {
                    if topic.ends_with("/cmd") {
                        feed!(Input::Command(&payload));
                    } else {
                        feed!(Input::Announcement(&payload));
                    }
                }
            },
            Some(io) = io_rx.recv() => match io {
                Io::Manifest(b) => feed!(Input::Manifest(&b)),
                Io::Response { offset, body } => {
                    reading = Some(Reading::new(body, offset, sh.clock.real(runner::FETCH_TIMEOUT_MS)));
                }
                Io::FetchFailed(reason) => feed!(Input::FetchFailed { reason: &reason }),
            },
            next = read_next(&mut reading) => match next {
                Ok(Some((offset, data))) => {
                    dev.fetched += data.len() as u64;
                    feed!(Input::Body { offset, data: &data });
                }
                Ok(None) => feed!(Input::BodyEnd),
                Err(reason) => feed!(Input::FetchFailed { reason: &reason }),
            },
            _ = tokio::time::sleep(wake_in.unwrap_or(Duration::from_secs(3600))), if wake_in.is_some() => {
                wake = None;
                feed!(Input::Timer);
            }
            _ = tokio::time::sleep(telemetry_in.unwrap_or(Duration::from_secs(3600))), if telemetry_in.is_some() => {
                let now = sh.clock.now();
                telemetry_at = Some(now + sh.telemetry_ms);
                if let Some(c) = &client {
                    let sample = protocol::telemetry_json(&dev.id, now, now - booted_at, &agent.telemetry());
                    let _ = c.try_publish(
                        protocol::device_topic(PREFIX, &dev.id, Leaf::Telemetry),
                        QoS::AtMostOnce,
                        false,
                        sample.to_string(),
                    );
                }
            }
            _ = tokio::time::sleep(test_in.unwrap_or(Duration::from_secs(3600))), if test_in.is_some() => {
                self_test_at = None;
                let passed = dev.behaviour.self_test == SelfTest::Pass;
                let detail = if passed { "all checks passed" } else { "self-test reported failure" };
                feed!(Input::SelfTestDone { passed, detail });
            }
            Some(c) = ctl.recv() => match c {
                Ctl::Report => {
                    let cmd = protocol::command(&format!("console-{}", sh.clock.now()), protocol::CommandKind::Report);
                    feed!(Input::Command(cmd.as_bytes()));
                }
                Ctl::Force(image) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    if let Some(slot) = otarig_agent::Platform::next_update_slot(&dev.board) {
                        let _ = dev.board.force_install(slot.kind, &image);
                    }
                    drain_board(sh, i, dev);
                    return BootEnd::Reboot(100);
                }
            },
        }
    }
}

fn spawn_poll(
    sh: Arc<Shared>,
    http: BoardHttp,
    tx: mpsc::Sender<Io>,
    device: String,
    channel: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let url = format!(
            "{}/firmware/latest?deviceType={}&channel={}&deviceId={device}",
            sh.server, sh.cfg.device_type, channel
        );
        if let Ok(r) = http.get(&url, None).await {
            if r.status().is_success() {
                if let Ok(b) = board_http::read_all(r).await {
                    let _ = tx.send(Io::Manifest(b.to_vec())).await;
                }
            }
        }
    })
}

fn spawn_fetch(
    sh: Arc<Shared>,
    http: BoardHttp,
    tx: mpsc::Sender<Io>,
    device: String,
    sha: [u8; 32],
    offset: u32,
    len: u32,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let url = format!("{}/blobs/{}?deviceId={device}", sh.server, hex::encode(sha));
        let range = (offset as u64, offset as u64 + len as u64 - 1);
        // Like esp_http_client's `timeout_ms`, the timeout bounds each wait for the network
        // (the answer's head, then every read), not the whole transfer: a slow but moving
        // download is not cut off.
        let timeout = sh.clock.real(runner::FETCH_TIMEOUT_MS);
        let resp = match tokio::time::timeout(timeout, http.get(&url, Some(range))).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let _ = tx
                    .send(Io::FetchFailed(format!("request failed: {e}")))
                    .await;
                return;
            }
            Err(_) => {
                let _ = tx.send(Io::FetchFailed(no_data())).await;
                return;
            }
        };
        let status = resp.status();
        if status.as_u16() != 206 && status.as_u16() != 200 {
            let _ = tx.send(Io::FetchFailed(format!("HTTP {status}"))).await;
            return;
        }
        // A server without Range support answers 200 with the whole blob from byte 0.
        let offset = if status.as_u16() == 200 { 0 } else { offset };
        let _ = tx
            .send(Io::Response {
                offset,
                body: resp.into_body(),
            })
            .await;
    })
}

/// The next piece of the body being read and the offset it goes to; `Ok(None)` at its end,
/// `Err` with the reason when it broke or its read timed out (the reading is over then).
/// Never ready when nothing is being read. Cancel-safe: nothing changes before the read is.
async fn read_next(reading: &mut Option<Reading>) -> Result<Option<(u32, Bytes)>, String> {
    let Some(r) = reading.as_mut() else {
        return std::future::pending().await;
    };
    let next = match tokio::time::timeout_at(r.deadline, board_http::next_chunk(&mut r.body)).await
    {
        Ok(Ok(Some(data))) => {
            let offset = r.pos;
            r.pos += data.len() as u32;
            r.deadline = tokio::time::Instant::now() + r.timeout;
            return Ok(Some((offset, data)));
        }
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(format!("body ended: {e}")),
        Err(_) => Err(no_data()),
    };
    *reading = None;
    next
}

/// Fleet runs reuse the deterministic runner's report type.
pub use runner::DeviceReport;
