//! One simulated board on real sockets: its boots, each with the agent, an MQTT connection
//! (rumqttc) and the HTTP requests the agent asks for, in scaled virtual time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use otarig_agent::protocol::{self, Leaf};
use otarig_agent::{Action, Agent, Config, Event, Input};
use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
use otarig_esp32s3::board::{BoardEvent, BootOutcome};
use otarig_scenario::runner::{self, Dev, Record, What};
use otarig_scenario::scenario::WallClock;
use rumqttc::{AsyncClient, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::transfer::{
    read_next, spawn_chunked, spawn_fetch, spawn_poll, ChunkedRequest, Io, RangeRequest, Reading,
};
use super::PREFIX;
use crate::board_http::BoardHttp;

/// The least real time a board's HTTP handle waits for an answer, whatever the speedup: at
/// 2,000 times (`chunked-poll-fleet.toml`) the 30 s request timeout is 15 ms of real time,
/// less than a loaded host may take to answer a poll, which is not retried until the next
/// poll hours later (that scenario's wire twin failed so in a cold CI run). Fetches keep
/// their own timeouts, unchanged; this one guards the handle against an answer that never
/// comes.
const MIN_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Virtual time: milliseconds since `start`, running `speedup` times faster than the wall clock.
#[derive(Clone, Copy)]
pub(super) struct Clock {
    pub(super) start: Instant,
    pub(super) speedup: f64,
}

impl Clock {
    pub(super) fn now(&self) -> u64 {
        (self.start.elapsed().as_secs_f64() * 1000.0 * self.speedup) as u64
    }
    pub(super) fn real(&self, virtual_ms: u64) -> Duration {
        Duration::from_secs_f64(virtual_ms as f64 / 1000.0 / self.speedup)
    }
    /// How long a board's HTTP handle waits for an answer ([`BoardHttp::answer_within`]):
    /// the request timeout, but never less than [`MIN_ANSWER_WAIT`] of real time.
    pub(super) fn answer_wait(&self) -> Duration {
        self.real(runner::FETCH_TIMEOUT_MS).max(MIN_ANSWER_WAIT)
    }
    pub(super) async fn sleep_until(&self, at: u64) {
        let now = self.now();
        if at > now {
            tokio::time::sleep(self.real(at - now)).await;
        }
    }
}

/// What every board task of one run shares. The virtual board uses it for its single board.
pub(crate) struct Shared {
    pub(super) clock: Clock,
    pub(super) records: Mutex<Vec<Record>>,
    pub(super) last_activity: AtomicU64,
    pub(super) server: String,
    pub(super) broker: crate::broker::BrokerEndpoint,
    pub(super) cfg: Config,
    pub(super) acked: Mutex<HashSet<(String, u64, &'static str)>>,
    pub(super) telemetry_ms: u64,
    /// When the boards' wall clocks get set.
    pub(super) wall: WallClock,
    /// No network at all (a virtual board not provisioned yet).
    pub(super) offline: bool,
    /// Where a virtual board prints its console (events as console-protocol lines).
    pub(super) console: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Each board's HTTPS configuration (its device certificate), by index; empty: plain HTTP.
    pub(super) board_tls: Vec<std::sync::Arc<rustls::ClientConfig>>,
    /// Bounds the boards connecting to the broker at once (see
    /// [`super::FleetOptions::connects_in_flight`]); `None`: no bound (one virtual board).
    pub(super) connect_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// The chunked protocol's fleet key: each board fetches by chunks under its own key
    /// derived from it. `None`: as `cfg` says (a virtual board has its key from NVS).
    pub(super) fleet_key: Option<Arc<Vec<u8>>>,
    /// Where accepted broker connections are counted, if anywhere.
    pub(super) broker_connects: Option<Arc<super::BrokerConnects>>,
}

impl Shared {
    /// For one virtual board: real time, its provisioned broker and server (None: offline),
    /// events rendered to `console`.
    pub(crate) fn for_virtual_board(
        cfg: Config,
        network: Option<(crate::broker::BrokerEndpoint, String)>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        console: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> anyhow::Result<Shared> {
        let offline = network.is_none();
        let (broker, server) = network.unwrap_or_else(|| {
            let nowhere = crate::broker::BrokerEndpoint {
                host: String::new(),
                port: 0,
                login: crate::broker::Login::Anonymous,
            };
            (nowhere, String::new())
        });
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
            wall: WallClock::default(),
            offline,
            console: Some(console),
            board_tls: tls.into_iter().collect(),
            connect_gate: None,
            fleet_key: None,
            broker_connects: None,
        })
    }

    pub(super) fn record(&self, device: u32, what: What) {
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

/// What a board's MQTT connection delivers to its task.
enum Net {
    ConnAck,
    /// Topic, payload, and whether the broker flagged it retained.
    Publish(String, Vec<u8>, bool),
    /// A connection attempt failed its TLS handshake (what the TLS stack said).
    TlsFailed(String),
}

/// How one boot of a board ended.
enum BootEnd {
    Stop,
    Reboot(u64),
    PowerCut,
}

fn drain_board(sh: &Shared, i: u32, dev: &mut Dev) {
    for e in dev.board.take_events() {
        if let BoardEvent::OtaBegin { slot, .. } = &e {
            dev.update_slot = Some(slot.clone());
        }
        sh.record(i, What::Board(e));
    }
}

/// A board's life on the wire until `stop`: boot, run the agent over the network, reboot or
/// lose power, again.
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
                    dev.crashed_version = booted.info.version().to_string();
                    sh.record(i, What::AppCrashed);
                    2_000
                } else {
                    dev.crash_streak = 0;
                    let up = dev.network_up_at(booted.info.version(), sh.clock.now());
                    // The network coming back is activity to come: the run is not quiet
                    // before it.
                    sh.last_activity.fetch_max(up, Ordering::Relaxed);
                    match run_boot(i, &mut dev, &sh, up, &mut stop, &mut ctl).await {
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

/// One boot of one board: the agent, its MQTT connection and its HTTP requests. Each input
/// the agent takes and each action it asks for is one step of [`Boot`]; a step that ends the
/// boot (power cut, reboot, stop) says how. The network is out of reach until `network_up`
/// (virtual ms).
async fn run_boot(
    i: u32,
    dev: &mut Dev,
    sh: &Arc<Shared>,
    network_up: u64,
    stop: &mut watch::Receiver<bool>,
    ctl: &mut mpsc::Receiver<Ctl>,
) -> BootEnd {
    let (io_tx, mut io_rx) = mpsc::channel::<Io>(2);
    let (net_tx, mut net_rx) = mpsc::channel::<Net>(64);
    let mut boot = Boot::new(i, dev, sh, io_tx);
    boot.connect_mqtt(net_tx, network_up);
    let end = 'boot: {
        if let Err(end) = boot.feed(Input::Boot) {
            break 'boot end;
        }
        loop {
            if let Err(end) = boot.act_on_pending() {
                break 'boot end;
            }
            boot.tasks.retain(|t| !t.is_finished());
            let sleep_for =
                |at: Option<u64>| at.map(|t| sh.clock.real(t.saturating_sub(sh.clock.now())));
            let (wake_in, test_in) = (sleep_for(boot.wake), sleep_for(boot.self_test_at));
            let telemetry_in = sleep_for(boot.telemetry_at);
            let step = tokio::select! {
                _ = stop.changed() => Err(BootEnd::Stop),
                Some(n) = net_rx.recv() => boot.on_net(n).await,
                Some(io) = io_rx.recv() => boot.on_io(io),
                next = read_next(&mut boot.reading) => boot.on_body(next),
                _ = tokio::time::sleep(wake_in.unwrap_or(Duration::from_secs(3600))), if wake_in.is_some() => {
                    boot.wake = None;
                    boot.feed(Input::Timer)
                }
                _ = tokio::time::sleep(telemetry_in.unwrap_or(Duration::from_secs(3600))), if telemetry_in.is_some() => {
                    boot.publish_telemetry();
                    Ok(())
                }
                _ = tokio::time::sleep(test_in.unwrap_or(Duration::from_secs(3600))), if test_in.is_some() => {
                    boot.self_test_done()
                }
                Some(c) = ctl.recv() => boot.on_control(c),
            };
            if let Err(end) = step {
                break 'boot end;
            }
        }
    };
    boot.tasks.iter().for_each(JoinHandle::abort);
    end
}

/// One boot in progress: the agent and everything it is waiting for.
struct Boot<'a> {
    i: u32,
    dev: &'a mut Dev,
    sh: &'a Arc<Shared>,
    agent: Agent,
    /// A boot's own HTTP connection: a reboot drops it, as a board's does.
    http: BoardHttp,
    io_tx: mpsc::Sender<Io>,
    client: Option<AsyncClient>,
    tasks: Vec<JoinHandle<()>>,
    pending: Vec<Action>,
    reading: Option<Reading>,
    /// When the agent's timer fires, the self-test finishes and telemetry is due (virtual ms).
    wake: Option<u64>,
    self_test_at: Option<u64>,
    telemetry_at: Option<u64>,
    booted_at: u64,
    /// Fetches the agent cancelled this boot: the number the current fetch's answer carries.
    fetches: u64,
}

/// `Err` ends the boot.
type Step = Result<(), BootEnd>;

impl<'a> Boot<'a> {
    fn new(i: u32, dev: &'a mut Dev, sh: &'a Arc<Shared>, io_tx: mpsc::Sender<Io>) -> Boot<'a> {
        let mut cfg = sh.cfg.clone();
        cfg.device_id = dev.id.clone();
        cfg.channel = dev.channel.clone();
        if let Some(key) = &sh.fleet_key {
            cfg.fetch = runner::fetch_mode(Some(key), &dev.id);
        }
        let booted_at = sh.clock.now();
        Boot {
            i,
            dev,
            sh,
            agent: Agent::new(cfg),
            http: match sh.board_tls.get(i as usize) {
                Some(tls) => BoardHttp::with_tls(tls.clone()),
                None => BoardHttp::new(),
            }
            .answer_within(sh.clock.answer_wait()),
            io_tx,
            client: None,
            tasks: Vec::new(),
            pending: Vec::new(),
            reading: None,
            wake: None,
            self_test_at: None,
            telemetry_at: (sh.telemetry_ms > 0).then(|| booted_at + sh.telemetry_ms),
            booted_at,
            fetches: 0,
        }
    }

    /// The board's MQTT connection from `up` on (virtual ms; later than now during an
    /// outage), unless its app never reaches the network or the board is not provisioned;
    /// its events go to `net_tx`.
    fn connect_mqtt(&mut self, net_tx: mpsc::Sender<Net>, up: u64) {
        if self.dev.behaviour.network != NetworkBehaviour::Ok || self.sh.offline {
            return;
        }
        let clock = self.sh.clock;
        let mut o = self.sh.broker.options(&self.dev.id);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(crate::broker::MAX_PACKET, crate::broker::MAX_PACKET);
        let (client, mut events) = AsyncClient::new(o, 64);
        let gate = self.sh.connect_gate.clone();
        self.tasks.push(tokio::spawn(async move {
            // rumqttc connects on the first poll.
            clock.sleep_until(up).await;
            let mut connected = false;
            loop {
                // A permit is held from dialling until CONNACK or failure: rumqttc's first
                // poll after dialling ends at one of them.
                let dialling = match (&gate, connected) {
                    (Some(gate), false) => gate.clone().acquire_owned().await.ok(),
                    _ => None,
                };
                let polled = events.poll().await;
                drop(dialling);
                connected = polled.is_ok();
                let net = match polled {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => Net::ConnAck,
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        Net::Publish(p.topic, p.payload.to_vec(), p.retain)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        // rumqttc reconnects at the next poll, as esp-mqtt does.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        match crate::board_http::tls_failure(&e) {
                            Some(detail) => Net::TlsFailed(detail),
                            None => continue,
                        }
                    }
                };
                if net_tx.send(net).await.is_err() {
                    break;
                }
            }
        }));
        self.client = Some(client);
    }

    /// Give the agent one input at the current virtual time; a power cut during it ends the
    /// boot.
    fn feed(&mut self, input: Input<'_>) -> Step {
        let now = self.sh.wall.read(self.sh.clock.now());
        self.agent.handle(&mut self.dev.board, now, input);
        drain_board(self.sh, self.i, self.dev);
        if !self.dev.board.is_powered() {
            return Err(BootEnd::PowerCut);
        }
        while let Some(a) = self.agent.poll_action() {
            self.pending.push(a);
        }
        Ok(())
    }

    fn act_on_pending(&mut self) -> Step {
        for a in std::mem::take(&mut self.pending) {
            self.act(a)?;
        }
        Ok(())
    }

    fn act(&mut self, a: Action) -> Step {
        let sh = self.sh;
        match a {
            Action::RunSelfTest => self.self_test_at = Some(sh.clock.now() + 200),
            Action::WakeAt(t) => self.wake = Some(self.sh.wall.virtual_time(t)),
            Action::Reboot => {
                if let Some(c) = &self.client {
                    let _ = c.try_disconnect();
                }
                return Err(BootEnd::Reboot(300));
            }
            Action::PollManifest => {
                let (http, tx) = (self.http.clone(), self.io_tx.clone());
                let poll = spawn_poll(
                    sh.clone(),
                    http,
                    tx,
                    self.dev.id.clone(),
                    self.dev.channel.clone(),
                );
                self.tasks.push(poll);
            }
            Action::Fetch {
                sha256,
                offset,
                len,
                ..
            } => {
                let (http, tx) = (self.http.clone(), self.io_tx.clone());
                let req = RangeRequest {
                    sha: sha256,
                    offset,
                    len,
                    fetch: self.fetches,
                };
                let fetch = spawn_fetch(sh.clone(), http, tx, self.dev.id.clone(), req);
                self.tasks.push(fetch);
            }
            Action::OpenSession {
                sequence,
                sha256,
                from,
                ..
            } => {
                let req = ChunkedRequest::Open {
                    sequence,
                    sha: sha256,
                    from,
                };
                self.send_chunked(req);
            }
            Action::FetchChunk { session, index } => {
                self.send_chunked(ChunkedRequest::Chunk { session, index })
            }
            Action::Report(e) => self.report(e),
            Action::Ack(ack) => self.ack(ack),
            Action::CancelFetch => {
                // Dropping the body closes its connection; answers still on their way are
                // recognised by their fetch number and dropped.
                self.reading = None;
                self.fetches += 1;
            }
        }
        Ok(())
    }

    /// The board fetches by the chunked protocol.
    fn chunked(&self) -> bool {
        self.agent.config().fetch.is_chunked()
    }

    fn send_chunked(&mut self, req: ChunkedRequest) {
        let (http, tx) = (self.http.clone(), self.io_tx.clone());
        let sh = self.sh.clone();
        let task = spawn_chunked(sh, http, tx, self.dev.id.clone(), (req, self.fetches));
        self.tasks.push(task);
    }

    /// With the chunked protocol, `POST /ota/<what>` with `body` (verify, complete).
    fn post_ota(&mut self, what: &str, body: String) {
        let (http, url) = (self.http.clone(), format!("{}/ota/{what}", self.sh.server));
        self.tasks.push(tokio::spawn(async move {
            let _ = http.post_json(&url, body).await;
        }));
    }

    /// An agent event: on the board's status topic, and in the run's record.
    fn report(&mut self, e: Event) {
        if let Event::Downloading { size, .. } = &e {
            self.dev.image_size = *size as u64;
        }
        if let (Event::Verified { sequence }, true) = (&e, self.chunked()) {
            let body = serde_json::json!({"v": 1, "device": self.dev.id, "sequence": sequence});
            self.post_ota("verify", body.to_string());
        }
        if let Some(c) = &self.client {
            let payload = protocol::event_json(&self.dev.id, self.sh.clock.now(), &e).to_string();
            let _ = c.try_publish(
                protocol::device_topic(PREFIX, &self.dev.id, Leaf::Status),
                QoS::AtMostOnce,
                false,
                payload,
            );
        }
        self.sh.record(self.i, What::Agent(e));
    }

    /// An ack: on the board's ack topic, posted to the server, and in the run's record
    /// (marked duplicate when this board acked the same outcome of the same release before).
    fn ack(&mut self, ack: otarig_agent::Ack) {
        let sh = self.sh;
        let fresh = sh.acked.lock().unwrap_or_else(|p| p.into_inner()).insert((
            self.dev.id.clone(),
            ack.sequence,
            ack.outcome.name(),
        ));
        let body = protocol::ack_json(&self.dev.id, &ack).to_string();
        if let Some(c) = &self.client {
            let _ = c.try_publish(
                protocol::device_topic(PREFIX, &self.dev.id, Leaf::Ack),
                QoS::AtLeastOnce,
                false,
                body.clone(),
            );
        }
        self.post_ack(body);
        sh.record(
            self.i,
            What::Ack {
                ack,
                duplicate: !fresh,
            },
        );
    }

    /// The ack to the firmware server: `POST /ack`, or `/ota/complete` with the chunked
    /// protocol (which takes the ack as its `complete`).
    fn post_ack(&mut self, body: String) {
        if self.chunked() {
            return self.post_ota("complete", body);
        }
        let (http, url) = (self.http.clone(), format!("{}/ack", self.sh.server));
        self.tasks.push(tokio::spawn(async move {
            let _ = http.post_json(&url, body).await;
        }));
    }

    async fn on_net(&mut self, n: Net) -> Step {
        match n {
            Net::ConnAck => {
                if let Some(count) = &self.sh.broker_connects {
                    count.record(self.sh.clock.now());
                }
                if let Some(c) = &self.client {
                    let release = protocol::release_topic(
                        PREFIX,
                        &self.sh.cfg.device_type,
                        &self.dev.channel,
                    );
                    let _ = c.subscribe(release, QoS::AtLeastOnce).await;
                    let _ = c
                        .subscribe(
                            protocol::device_topic(PREFIX, &self.dev.id, Leaf::Cmd),
                            QoS::AtLeastOnce,
                        )
                        .await;
                }
                self.feed(Input::Online)
            }
            Net::Publish(topic, payload, retained) if topic.ends_with("/cmd") => {
                self.feed(Input::Command {
                    payload: &payload,
                    retained,
                })
            }
            Net::Publish(_, payload, _) => self.feed(Input::Announcement(&payload)),
            Net::TlsFailed(detail) => self.feed(Input::TlsFailed {
                peer: otarig_agent::Peer::Broker,
                detail: &detail,
            }),
        }
    }

    fn on_io(&mut self, io: Io) -> Step {
        match io {
            Io::Manifest(b) => self.feed(Input::Manifest(&b)),
            Io::Response { fetch, .. }
            | Io::Session(_, fetch)
            | Io::Chunk(_, fetch)
            | Io::FetchFailed(_, fetch)
                if fetch != self.fetches =>
            {
                Ok(()) // the answer to a fetch the agent cancelled
            }
            Io::Session(answer, _) => self.feed(Input::Session(&answer)),
            Io::Chunk(frame, _) => {
                self.dev.fetched += frame.len() as u64;
                self.feed(Input::Chunk(&frame))
            }
            Io::Response { offset, body, .. } => {
                let timeout = self.sh.clock.real(runner::FETCH_TIMEOUT_MS);
                self.reading = Some(Reading::new(body, offset, timeout));
                Ok(())
            }
            Io::FetchFailed(reason, _) => self.feed(Input::FetchFailed { reason: &reason }),
            Io::TlsFailed(detail) => self.feed(Input::TlsFailed {
                peer: otarig_agent::Peer::Server,
                detail: &detail,
            }),
        }
    }

    fn on_body(&mut self, next: Result<Option<(u32, bytes::Bytes)>, String>) -> Step {
        match next {
            Ok(Some((offset, data))) => {
                self.dev.fetched += data.len() as u64;
                self.feed(Input::Body {
                    offset,
                    data: &data,
                })
            }
            Ok(None) => self.feed(Input::BodyEnd),
            Err(reason) => self.feed(Input::FetchFailed { reason: &reason }),
        }
    }

    fn publish_telemetry(&mut self) {
        let now = self.sh.clock.now();
        self.telemetry_at = Some(now + self.sh.telemetry_ms);
        if let Some(c) = &self.client {
            let sample = protocol::telemetry_json(
                &self.dev.id,
                now,
                now - self.booted_at,
                &self.agent.telemetry(),
            );
            let _ = c.try_publish(
                protocol::device_topic(PREFIX, &self.dev.id, Leaf::Telemetry),
                QoS::AtMostOnce,
                false,
                sample,
            );
        }
    }

    fn self_test_done(&mut self) -> Step {
        self.self_test_at = None;
        let passed = self.dev.behaviour.self_test == SelfTest::Pass;
        let detail = if passed {
            "all checks passed"
        } else {
            "self-test reported failure"
        };
        self.feed(Input::SelfTestDone { passed, detail })
    }

    fn on_control(&mut self, c: Ctl) -> Step {
        match c {
            Ctl::Report => {
                // Read-only and from the console (physical access): no signed command needed.
                self.agent.report_status();
                self.pending
                    .extend(std::iter::from_fn(|| self.agent.poll_action()));
                Ok(())
            }
            Ctl::Force(image) => {
                if let Some(slot) = otarig_agent::Platform::next_update_slot(&self.dev.board) {
                    let _ = self.dev.board.force_install(slot.kind, &image);
                }
                drain_board(self.sh, self.i, self.dev);
                Err(BootEnd::Reboot(100))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handle's wait is the request timeout in real time, down to a floor a loaded host
    /// can meet: 15 ms at 2,000 times failed a poll in CI.
    #[test]
    fn a_boards_answer_wait_has_a_real_time_floor() {
        let clock = |speedup| Clock {
            start: Instant::now(),
            speedup,
        };
        assert_eq!(clock(1.0).answer_wait(), Duration::from_secs(30));
        assert_eq!(clock(2.0).answer_wait(), Duration::from_secs(15));
        assert_eq!(clock(2000.0).answer_wait(), MIN_ANSWER_WAIT);
    }
}
