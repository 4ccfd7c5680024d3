//! The update agent: a sans-IO state machine.
//!
//! The shell feeds [`Input`]s with the current time and drains [`Action`]s with
//! [`Agent::poll_action`]. Storage goes through [`Platform`] (ESP-IDF calls); nothing here
//! blocks, spawns, sleeps or opens a socket, so the same code runs on the ESP32-S3, in the
//! simulated fleet and, deterministically, in the power-loss explorer.
//!
//! Life of a board, in states:
//!
//! ```text
//! Boot ─► SelfTest ─► AwaitNetwork ─► (confirm) ─► Ready ─► Downloading ─► (verify, set boot) ─► Rebooting
//!   │        └─ fail / timeout ─► mark invalid ─► Rebooting           ▲   └─ fetch error ─► Backoff ─┘
//!   └─ journal says "downloading" ─► AwaitManifest (resume at the checkpoint) ─┘
//! ```

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::chunk::ChunkKey;
use crate::cipher::{self, ImageKeys};
use crate::delta::{self, Applier, Resume};
use crate::event::{Ack, Check, Event, Outcome};
use crate::image;
use crate::journal::{Journal, Phase, Record, SECTOR};
use crate::manifest::{self, Manifest, TrustedKey};
use crate::platform::{EspError, OtaImgState, Platform, Slot, SlotKind};

mod boot;
mod commands;
mod download;
mod manifests;
mod trust;

use download::Download;

/// Extra boots given to a new image that the bootloader found unconfirmed.
const UNCONFIRMED_RETRIES: u8 = 2;

/// Default largest step a release's sequence may take above the highest installed
/// ([`Config::max_sequence_step`]). A key holder who signs a sequence near `u64::MAX` would
/// otherwise leave no room for any later release (fast-forward); with the step bounded, the
/// operator can always release above whatever an attacker got installed, and using the space
/// up would take 2^32 installs. 2^32 leaves room for sequences people derive from dates
/// (`2026120101`) or Unix seconds, from 0 on a board that never updated.
pub const MAX_SEQUENCE_STEP: u64 = 1 << 32;

/// Installs of one release that may roll back for want of a network before it is known-bad.
const OFFLINE_ROLLBACKS: u8 = 3;

/// Build-time configuration of the firmware.
#[derive(Clone, Debug)]
pub struct Config {
    pub device_id: String,
    pub device_type: String,
    /// Release channel this board follows ("stable", "beta", …).
    pub channel: String,
    /// The release keys the firmware ships with (key set version 0): they sign manifests,
    /// revocation lists and commands until a key set signed by a root key replaces them.
    pub trusted_keys: Vec<TrustedKey>,
    /// Keys that sign key sets ([`crate::trust`]); none: the release keys can never be rotated.
    pub root_keys: Vec<TrustedKey>,
    /// Keys that sign timestamps until a key set names others.
    pub timestamp_keys: Vec<TrustedKey>,
    /// Install only what a fresh timestamp vouches for (once the clock is set): a mirror
    /// cannot then freeze the board on an old release or hide a revocation for longer than a
    /// timestamp lives. Needs a server that signs timestamps (`otarig serve --timestamp-key`);
    /// a retained announcement then only makes the board poll.
    pub require_timestamp: bool,
    /// Keys for encrypted images ([`crate::cipher`]); none: encrypted releases are refused
    /// (`decrypt`) before a byte is fetched.
    pub image_keys: ImageKeys,
    /// How image bytes are fetched: HTTP ranges, or the chunked protocol.
    pub fetch: FetchMode,
    /// Bytes asked for in one range request.
    pub chunk_size: u32,
    /// Bytes between two durable resume points; a multiple of the 4 KiB sector.
    pub checkpoint_interval: u32,
    /// Confirm a new image only after it also reached the network (not just its self-test).
    pub confirm_requires_network: bool,
    /// A new image not confirmed within this time rolls itself back.
    pub confirm_timeout_ms: u64,
    /// Downloads whose result fails the hash check are retried this many times in all.
    pub max_attempts: u8,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Consecutive failed range requests after which the release is given up.
    pub max_fetch_failures: u32,
    /// Slowest transfer a download tolerates, in bytes per second averaged over
    /// `rate_window_ms` (0: any rate). Each network wait has its own timeout in the shell, so a
    /// server (or a man in the middle) that trickles a byte just inside it would hold a board
    /// forever: Uptane's slow-retrieval attack. A slower window ends the request as failed.
    pub min_rate: u32,
    pub rate_window_ms: u64,
    /// How often to ask the server for the latest manifest (0: only when the network comes up).
    pub poll_interval_ms: u64,
    /// Use a delta patch when the manifest offers one for the running image.
    pub use_deltas: bool,
    /// Largest step a release's sequence may take above the highest installed
    /// ([`MAX_SEQUENCE_STEP`] by default; fast-forward protection).
    pub max_sequence_step: u64,
    /// A wall-clock time (ms since 1970) below this means the clock is not set: an ESP32
    /// counts from 1970 after power-on until SNTP sets the time. Without a set clock the agent
    /// does not install (it cannot check a manifest's expiry), and when the clock gets set its
    /// timers move with the jump instead of firing at once. The firmware's build date is the
    /// best value; 0 trusts any clock.
    pub time_floor_ms: u64,
}

/// How a board fetches the bytes of a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchMode {
    /// HTTP range requests of [`Config::chunk_size`] bytes ([`Action::Fetch`]); TLS, where
    /// used, authenticates the server.
    Ranges,
    /// The chunked protocol ([`crate::chunk`]): a session per release, 1 KiB chunks, each
    /// checked under this board's key before a byte of it is written ([`Action::OpenSession`],
    /// [`Action::FetchChunk`]). Plain range answers ([`Input::Body`]) are then ignored.
    Chunked(ChunkKey),
}

impl FetchMode {
    pub fn is_chunked(&self) -> bool {
        matches!(self, FetchMode::Chunked(_))
    }
}

/// 2025-01-01T00:00:00Z: no firmware built with this agent runs earlier.
pub const TIME_FLOOR_MS: u64 = 1_735_689_600_000;

impl Config {
    pub fn new(device_id: &str, device_type: &str, trusted_keys: Vec<TrustedKey>) -> Config {
        Config {
            device_id: device_id.to_string(),
            device_type: device_type.to_string(),
            channel: "stable".to_string(),
            trusted_keys,
            root_keys: Vec::new(),
            timestamp_keys: Vec::new(),
            require_timestamp: false,
            image_keys: ImageKeys::default(),
            fetch: FetchMode::Ranges,
            chunk_size: 16 * 1024,
            checkpoint_interval: 64 * 1024,
            confirm_requires_network: true,
            confirm_timeout_ms: 120_000,
            max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            max_fetch_failures: 10,
            min_rate: 512,
            rate_window_ms: 60_000,
            poll_interval_ms: 60_000,
            use_deltas: true,
            max_sequence_step: MAX_SEQUENCE_STEP,
            time_floor_ms: TIME_FLOOR_MS,
        }
    }
}

/// Something that happened to the board.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// The app just started (first input after every reset).
    Boot,
    /// Result of [`Action::RunSelfTest`].
    SelfTestDone {
        passed: bool,
        detail: &'a str,
    },
    /// The network (Wi-Fi + broker/server) is reachable.
    Online,
    Offline,
    /// The answer to [`Action::PollManifest`]: a [`crate::protocol::ReleasePayload`].
    Manifest(&'a [u8]),
    /// A payload on the release topic (a retained announcement, the same format).
    Announcement(&'a [u8]),
    /// A payload on this board's command topic; `retained` as the broker flagged it.
    Command {
        payload: &'a [u8],
        retained: bool,
    },
    /// Bytes of the image at `offset`, part of the answer to the last [`Action::Fetch`].
    Body {
        offset: u32,
        data: &'a [u8],
    },
    /// The answer to the last [`Action::Fetch`] ended (complete or cut short).
    BodyEnd,
    /// The answer to the last [`Action::OpenSession`] (`POST /ota/check`), as it came.
    Session(&'a [u8]),
    /// The answer to the last [`Action::FetchChunk`] (`GET /ota/chunk`): one whole frame.
    Chunk(&'a [u8]),
    /// The last [`Action::Fetch`], [`Action::OpenSession`] or [`Action::FetchChunk`] failed
    /// before or while its answer arrived.
    FetchFailed {
        reason: &'a str,
    },
    /// A time asked for with [`Action::WakeAt`] has come.
    Timer,
    /// A connection to the firmware server or the broker failed its TLS handshake; the shell
    /// retries as usual, the agent reports it (once per peer and boot).
    TlsFailed {
        peer: Peer,
        detail: &'a str,
    },
}

/// Who a board connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Server,
    Broker,
}

impl Peer {
    pub const fn name(self) -> &'static str {
        match self {
            Peer::Server => "server",
            Peer::Broker => "broker",
        }
    }
}

/// Something the agent asks its shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the firmware's self-test and answer with [`Input::SelfTestDone`].
    RunSelfTest,
    /// Ask the server for the latest manifest for this device type and channel.
    PollManifest,
    /// Fetch `len` bytes of the image `sha256` from `offset` (HTTP Range); `url` when the
    /// manifest named one, else the server's blob path for the hash.
    Fetch {
        sha256: [u8; 32],
        url: Option<String>,
        offset: u32,
        len: u32,
        /// The whole blob's size (from the signed manifest): no answer may run past it, and
        /// a server that ignores `Range` sends all of it from byte 0.
        total: u32,
    },
    /// Open a chunked-protocol session (`POST /ota/check`) for release `sequence`, whose blob
    /// `sha256` has `size` bytes, starting at chunk `from`; answered with [`Input::Session`].
    OpenSession {
        sequence: u64,
        sha256: [u8; 32],
        size: u32,
        from: u32,
    },
    /// Fetch chunk `index` of `session` (`GET /ota/chunk`); answered with [`Input::Chunk`].
    FetchChunk {
        session: [u8; crate::chunk::SESSION_LEN],
        index: u32,
    },
    /// Publish a status event.
    Report(Event),
    /// Send the outcome of a release to the server.
    Ack(Ack),
    /// Stop reading the answer to the last [`Action::Fetch`] and drop its connection: no
    /// more [`Input::Body`], [`Input::BodyEnd`] or [`Input::FetchFailed`] for it. The agent
    /// gave up on it (slower than [`Config::min_rate`], or running past the blob's end).
    CancelFetch,
    /// Deliver [`Input::Timer`] at this time (ms); replaces any earlier request.
    WakeAt(u64),
    /// Restart the chip (`esp_restart`).
    Reboot,
}

#[derive(Debug)]
enum State {
    /// Waiting for [`Input::Boot`].
    Off,
    SelfTest,
    AwaitNetwork,
    Ready,
    /// The journal says a download was under way: wait for its manifest, then resume.
    AwaitManifest,
    Downloading(Download),
    Backoff(Download),
    Rebooting,
    /// A storage error left nothing sensible to do until the next reset.
    Halted,
}

#[derive(Clone, Copy, Debug, Default)]
struct Timers {
    confirm: Option<u64>,
    retry: Option<u64>,
    poll: Option<u64>,
    /// End of the current transfer-rate window of a download.
    rate: Option<u64>,
}

impl Timers {
    fn earliest(&self) -> Option<u64> {
        [self.confirm, self.retry, self.poll, self.rate]
            .into_iter()
            .flatten()
            .min()
    }
}

/// What the agent is busy with, as telemetry names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Booting: self-test or waiting for the network.
    Starting,
    Idle,
    Downloading,
    /// A download failed and waits to retry.
    Backoff,
    Rebooting,
    /// A storage error stopped the agent until the next reset.
    Halted,
}

impl Activity {
    pub const fn name(self) -> &'static str {
        match self {
            Activity::Starting => "starting",
            Activity::Idle => "idle",
            Activity::Downloading => "downloading",
            Activity::Backoff => "backoff",
            Activity::Rebooting => "rebooting",
            Activity::Halted => "halted",
        }
    }
}

/// A snapshot for the `telemetry` topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Telemetry<'a> {
    /// The running app's version (None before boot).
    pub version: Option<&'a str>,
    pub slot: Option<crate::platform::SlotKind>,
    /// The running image still has to confirm itself (rollback pending).
    pub probation: bool,
    pub activity: Activity,
    pub progress_pct: Option<u8>,
    pub online: bool,
}

/// What runs, as found at boot.
#[derive(Clone, Debug)]
struct Running {
    slot: Slot,
    version: String,
    sha256: [u8; 32],
}

/// The agent. One per boot: RAM state is lost on reset, everything that must survive is in
/// the journal.
pub struct Agent {
    cfg: Config,
    state: State,
    journal: Option<Journal>,
    running: Option<Running>,
    online: bool,
    timers: Timers,
    last_wake: Option<u64>,
    /// Refusals already reported since boot, so a retained announcement re-read every poll
    /// is reported once.
    reported: Vec<(u64, Check)>,
    out: VecDeque<Action>,
    /// The wall-clock time of the last input, to see the clock get set.
    last_now: Option<u64>,
    /// The key set of the last answer that carried one (the journal keeps its version).
    keys: Option<crate::trust::KeySet>,
}

impl Agent {
    pub fn new(cfg: Config) -> Agent {
        Agent {
            cfg,
            state: State::Off,
            journal: None,
            running: None,
            online: false,
            timers: Timers::default(),
            last_wake: None,
            reported: Vec::new(),
            out: VecDeque::new(),
            last_now: None,
            keys: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Next action for the shell, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// True once the agent asked for a reboot or halted: further inputs are ignored (a halted
    /// agent still answers commands).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Rebooting | State::Halted)
    }

    /// True while an image is being fetched or waits for a retry.
    pub fn is_downloading(&self) -> bool {
        matches!(self.state, State::Downloading(_) | State::Backoff(_))
    }

    /// What the board is doing, for its periodic telemetry. The shell publishes it on its own
    /// timer ([`crate::protocol::telemetry_json`]); asking does not change the agent.
    pub fn telemetry(&self) -> Telemetry<'_> {
        let (phase, progress_pct) = match &self.state {
            State::Off | State::SelfTest | State::AwaitNetwork => (Activity::Starting, None),
            State::Ready | State::AwaitManifest => (Activity::Idle, None),
            State::Downloading(d) | State::Backoff(d) => {
                let size = d.manifest.size.max(1) as u64;
                let pct = (d.written as u64 * 100 / size).min(100) as u8;
                let phase = if matches!(self.state, State::Backoff(_)) {
                    Activity::Backoff
                } else {
                    Activity::Downloading
                };
                (phase, Some(pct))
            }
            State::Rebooting => (Activity::Rebooting, None),
            State::Halted => (Activity::Halted, None),
        };
        Telemetry {
            version: self.running.as_ref().map(|r| r.version.as_str()),
            slot: self.running.as_ref().map(|r| r.slot.kind),
            probation: self.timers.confirm.is_some(),
            activity: phase,
            progress_pct,
            online: self.online,
        }
    }

    /// Feed one input. `now_ms` is Unix time in milliseconds.
    pub fn handle<P: Platform>(&mut self, p: &mut P, now_ms: u64, input: Input<'_>) {
        match self.state {
            State::Rebooting => return,
            // A storage error stopped updating, not the board: a command (`reboot`, `report`)
            // is still the operator's way to reach it.
            State::Halted => {
                if let Input::Command { payload, retained } = input {
                    self.on_command(p, now_ms, payload, retained);
                }
                return;
            }
            _ => {}
        }
        self.observe_clock(now_ms);
        match input {
            Input::Boot => self.on_boot(p, now_ms),
            Input::SelfTestDone { passed, detail } => self.on_self_test(p, now_ms, passed, detail),
            Input::Online => self.on_online(p, now_ms),
            Input::Offline => self.online = false,
            Input::Manifest(bytes) => self.on_release(p, now_ms, bytes, false),
            Input::Announcement(bytes) => self.on_release(p, now_ms, bytes, true),
            Input::Command { payload, retained } => self.on_command(p, now_ms, payload, retained),
            // With the chunked protocol, only chunks whose tag verifies are written.
            Input::Body { .. } | Input::BodyEnd if self.chunked() => {}
            Input::Body { offset, data } => self.on_body(p, now_ms, offset, data),
            Input::BodyEnd => self.on_body_end(p, now_ms),
            Input::Session(answer) => self.on_session(p, now_ms, answer),
            Input::Chunk(frame) => self.on_chunk(p, now_ms, frame),
            Input::FetchFailed { reason } => self.on_fetch_failed(p, now_ms, reason),
            Input::Timer => self.on_timer(p, now_ms),
            Input::TlsFailed { peer, detail } => self.on_tls_failed(peer, detail),
        }
        self.sync_wake();
    }

    // ---- helpers -----------------------------------------------------------------------

    fn on_tls_failed(&mut self, peer: Peer, detail: &str) {
        // Keyed like a refusal, with the peer in place of a sequence number.
        let key = (peer as u64, Check::Tls);
        if self.reported.contains(&key) {
            return;
        }
        self.reported.push(key);
        // The detail comes from the TLS stack: kept short.
        let cut = detail
            .char_indices()
            .nth(160)
            .map_or(detail.len(), |(i, _)| i);
        self.emit(Event::TransportRefused {
            peer: peer.name(),
            check: Check::Tls,
            detail: detail[..cut].to_string(),
        });
    }

    /// Whether `now` is a set clock's time (see [`Config::time_floor_ms`]).
    pub(super) fn clock_is_set(&self, now: u64) -> bool {
        now >= self.cfg.time_floor_ms
    }

    /// When the clock gets set it jumps decades ahead; timers set on the unset clock move by
    /// the jump, so a confirmation deadline or a backoff does not pass at once. The jump is
    /// measured from the last input, so a timer may run late by up to the gap between two
    /// inputs; late is safe, early would roll a good image back.
    fn observe_clock(&mut self, now: u64) {
        if let Some(last) = self.last_now {
            if !self.clock_is_set(last) && self.clock_is_set(now) {
                let jump = now.saturating_sub(last);
                let t = &mut self.timers;
                for timer in [&mut t.confirm, &mut t.retry, &mut t.poll, &mut t.rate]
                    .into_iter()
                    .flatten()
                {
                    *timer = timer.saturating_add(jump);
                }
            }
        }
        self.last_now = Some(now);
    }

    pub(super) fn record(&self) -> &Record {
        match &self.journal {
            Some(j) => j.record(),
            None => &Record::EMPTY,
        }
    }

    pub(super) fn store<P: Platform>(&mut self, p: &mut P, rec: Record) -> Result<(), EspError> {
        match &mut self.journal {
            Some(j) => j.store(p, rec),
            None => Err(EspError::InvalidState),
        }
    }

    pub(super) fn running_version(&self) -> String {
        self.running
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default()
    }

    pub(super) fn ack(&mut self, sequence: u64, version: &str, outcome: Outcome) {
        self.out.push_back(Action::Ack(Ack {
            sequence,
            version: version.to_string(),
            outcome,
        }));
    }

    pub(super) fn emit(&mut self, e: Event) {
        self.out.push_back(Action::Report(e));
    }

    pub(super) fn halt(&mut self, during: &'static str, e: EspError) {
        self.timers = Timers::default();
        self.emit(Event::StorageError {
            during,
            error: e.to_string(),
        });
        self.state = State::Halted;
    }

    pub(super) fn sync_wake(&mut self) {
        let next = self.timers.earliest();
        if next != self.last_wake {
            self.last_wake = next;
            if let Some(t) = next {
                self.out.push_back(Action::WakeAt(t));
            }
        }
    }
}

/// FNV-1a of the device id and a counter: a cheap, stable per-device jitter source.
fn device_hash(id: &str, n: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(n.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
