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

mod board;
mod progress;
mod rollout;
mod setup;
mod transfer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use otarig_agent::protocol::{self, Leaf};
use rumqttc::{AsyncClient, Packet, QoS};

use crate::broker::BrokerEndpoint;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub(crate) use board::{board_task, Ctl, Shared};
pub use progress::{BrokerConnects, FleetProgress, Tally};
pub use setup::{BoardIdentity, ServerFace};

use board::Clock;
use otarig_scenario::runner::{
    self, new_device, prepare, report, Dev, Prepared, Run, RunOptions, SignedRelease, What,
};
use otarig_scenario::scenario::{
    CommandFault, FaultKind, FloodTarget, PayloadTopic, Scenario, StatementKind, Step, Transport,
};
use rollout::{announce, run_rollout, RolloutCtx};
use setup::{broker_address, FirmwareServer, RunPki};

const PREFIX: &str = protocol::DEFAULT_PREFIX;

/// Fleet runs started by this process (names each run's operator MQTT client).
static RUNS: AtomicU64 = AtomicU64::new(0);

/// How to run a fleet.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub devices: Option<u32>,
    /// An external broker instead of the embedded one (`mqtt://[user:pass@]host:port`, parsed
    /// by [`BrokerEndpoint::parse`]; or a test's own embedded broker).
    pub broker: Option<BrokerEndpoint>,
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
    /// With `transport = "tls"` against an external server and broker (the scale
    /// benchmark's shards): the `otarig pki` directory whose issuing CA makes this process's
    /// boards' certificates.
    pub pki: Option<std::path::PathBuf>,
    /// How many boards of the whole fleet may be connecting to the broker at once (TCP, TLS
    /// handshake, CONNECT until CONNACK); a shard takes its share. Mosquitto accepts with a
    /// backlog of 100 (`listen(sock, 100)` in its `net.c`): ten thousand boards dialling at
    /// once overflow it, time out, and redial, and the kernel then spends the run searching
    /// for free ephemeral ports among tens of thousands of half-closed sockets. The gate is
    /// the bench's: a real fleet's boards power on over minutes, not in one millisecond.
    pub connects_in_flight: usize,
    /// Counts the boards' accepted broker connections as the run goes (the scale benchmark's
    /// broker handshakes).
    pub broker_connects: Option<Arc<BrokerConnects>>,
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
    pub(crate) fn holds(&self, device: u32) -> bool {
        device % self.count == self.index
    }
    fn speaks(&self) -> bool {
        self.index == 0
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
            pki: None,
            connects_in_flight: 64,
            broker_connects: None,
        }
    }
}

/// This process's share of [`FleetOptions::connects_in_flight`] (at least one).
fn connect_share(opts: &FleetOptions) -> usize {
    let shards = opts.shard.map_or(1, |sh| sh.count.max(1) as usize);
    (opts.connects_in_flight / shards).max(1)
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

/// Run a scenario over real sockets: start the server and broker (or check the external
/// ones), connect the operator's MQTT client, start every board's task, play the timeline,
/// wait for quiet, and collect what happened.
pub async fn run_fleet(scenario: &Scenario, opts: &FleetOptions) -> anyhow::Result<Run> {
    let s = fleet_scenario(scenario, opts)?;
    let prep = prepare(&s)?;
    let dir = tempfile::tempdir().context("creating the store directory")?;
    let pki = match (s.transport, &opts.pki) {
        (Transport::Plain, _) => None,
        (Transport::Tls, Some(shared)) => Some(RunPki::issued_by(&s, shared, opts.shard)?),
        (Transport::Tls, None) => Some(RunPki::make(&s, &dir.path().join("pki"))?),
    };
    let server = FirmwareServer::start(&s, &prep, opts, dir.path(), pki.as_ref()).await?;
    // Kept to the end of the run: dropping it stops Mosquitto.
    let (broker, _mosquitto) = broker_address(&s, opts, pki.as_ref()).await?;
    let shared = Arc::new(Shared {
        clock: Clock {
            start: start_instant(opts.epoch).await,
            speedup: opts.speedup.max(1.0),
        },
        records: Mutex::new(Vec::new()),
        last_activity: AtomicU64::new(0),
        server: server.url.clone(),
        broker: broker.clone(),
        cfg: prep.cfg_template.clone(),
        acked: Mutex::new(HashSet::new()),
        telemetry_ms: opts.telemetry_ms,
        wall: s.wall,
        offline: false,
        console: None,
        board_tls: server.board_tls.clone(),
        connect_gate: Some(Arc::new(tokio::sync::Semaphore::new(connect_share(opts)))),
        fleet_key: prep.fleet_key.clone(),
        broker_connects: opts.broker_connects.clone(),
    });
    if let Some(p) = &opts.progress {
        p.boards.store(s.devices as u64, Ordering::Relaxed);
    }
    if let Some((local, _)) = &server.local {
        let sh = shared.clone();
        let clock = Arc::new(move || sh.wall.read(sh.clock.now()) / 1000);
        local.timestamps.sign_with(s.trust.signer()?, Some(clock));
    }
    let speaks = opts.shard.is_none_or(|sh| sh.speaks());
    let operator = Operator::connect(&s, opts, &broker, speaks).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let boards = spawn_boards(&s, &prep, &shared, opts, stop_rx);
    let rollouts = play_timeline(&s, &prep, &shared, &operator, &server, &boards, speaks).await?;
    wait_for_quiet(&s, &shared, opts, &rollouts).await;
    let end_ms = shared.clock.now().min(s.duration_ms);
    for r in rollouts {
        r.abort();
    }
    let _ = stop_tx.send(true);
    let mut devs = Vec::new();
    for (i, b) in boards.tasks {
        devs.push((i, b.await.context("a board task failed")?));
    }
    operator.disconnect().await;
    if let Some((server, _)) = server.local {
        server.shutdown().await;
    }
    Ok(collect(s, &shared, &devs, end_ms))
}

/// The scenario as this run plays it (fleet size from the options), refused early where a
/// shard cannot play it or the boards' connections would not fit the open-files limit.
fn fleet_scenario(scenario: &Scenario, opts: &FleetOptions) -> anyhow::Result<Scenario> {
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
    // Each board holds an MQTT and an HTTP connection; an embedded broker or server holds
    // the other end of one.
    let here = match opts.shard {
        Some(sh) => s.devices.div_ceil(sh.count),
        None => s.devices,
    };
    let per_board = 2 + opts.broker.is_none() as u64 + opts.server.is_none() as u64;
    check_open_files(here, per_board, "the boards'")?;
    Ok(s)
}

/// The instant of virtual time 0: `epoch` (waiting for it when it is ahead), or now.
async fn start_instant(epoch: Option<std::time::SystemTime>) -> Instant {
    match epoch.map(|e| e.duration_since(std::time::SystemTime::now())) {
        Some(Ok(ahead)) => {
            tokio::time::sleep(ahead).await;
            Instant::now()
        }
        Some(Err(behind)) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
        None => Instant::now(),
    }
}

/// The operator's MQTT client: release announcements, commands and payloads, and the
/// telemetry a progress bar shows.
struct Operator {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Operator {
    /// Connect, clear this fleet's retained release announcements (a broker that outlives
    /// runs still holds earlier ones) before any board subscribes, and wait until the broker
    /// has confirmed both, which also proves it is reachable.
    async fn connect(
        s: &Scenario,
        opts: &FleetOptions,
        broker: &BrokerEndpoint,
        speaks: bool,
    ) -> anyhow::Result<Operator> {
        // Unique per run, not just per process: two runs on one broker (shards in one
        // process, concurrent tests) would otherwise take over each other's session.
        let id = format!(
            "otarig-server-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let mut o = broker.options(&id);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(crate::broker::MAX_PACKET, crate::broker::MAX_PACKET);
        let (client, mut events) = AsyncClient::new(o, 256);
        // What the broker confirmed: the connection (false) or a publish (true).
        let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<bool>();
        let progress = opts.progress.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
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
        let channels = if speaks { channels(s) } else { Vec::new() };
        for ch in &channels {
            let topic = protocol::release_topic(PREFIX, &s.device_type, ch);
            client
                .publish(topic, QoS::AtLeastOnce, true, Vec::new())
                .await?;
        }
        if opts.progress.is_some() && opts.telemetry_ms > 0 {
            let all = protocol::device_topic(PREFIX, "+", Leaf::Telemetry);
            client.subscribe(all, QoS::AtMostOnce).await?;
        }
        // Every run proves the broker answers (a shard that does not speak only connects).
        let (mut connected, mut cleared) = (false, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !connected || cleared < channels.len() {
            match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
                Ok(Some(false)) => connected = true,
                Ok(Some(true)) => cleared += 1,
                _ => bail!(
                    "the MQTT broker at {}:{} did not acknowledge within 10 s: is it running and reachable, and are the credentials in its URL right?",
                    broker.host,
                    broker.port
                ),
            }
        }
        Ok(Operator { client, task })
    }

    /// Fault `n`'s command (`repeat` times) to each target board.
    async fn command(
        &self,
        s: &Scenario,
        n: usize,
        targets: &[u32],
        c: &CommandFault,
    ) -> anyhow::Result<()> {
        let ids: Vec<String> = targets.iter().map(|i| s.device_id(*i)).collect();
        let payloads = c.payloads(n, ids.iter().map(String::as_str))?;
        for (device, payload) in ids.iter().zip(payloads) {
            let topic = protocol::device_topic(PREFIX, device, Leaf::Cmd);
            for _ in 0..c.repeat {
                self.client
                    .publish(topic.clone(), QoS::AtLeastOnce, c.retained, payload.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// Raw bytes on each target's command topic, or once on the release topic.
    async fn payload(
        &self,
        s: &Scenario,
        targets: &[u32],
        topic: PayloadTopic,
        text: &[u8],
    ) -> anyhow::Result<()> {
        for i in targets {
            let t = match topic {
                PayloadTopic::Cmd => protocol::device_topic(PREFIX, &s.device_id(*i), Leaf::Cmd),
                PayloadTopic::Release => {
                    protocol::release_topic(PREFIX, &s.device_type, &s.channel)
                }
            };
            self.client
                .publish(t, QoS::AtLeastOnce, false, text.to_vec())
                .await?;
            if matches!(topic, PayloadTopic::Release) {
                break; // one publish reaches every board
            }
        }
        Ok(())
    }

    async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        self.task.abort();
    }
}

/// Every channel a board of the scenario follows, sorted, once each.
fn channels(s: &Scenario) -> Vec<String> {
    let mut channels: Vec<String> = std::iter::once(s.channel.clone())
        .chain(s.channel_of.iter().map(|(c, _)| c.clone()))
        .collect();
    channels.sort();
    channels.dedup();
    channels
}

/// The board tasks of this process, and a way to reach each (None: another shard's board).
struct Boards {
    tasks: Vec<(u32, JoinHandle<Dev>)>,
    controls: Vec<Option<mpsc::Sender<Ctl>>>,
    /// Where the boards connect, and the run's end: for faults aimed at broker and server.
    broker: BrokerEndpoint,
    server: String,
    stop: watch::Receiver<bool>,
}

fn spawn_boards(
    s: &Scenario,
    prep: &Prepared,
    shared: &Arc<Shared>,
    opts: &FleetOptions,
    stop_rx: watch::Receiver<bool>,
) -> Boards {
    let first_size = s
        .releases
        .first()
        .map(|r| prep.images[&r.firmware].len() as u64)
        .unwrap_or(0);
    // Boards that install the same release write the same sectors: share them.
    let pool = Arc::new(otarig_esp32s3::flash::SectorPool::default());
    let mut boards = Boards {
        tasks: Vec::new(),
        controls: Vec::new(),
        broker: shared.broker.clone(),
        server: shared.server.clone(),
        stop: stop_rx.clone(),
    };
    for i in 0..s.devices {
        if opts.shard.is_some_and(|sh| !sh.holds(i)) {
            boards.controls.push(None);
            continue;
        }
        let mut dev = new_device(s, &prep.proto, &RunOptions::default(), first_size, i);
        dev.board.flash.set_pool(pool.clone());
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        boards.controls.push(Some(ctl_tx));
        let (sh, stop) = (shared.clone(), stop_rx.clone());
        boards.tasks.push((
            i,
            tokio::spawn(async move {
                // Stagger connects: thousands of simultaneous CONNECTs overwhelm a small machine.
                tokio::time::sleep(Duration::from_millis(i as u64 % 1000 * 2)).await;
                board_task(i, dev, sh, stop, ctl_rx).await
            }),
        ));
    }
    boards
}

/// Play the releases and faults at their virtual times; staged rollouts go on in tasks of
/// their own, returned.
async fn play_timeline(
    s: &Scenario,
    prep: &Prepared,
    shared: &Arc<Shared>,
    operator: &Operator,
    server: &FirmwareServer,
    boards: &Boards,
    speaks: bool,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
    let mut rollouts = Vec::new();
    for (at, step) in s.timeline() {
        shared.clock.sleep_until(at).await;
        match step {
            Step::Release(k) if s.releases[k].rollout.is_some() => {
                rollouts.push(start_rollout(s, prep, shared, operator, server, k)?);
            }
            Step::Release(k) => {
                let r = &prep.releases[k];
                if let Some((_, store)) = &server.local {
                    store.set_latest(&r.device_type, &r.channel, &r.manifest)?;
                }
                shared.record(
                    u32::MAX,
                    What::Release {
                        sequence: r.sequence,
                        version: r.version.clone(),
                    },
                );
                if !s.releases[k].announce {
                    // Boards find it at their next poll: activity to come, the run is not
                    // quiet before it.
                    let found = shared.clock.now().saturating_add(s.poll_interval_ms);
                    shared.last_activity.fetch_max(found, Ordering::Relaxed);
                }
                if speaks && s.releases[k].announce {
                    let store = server.local.as_ref().map(|(_, st)| st.as_ref());
                    announce(
                        &operator.client,
                        store,
                        &r.device_type,
                        &r.channel,
                        &r.manifest,
                    )
                    .await?;
                }
            }
            Step::Statement(n) => {
                let (_, store) = server.local.as_ref().with_context(|| {
                    format!("{}: key sets and revocation lists are served by the embedded firmware server; run without --server", s.path.display())
                })?;
                match s.statements[n].kind {
                    StatementKind::KeySet { .. } => store.set_keys(&prep.statements[n])?,
                    StatementKind::Revocations { .. } => {
                        store.set_revocations(&s.device_type, &prep.statements[n])?
                    }
                }
                // The server renews the retained announcements with the new statement.
                let renewed = s.renewed_channels(shared.clock.now());
                for ch in renewed.iter().filter(|_| speaks) {
                    if let Some(m) = store.latest(&s.device_type, ch)? {
                        announce(&operator.client, Some(store), &s.device_type, ch, &m).await?;
                    }
                }
            }
            Step::Fault(n) if matches!(s.faults[n].kind, FaultKind::Freeze { .. }) => {
                server.freeze(s, n)?
            }
            Step::Fault(n) => inject(s, prep, operator, boards, n).await?,
        }
    }
    Ok(rollouts)
}

fn start_rollout(
    s: &Scenario,
    prep: &Prepared,
    shared: &Arc<Shared>,
    operator: &Operator,
    server: &FirmwareServer,
    k: usize,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let release: SignedRelease = prep.releases[k].clone();
    shared.record(
        u32::MAX,
        What::Release {
            sequence: release.sequence,
            version: release.version.clone(),
        },
    );
    let eligible: Vec<u32> = (0..s.devices)
        .filter(|i| s.channel_for(*i) == release.channel)
        .collect();
    let plan = s.releases[k].rollout.clone().context("rollout plan")?;
    let (server, store) = server
        .local
        .as_ref()
        .context("a staged rollout needs the embedded server")?;
    let cx = RolloutCtx {
        signed: release.manifest.clone(),
        release,
        ids: (0..s.devices).map(|i| s.device_id(i)).collect(),
        offers: server.offers.clone(),
        store: store.clone(),
        control: operator.client.clone(),
        operator: Arc::new(otarig_server::keys::NamedKey::load(
            &otarig_server::keys::fixture_dir(),
            otarig_scenario::scenario::OPERATOR_KEY,
        )?),
    };
    let rollout = otarig_server::rollout::Rollout::new(plan, eligible);
    Ok(tokio::spawn(run_rollout(shared.clone(), rollout, cx)))
}

/// Fault `n` of the scenario, on its boards.
async fn inject(
    s: &Scenario,
    prep: &Prepared,
    operator: &Operator,
    boards: &Boards,
    n: usize,
) -> anyhow::Result<()> {
    let f = &s.faults[n];
    let targets: Vec<u32> = (0..s.devices).filter(|i| f.devices.contains(*i)).collect();
    match &f.kind {
        FaultKind::Command(c) => operator.command(s, n, &targets, c).await?,
        FaultKind::Payload { topic, text, .. } => {
            operator
                .payload(s, &targets, *topic, text.as_bytes())
                .await?
        }
        FaultKind::ForceInstall { firmware, .. } => {
            for i in &targets {
                if let Some(Some(c)) = boards.controls.get(*i as usize) {
                    let _ = c.send(Ctl::Force(prep.images[firmware].clone())).await;
                }
            }
        }
        FaultKind::Flood {
            connections,
            target,
            ..
        } => {
            let (n, stop) = (*connections as usize, boards.stop.clone());
            match target {
                FloodTarget::Broker => {
                    crate::flood::broker(&boards.broker.host, boards.broker.port, n, stop)
                }
                FloodTarget::Server => crate::flood::server(&boards.server, n, stop),
            }
        }
        FaultKind::PowerLoss(_)
        | FaultKind::Server { .. }
        | FaultKind::Outage { .. }
        | FaultKind::Freeze { .. }
        | FaultKind::Tls(_) => {}
    }
    Ok(())
}

/// Until the scenario's duration, or until no board did anything for `quiet_ms` and no
/// rollout is between waves. The boards' clocks getting set is an event too: a board waiting
/// for the time is quiet, but not done.
async fn wait_for_quiet(
    s: &Scenario,
    shared: &Shared,
    opts: &FleetOptions,
    rollouts: &[JoinHandle<anyhow::Result<()>>],
) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.clock.now();
        let last = shared.last_activity.load(Ordering::Relaxed);
        let quiet = now.saturating_sub(last.max(s.wall.set_at_ms)) >= opts.quiet_ms;
        // A rollout between waves is quiet too, but not over.
        if now >= s.duration_ms || (quiet && rollouts.iter().all(|r| r.is_finished())) {
            break;
        }
    }
}

/// The run's records in time order and each board's report.
fn collect(s: Scenario, shared: &Shared, devs: &[(u32, Dev)], end_ms: u64) -> Run {
    let mut records =
        std::mem::take(&mut *shared.records.lock().unwrap_or_else(|p| p.into_inner()));
    records.sort_by_key(|r| r.t_ms);
    let devices = devs.iter().map(|(i, d)| report(*i, d)).collect::<Vec<_>>();
    let served_bytes = devices.iter().map(|d| d.fetched_bytes).sum();
    Run {
        scenario: s,
        records,
        devices,
        end_ms,
        served_bytes,
    }
}

/// Fleet runs reuse the deterministic runner's report type.
pub use runner::DeviceReport;
