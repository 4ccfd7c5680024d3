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
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use sha2::{Digest, Sha256};

use crate::delta::{self, Applier, Resume};
use crate::event::{Ack, Check, Event, Outcome};
use crate::image;
use crate::journal::{Journal, Phase, Record, SECTOR};
use crate::manifest::{self, Manifest, TrustedKey};
use crate::platform::{EspError, OtaImgState, Platform, Slot, SlotKind};

/// Extra boots given to a new image that the bootloader found unconfirmed.
const UNCONFIRMED_RETRIES: u8 = 2;

/// Build-time configuration of the firmware.
#[derive(Clone, Debug)]
pub struct Config {
    pub device_id: String,
    pub device_type: String,
    /// Release channel this board follows ("stable", "beta", …).
    pub channel: String,
    pub trusted_keys: Vec<TrustedKey>,
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
    /// How often to ask the server for the latest manifest (0: only when the network comes up).
    pub poll_interval_ms: u64,
    /// Use a delta patch when the manifest offers one for the running image.
    pub use_deltas: bool,
}

impl Config {
    pub fn new(device_id: &str, device_type: &str, trusted_keys: Vec<TrustedKey>) -> Config {
        Config {
            device_id: device_id.to_string(),
            device_type: device_type.to_string(),
            channel: "stable".to_string(),
            trusted_keys,
            chunk_size: 16 * 1024,
            checkpoint_interval: 64 * 1024,
            confirm_requires_network: true,
            confirm_timeout_ms: 120_000,
            max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            max_fetch_failures: 10,
            poll_interval_ms: 60_000,
            use_deltas: true,
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
    /// A signed manifest arrived (poll answer).
    Manifest(&'a [u8]),
    /// A payload on the release topic (a retained announcement, [`crate::protocol`]).
    Announcement(&'a [u8]),
    /// A payload on this board's command topic.
    Command(&'a [u8]),
    /// Bytes of the image at `offset`, part of the answer to the last [`Action::Fetch`].
    Body {
        offset: u32,
        data: &'a [u8],
    },
    /// The answer to the last [`Action::Fetch`] ended (complete or cut short).
    BodyEnd,
    /// The last [`Action::Fetch`] failed before or while its body arrived.
    FetchFailed {
        reason: &'a str,
    },
    /// A time asked for with [`Action::WakeAt`] has come.
    Timer,
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
    },
    /// Publish a status event.
    Report(Event),
    /// Send the outcome of a release to the server.
    Ack(Ack),
    /// Deliver [`Input::Timer`] at this time (ms); replaces any earlier request.
    WakeAt(u64),
    /// Restart the chip (`esp_restart`).
    Reboot,
}

#[derive(Debug)]
struct Download {
    manifest: Manifest,
    sha256: [u8; 32],
    slot: Slot,
    /// Bytes of the new image in the slot.
    written: u32,
    /// End of the current range request (in the image, or in the patch for a delta).
    requested_end: u32,
    consecutive_failures: u32,
    next_progress_pct: u32,
    delta: Option<DeltaDownload>,
}

/// A delta being applied: patch bytes in, new image bytes out.
struct DeltaDownload {
    applier: alloc::boxed::Box<Applier>,
    patch_sha256: [u8; 32],
    patch_size: u32,
    url: Option<String>,
    /// The running slot, where old bytes are read.
    old: Slot,
}

impl core::fmt::Debug for DeltaDownload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeltaDownload")
            .field("next", &self.applier.next_offset())
            .finish()
    }
}

impl Download {
    /// Where the next range starts and where the thing being fetched ends.
    fn fetch_window(&self) -> (u32, u32) {
        match &self.delta {
            Some(d) => (d.applier.next_offset() as u32, d.patch_size),
            None => (self.written, self.manifest.size),
        }
    }
}

/// What the applier needs from the board while patching: old bytes, the update slot, and
/// the journal, where each checkpoint is made durable the moment it is offered (one range of
/// patch can produce the whole image, so waiting for the range to end would be too late).
struct PatchSink<'a, P: Platform> {
    p: &'a mut P,
    journal: &'a mut Option<Journal>,
    old: Slot,
    error: Option<(&'static str, EspError)>,
}

impl<P: Platform> delta::Sink for PatchSink<'_, P> {
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), delta::SinkError> {
        self.p.slot_read(self.old, offset, buf).map_err(|e| {
            self.error = Some(("reading the running image", e));
            delta::SinkError
        })
    }
    fn write_new(&mut self, data: &[u8]) -> Result<(), delta::SinkError> {
        self.p.ota_write(data).map_err(|e| {
            self.error = Some(("esp_ota_write", e));
            delta::SinkError
        })
    }
    fn checkpoint(&mut self, at: Resume) {
        if self.error.is_some() {
            return;
        }
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let rec = Record {
            checkpoint: at.new_written,
            resume: at,
            ..*j.record()
        };
        if let Err(e) = j.store(self.p, rec) {
            self.error = Some(("writing the journal", e));
        }
    }
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
}

impl Timers {
    fn earliest(&self) -> Option<u64> {
        [self.confirm, self.retry, self.poll]
            .into_iter()
            .flatten()
            .min()
    }
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
    /// Ids of recent commands, so a duplicated or replayed command acts once.
    seen_commands: VecDeque<String>,
    out: VecDeque<Action>,
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
            seen_commands: VecDeque::new(),
            out: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Next action for the shell, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// True once the agent asked for a reboot or halted: further inputs are ignored.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Rebooting | State::Halted)
    }

    /// True while an image is being fetched or waits for a retry.
    pub fn is_downloading(&self) -> bool {
        matches!(self.state, State::Downloading(_) | State::Backoff(_))
    }

    /// Feed one input. `now_ms` is Unix time in milliseconds.
    pub fn handle<P: Platform>(&mut self, p: &mut P, now_ms: u64, input: Input<'_>) {
        if self.is_finished() {
            return;
        }
        match input {
            Input::Boot => self.on_boot(p, now_ms),
            Input::SelfTestDone { passed, detail } => self.on_self_test(p, now_ms, passed, detail),
            Input::Online => self.on_online(p, now_ms),
            Input::Offline => self.online = false,
            Input::Manifest(bytes) => self.on_manifest(p, now_ms, bytes),
            Input::Announcement(bytes) => match crate::protocol::parse_announcement(bytes) {
                Ok(a) => {
                    let signed = crate::protocol::announcement_manifest(&a);
                    self.on_manifest(p, now_ms, &signed)
                }
                Err(e) => self.emit(Event::BadMessage {
                    topic: "release",
                    reason: e.to_string(),
                }),
            },
            Input::Command(bytes) => self.on_command(now_ms, bytes),
            Input::Body { offset, data } => self.on_body(p, offset, data),
            Input::BodyEnd => self.on_body_end(p, now_ms),
            Input::FetchFailed { reason } => self.on_fetch_failed(p, now_ms, reason),
            Input::Timer => self.on_timer(p, now_ms),
        }
        self.sync_wake();
    }

    // ---- boot and confirmation -------------------------------------------------------

    fn on_boot<P: Platform>(&mut self, p: &mut P, now: u64) {
        if !matches!(self.state, State::Off) {
            return;
        }
        let journal = match Journal::load(p) {
            Ok(j) => j,
            Err(e) => return self.halt("reading the journal", e),
        };
        self.journal = Some(journal);
        let slot = p.running_slot();
        let (version, sha256) = match image::verify(slot.size, |off, buf| {
            p.slot_read(slot, off, buf).map_err(|_| ())
        }) {
            Ok(info) => (info.desc.version.as_str().to_string(), info.sha256),
            // The bootloader verified this image a moment ago; failing here means flash reads
            // are failing, which a later step reports.
            Err(_) => ("unknown".to_string(), [0; 32]),
        };
        let state = match slot.kind {
            SlotKind::Ota(_) => match p.slot_state(slot) {
                Ok(s) => s,
                Err(e) => return self.halt("reading otadata", e),
            },
            _ => None,
        };
        self.running = Some(Running {
            slot,
            version: version.clone(),
            sha256,
        });
        self.emit(Event::Booted {
            version,
            slot: slot.kind,
            sha256,
            state,
        });
        // On probation: the bootloader says PENDING_VERIFY, or the journal says this image was
        // just installed and nothing has marked it valid yet. The second case covers a power
        // cut while the bootloader rewrote the NEW entry in place: the torn entry can come
        // back valid but UNDEFINED, which the bootloader would never roll back.
        let rec = *self.record();
        let just_installed = rec.phase == Phase::Installed
            && rec.sha256 == sha256
            && matches!(state, Some(OtaImgState::Undefined | OtaImgState::New));
        if state == Some(OtaImgState::PendingVerify) || just_installed {
            self.state = State::SelfTest;
            self.timers.confirm = Some(now + self.cfg.confirm_timeout_ms);
            self.out.push_back(Action::RunSelfTest);
        } else {
            self.reconcile(p, now);
        }
    }

    fn on_self_test<P: Platform>(&mut self, p: &mut P, now: u64, passed: bool, detail: &str) {
        if !matches!(self.state, State::SelfTest) {
            return;
        }
        self.emit(Event::SelfTest {
            passed,
            detail: detail.to_string(),
        });
        if !passed {
            return self.roll_back_self(p, format!("self-test failed: {detail}"));
        }
        if self.cfg.confirm_requires_network && !self.online {
            self.state = State::AwaitNetwork;
        } else {
            self.confirm(p, now);
        }
    }

    fn on_online<P: Platform>(&mut self, p: &mut P, now: u64) {
        self.online = true;
        match self.state {
            State::AwaitNetwork => self.confirm(p, now),
            State::Ready | State::AwaitManifest => self.poll(now),
            _ => {}
        }
    }

    fn confirm<P: Platform>(&mut self, p: &mut P, now: u64) {
        self.timers.confirm = None;
        if let Err(e) = p.mark_app_valid_cancel_rollback() {
            return self.halt("marking the app valid", e);
        }
        let version = self.running_version();
        self.emit(Event::Confirmed { version });
        self.reconcile(p, now);
    }

    /// The running image failed before it was confirmed: mark it invalid and reboot into the
    /// previous one (`esp_ota_mark_app_invalid_rollback_and_reboot`).
    fn roll_back_self<P: Platform>(&mut self, p: &mut P, reason: String) {
        self.timers = Timers::default();
        let version = self.running_version();
        self.emit(Event::RollingBack { version, reason });
        match p.mark_app_invalid_rollback() {
            Ok(()) => {
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            // ESP_ERR_OTA_ROLLBACK_FAILED: no other bootable app; keep running this one.
            Err(e) => self.halt("rolling back", e),
        }
    }

    /// After boot (and confirmation): finish whatever the journal says was under way.
    fn reconcile<P: Platform>(&mut self, p: &mut P, now: u64) {
        let rec = *self.record();
        let running = self.running.clone();
        let Some(running) = running else { return };
        match rec.phase {
            Phase::Idle => self.state = State::Ready,
            Phase::Downloading => {
                let slot_ok = p
                    .next_update_slot()
                    .is_some_and(|s| s.address == rec.slot_addr);
                if rec.sha256 == running.sha256 || !slot_ok {
                    // Stale: the image already runs, or the layout changed under it.
                    let idle = Record {
                        phase: Phase::Idle,
                        ..rec
                    };
                    if let Err(e) = self.store(p, idle) {
                        return self.halt("writing the journal", e);
                    }
                    self.state = State::Ready;
                } else {
                    self.state = State::AwaitManifest;
                }
            }
            Phase::Installed => self.reconcile_installed(p, rec, &running),
        }
        if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
            self.poll(now);
        }
    }

    fn reconcile_installed<P: Platform>(&mut self, p: &mut P, rec: Record, running: &Running) {
        let version = image::heapless_str::Str32::from_c(&rec.version)
            .as_str()
            .to_string();
        if running.sha256 == rec.sha256 {
            // The new image runs and is confirmed: the release is done.
            let idle = Record {
                phase: Phase::Idle,
                attempts: 0,
                installs: 0,
                highest_seq: rec.highest_seq.max(rec.target_seq),
                ..rec
            };
            self.ack(rec.target_seq, &version, Outcome::Installed);
            if let Err(e) = self.store(p, idle) {
                return self.halt("writing the journal", e);
            }
            self.state = State::Ready;
            return;
        }
        let target = p.next_update_slot().filter(|s| s.address == rec.slot_addr);
        let state = match target.map(|s| p.slot_state(s)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return self.halt("reading otadata", e),
            None => None,
        };
        // An image the bootloader found unconfirmed (ABORTED) either crashed or hung — or lost
        // power while `esp_ota_mark_app_valid_cancel_rollback` rewrote its otadata entry in
        // place, which leaves the entry PENDING_VERIFY and looks exactly the same. So it gets
        // `UNCONFIRMED_RETRIES` more boots before it is declared bad. An image that marked
        // itself INVALID said so itself and is not retried.
        let unconfirmed = matches!(
            state,
            Some(OtaImgState::Aborted | OtaImgState::PendingVerify)
        );
        let retry_unconfirmed = unconfirmed && rec.installs < UNCONFIRMED_RETRIES;
        match (target, state) {
            (
                _,
                Some(
                    s @ (OtaImgState::Invalid | OtaImgState::Aborted | OtaImgState::PendingVerify),
                ),
            ) if !retry_unconfirmed => {
                let detail = match s {
                    OtaImgState::Invalid => {
                        format!(
                            "{version} marked itself invalid (self-test or confirmation failed)"
                        )
                    }
                    _ => format!(
                        "{version} never confirmed (crashed or hung); the bootloader rolled back"
                    ),
                };
                let idle = Record {
                    phase: Phase::Idle,
                    known_bad: rec.sha256,
                    ..rec
                };
                self.ack(rec.target_seq, &version, Outcome::RolledBack { detail });
                if let Err(e) = self.store(p, idle) {
                    return self.halt("writing the journal", e);
                }
                self.state = State::Ready;
            }
            (Some(slot), _) if rec.installs < 3 => {
                // The switch to the new image did not land (power cut while otadata was being
                // written, or before), or it never got confirmed (see above): check the image
                // again and switch again.
                let ok = self.slot_matches(p, slot, rec.size, &rec.sha256);
                if !ok {
                    let again = Record {
                        phase: Phase::Downloading,
                        checkpoint: 0,
                        ..rec
                    };
                    if let Err(e) = self.store(p, again) {
                        return self.halt("writing the journal", e);
                    }
                    self.state = State::AwaitManifest;
                    return;
                }
                let retry = Record {
                    installs: rec.installs + 1,
                    ..rec
                };
                if let Err(e) = self.store(p, retry) {
                    return self.halt("writing the journal", e);
                }
                self.switch_boot(p, slot, rec.target_seq, &version, rec);
            }
            _ => {
                let detail =
                    "the boot partition could not be switched after 3 attempts".to_string();
                let idle = Record {
                    phase: Phase::Idle,
                    known_bad: rec.sha256,
                    ..rec
                };
                self.refuse(rec.target_seq, &version, Check::BootPartition, detail);
                if let Err(e) = self.store(p, idle) {
                    return self.halt("writing the journal", e);
                }
                self.state = State::Ready;
            }
        }
    }

    // ---- commands --------------------------------------------------------------------

    fn on_command(&mut self, now: u64, bytes: &[u8]) {
        use crate::protocol::CommandKind;
        let cmd = match crate::protocol::parse_command(bytes) {
            Ok(c) => c,
            Err(e) => {
                return self.emit(Event::BadMessage {
                    topic: "cmd",
                    reason: e.to_string(),
                })
            }
        };
        if self.seen_commands.contains(&cmd.id) {
            return; // duplicated or replayed
        }
        if self.seen_commands.len() == 16 {
            self.seen_commands.pop_front();
        }
        self.seen_commands.push_back(cmd.id);
        match cmd.kind {
            CommandKind::UpdateNow => {
                if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
                    self.poll(now);
                }
            }
            CommandKind::Reboot => {
                // Safe at any point: everything that must survive is in the journal.
                self.timers = Timers::default();
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            CommandKind::Report => {
                let state = match &self.state {
                    State::Off => "off",
                    State::SelfTest => "self-test",
                    State::AwaitNetwork => "await-network",
                    State::Ready => "ready",
                    State::AwaitManifest => "await-manifest",
                    State::Downloading(_) => "downloading",
                    State::Backoff(_) => "backoff",
                    State::Rebooting => "rebooting",
                    State::Halted => "halted",
                };
                let version = self.running_version();
                self.emit(Event::Report { state, version });
            }
        }
    }

    // ---- manifests -------------------------------------------------------------------

    fn poll(&mut self, now: u64) {
        self.out.push_back(Action::PollManifest);
        if self.cfg.poll_interval_ms > 0 {
            self.timers.poll = Some(now + self.cfg.poll_interval_ms);
        }
    }

    fn on_manifest<P: Platform>(&mut self, p: &mut P, now: u64, bytes: &[u8]) {
        if !matches!(self.state, State::Ready | State::AwaitManifest) {
            return; // busy: a download, a self-test or a reboot is under way
        }
        let m = match manifest::open(bytes, &self.cfg.trusted_keys) {
            Ok(m) => m,
            Err(e) => {
                let check = if e.is_signature() {
                    Check::Signature
                } else {
                    Check::Malformed
                };
                return self.refuse(0, "?", check, e.to_string());
            }
        };
        let Some(sha) = m.sha256_bytes() else { return };
        let rec = *self.record();
        if matches!(self.state, State::AwaitManifest)
            && m.sequence == rec.target_seq
            && sha == rec.sha256
        {
            if let Err((check, detail)) = self.evaluate(p, now, &m, &sha) {
                return self.refuse(m.sequence, &m.version, check, detail);
            }
            return self.resume(p, m, sha, rec);
        }
        match self.evaluate(p, now, &m, &sha) {
            Ok(()) => self.start(p, m, sha),
            Err((Check::AlreadyInstalled, _)) => {} // the steady state, nothing to say
            Err((check, detail)) => self.refuse(m.sequence, &m.version, check, detail),
        }
    }

    /// The checks a signed manifest must pass, in order. The signature was checked already.
    fn evaluate<P: Platform>(
        &self,
        p: &mut P,
        now: u64,
        m: &Manifest,
        sha: &[u8; 32],
    ) -> Result<(), (Check, String)> {
        let rec = self.record();
        let running = self.running.as_ref();
        if m.device_type != self.cfg.device_type {
            return Err((
                Check::DeviceType,
                format!(
                    "manifest is for '{}', this board is '{}'",
                    m.device_type, self.cfg.device_type
                ),
            ));
        }
        if m.expires_at.saturating_mul(1000) < now {
            return Err((
                Check::Expired,
                format!(
                    "manifest expired at {} (unix s), now is {}",
                    m.expires_at,
                    now / 1000
                ),
            ));
        }
        if running.is_some_and(|r| &r.sha256 == sha) {
            return Err((
                Check::AlreadyInstalled,
                format!("{} is already running", m.version),
            ));
        }
        if m.sequence <= rec.highest_seq {
            return Err((
                Check::Sequence,
                format!(
                    "sequence {} is not above {} already installed (replayed or stale manifest)",
                    m.sequence, rec.highest_seq
                ),
            ));
        }
        let fuse = p.efuse_secure_version();
        if m.secure_version < fuse {
            return Err((
                Check::SecureVersion,
                format!(
                    "secure_version {} is below the eFuse anti-rollback counter {fuse}",
                    m.secure_version
                ),
            ));
        }
        if &rec.known_bad == sha {
            return Err((
                Check::KnownBad,
                format!(
                    "{} already failed on this board and was rolled back or refused",
                    m.version
                ),
            ));
        }
        if rec.phase == Phase::Idle
            && rec.target_seq == m.sequence
            && rec.attempts >= self.cfg.max_attempts
        {
            return Err((
                Check::KnownBad,
                format!(
                    "gave up on sequence {} after {} failed attempts",
                    m.sequence, rec.attempts
                ),
            ));
        }
        let slot = p
            .next_update_slot()
            .ok_or((Check::TooLarge, "no OTA slot".to_string()))?;
        if m.size > slot.size || (m.size as usize) < image::HEADER_LEN {
            return Err((
                Check::TooLarge,
                format!(
                    "image is {} bytes, slot {} holds {}",
                    m.size, slot.kind, slot.size
                ),
            ));
        }
        Ok(())
    }

    fn refuse(&mut self, sequence: u64, version: &str, check: Check, detail: String) {
        if self.reported.contains(&(sequence, check)) {
            return;
        }
        self.reported.push((sequence, check));
        self.emit(Event::Refused {
            sequence,
            version: version.to_string(),
            check,
            detail: detail.clone(),
        });
        // One ack per release: a known-bad release had its outcome acked when it failed, and an
        // envelope that did not verify carries no sequence number worth believing.
        if sequence != 0 && check != Check::KnownBad {
            self.ack(sequence, version, Outcome::Refused { check, detail });
        }
    }

    // ---- download ----------------------------------------------------------------------

    fn start<P: Platform>(&mut self, p: &mut P, m: Manifest, sha: [u8; 32]) {
        let Some(slot) = p.next_update_slot() else {
            return;
        };
        let rec = *self.record();
        let attempts = if rec.target_seq == m.sequence {
            rec.attempts
        } else {
            0
        };
        let patch = self.pick_delta(&m).filter(|_| attempts == 0);
        let next = Record {
            phase: Phase::Downloading,
            attempts,
            installs: 0,
            target_seq: m.sequence,
            size: m.size,
            checkpoint: 0,
            slot_addr: slot.address,
            sha256: sha,
            version: image::heapless_str::Str32::new(&m.version).field(),
            delta: patch.is_some(),
            patch_sha256: patch.as_ref().map_or([0; 32], |d| d.patch_sha256),
            resume: Resume::default(),
            ..rec
        };
        // Journal first: a cut inside esp_ota_begin then resumes at 0, which re-erases.
        if let Err(e) = self.store(p, next) {
            return self.halt("writing the journal", e);
        }
        if let Err(e) = p.ota_begin(slot) {
            return self.halt("esp_ota_begin", e);
        }
        self.begin_download(m, sha, slot, 0, patch);
    }

    /// The manifest's delta for the running image, if any (and deltas are enabled).
    fn pick_delta(&self, m: &Manifest) -> Option<DeltaDownload> {
        let running = self.running.as_ref()?;
        if !self.cfg.use_deltas {
            return None;
        }
        let d = m
            .deltas
            .iter()
            .find(|d| d.from_bytes() == Some(running.sha256))?;
        Some(DeltaDownload {
            applier: alloc::boxed::Box::new(Applier::new(self.cfg.checkpoint_interval.max(SECTOR))),
            patch_sha256: d.sha256_bytes()?,
            patch_size: d.size,
            url: d.url.clone(),
            old: running.slot,
        })
    }

    fn resume<P: Platform>(&mut self, p: &mut P, m: Manifest, sha: [u8; 32], rec: Record) {
        let Some(slot) = p.next_update_slot() else {
            return;
        };
        let mut patch = None;
        if rec.delta {
            match self
                .pick_delta(&m)
                .filter(|d| d.patch_sha256 == rec.patch_sha256)
            {
                Some(mut d) => {
                    if rec.checkpoint > 0 {
                        let iv = self.cfg.checkpoint_interval.max(SECTOR);
                        d.applier = alloc::boxed::Box::new(Applier::resume(iv, rec.resume));
                    }
                    patch = Some(d);
                }
                // The patch is no longer offered: start over with the full image.
                None => return self.start(p, m, sha),
            }
        }
        let from = rec.checkpoint - rec.checkpoint % SECTOR;
        let res = if from == 0 {
            p.ota_begin(slot)
        } else {
            p.ota_resume(slot, from)
        };
        if let Err(e) = res {
            return self.halt("esp_ota_resume", e);
        }
        self.begin_download(m, sha, slot, from, patch);
    }

    fn begin_download(
        &mut self,
        m: Manifest,
        sha: [u8; 32],
        slot: Slot,
        from: u32,
        delta: Option<DeltaDownload>,
    ) {
        self.timers.poll = None;
        self.emit(Event::Downloading {
            sequence: m.sequence,
            version: m.version.clone(),
            size: m.size,
            resumed_from: from,
            delta: delta.is_some(),
        });
        let pct = (from as u64 * 100 / m.size.max(1) as u64) as u32;
        let dl = Download {
            manifest: m,
            sha256: sha,
            slot,
            written: from,
            requested_end: 0,
            consecutive_failures: 0,
            next_progress_pct: (pct / 10 + 1) * 10,
            delta,
        };
        self.state = State::Downloading(dl);
        self.request_next();
    }

    fn request_next(&mut self) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let (at, total) = dl.fetch_window();
        if at >= total {
            return;
        }
        let len = core::cmp::min(self.cfg.chunk_size, total - at);
        dl.requested_end = at + len;
        let (sha256, url) = match &dl.delta {
            Some(d) => (d.patch_sha256, d.url.clone()),
            None => (dl.sha256, dl.manifest.url.clone()),
        };
        self.out.push_back(Action::Fetch {
            sha256,
            url,
            offset: at,
            len,
        });
    }

    fn on_body<P: Platform>(&mut self, p: &mut P, offset: u32, data: &[u8]) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let (at, total) = dl.fetch_window();
        let end = offset.saturating_add(data.len() as u32);
        if offset > at || end <= at {
            return; // a gap (re-requested at BodyEnd) or bytes we already have
        }
        let skip = (at - offset) as usize;
        let take = core::cmp::min(core::cmp::min(end, dl.requested_end.max(at)), total) - at;
        if take == 0 {
            return;
        }
        let piece = &data[skip..skip + take as usize];
        let mut checkpoint = None;
        if let Some(d) = dl.delta.as_mut() {
            let mut sink = PatchSink {
                p: &mut *p,
                journal: &mut self.journal,
                old: d.old,
                error: None,
            };
            let res = d.applier.feed(piece, &mut sink);
            let err = sink.error;
            dl.written = d.applier.new_written() as u32;
            match (res, err) {
                (_, Some((during, e))) => {
                    p.ota_abort();
                    return self.halt(during, e);
                }
                (Ok(_), None) => {}
                (Err(e), None) => return self.delta_failed(p, e),
            }
        } else {
            if let Err(e) = p.ota_write(piece) {
                p.ota_abort();
                return self.halt("esp_ota_write", e);
            }
            dl.written += take;
            let interval = self.cfg.checkpoint_interval.max(SECTOR);
            let rec = self.journal.as_ref().map_or(0, |j| j.record().checkpoint);
            if dl.written / interval > rec / interval && dl.written < dl.manifest.size {
                checkpoint = Some(dl.written - dl.written % interval);
            }
        }
        dl.consecutive_failures = 0;
        let (seq, written, size) = (dl.manifest.sequence, dl.written, dl.manifest.size);
        let mut progress = None;
        if written as u64 * 100 >= dl.next_progress_pct as u64 * size as u64 {
            dl.next_progress_pct = (written as u64 * 100 / size as u64) as u32 / 10 * 10 + 10;
            progress = Some(Event::Progress {
                sequence: seq,
                written,
                size,
            });
        }
        if let Some(cp) = checkpoint {
            let rec = *self.record();
            let next = Record {
                checkpoint: cp,
                ..rec
            };
            if let Err(e) = self.store(p, next) {
                return self.halt("writing the journal", e);
            }
        }
        if let Some(ev) = progress {
            self.emit(ev);
        }
    }

    /// The patch could not be applied: fall back to the full image.
    fn delta_failed<P: Platform>(&mut self, p: &mut P, e: delta::DeltaError) {
        let State::Downloading(dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        p.ota_abort();
        self.emit(Event::DeltaFailed {
            sequence: dl.manifest.sequence,
            reason: e.to_string(),
        });
        let rec = *self.record();
        let full = Record {
            phase: Phase::Downloading,
            delta: false,
            checkpoint: 0,
            resume: Resume::default(),
            ..rec
        };
        if let Err(e) = self.store(p, full) {
            return self.halt("writing the journal", e);
        }
        if let Err(e) = p.ota_begin(dl.slot) {
            return self.halt("esp_ota_begin", e);
        }
        self.begin_download(dl.manifest, dl.sha256, dl.slot, 0, None);
    }

    fn on_body_end<P: Platform>(&mut self, p: &mut P, now: u64) {
        let State::Downloading(dl) = &self.state else {
            return;
        };
        let done = match &dl.delta {
            Some(d) => d.applier.is_done(),
            None => dl.written >= dl.manifest.size,
        };
        if done {
            return self.finish(p);
        }
        let (at, total) = dl.fetch_window();
        if dl.delta.is_some() && at >= total {
            return self.delta_failed(p, delta::DeltaError::Truncated);
        }
        if at >= dl.requested_end {
            return self.request_next();
        }
        self.on_fetch_failed(p, now, &format!("response ended early at byte {at}"));
    }

    fn on_fetch_failed<P: Platform>(&mut self, p: &mut P, now: u64, reason: &str) {
        let State::Downloading(mut dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        dl.consecutive_failures += 1;
        if dl.consecutive_failures >= self.cfg.max_fetch_failures {
            // Stop retrying this release (a new release, with a higher sequence, starts over);
            // the old image keeps running untouched.
            p.ota_abort();
            let rec = *self.record();
            let gave_up = Record {
                phase: Phase::Idle,
                attempts: self.cfg.max_attempts,
                ..rec
            };
            if let Err(e) = self.store(p, gave_up) {
                return self.halt("writing the journal", e);
            }
            let detail = format!(
                "{} consecutive requests failed at byte {}; last: {reason}",
                dl.consecutive_failures, dl.written
            );
            return self.refuse(
                dl.manifest.sequence,
                &dl.manifest.version,
                Check::Download,
                detail,
            );
        }
        let exp = core::cmp::min(dl.consecutive_failures - 1, 16);
        let base = self.cfg.retry_base_ms.saturating_mul(1u64 << exp);
        // Spread retries of a fleet that failed together (same server hiccup) over time,
        // deterministically per device so a run replays exactly.
        let jitter = device_hash(&self.cfg.device_id, dl.consecutive_failures) % (base / 4 + 1);
        let delay = core::cmp::min(base + jitter, self.cfg.retry_max_ms);
        self.emit(Event::FetchFailed {
            sequence: dl.manifest.sequence,
            offset: dl.written,
            reason: reason.to_string(),
            retry_in_ms: delay,
        });
        self.timers.retry = Some(now + delay);
        self.state = State::Backoff(dl);
    }

    fn on_timer<P: Platform>(&mut self, p: &mut P, now: u64) {
        if self.timers.confirm.is_some_and(|t| t <= now) {
            self.timers.confirm = None;
            if matches!(self.state, State::SelfTest | State::AwaitNetwork) {
                let what = if matches!(self.state, State::SelfTest) {
                    "self-test"
                } else {
                    "network"
                };
                let reason = format!(
                    "not confirmed within {} s (waiting for {what})",
                    self.cfg.confirm_timeout_ms / 1000
                );
                return self.roll_back_self(p, reason);
            }
        }
        if self.timers.retry.is_some_and(|t| t <= now) {
            self.timers.retry = None;
            if let State::Backoff(dl) = core::mem::replace(&mut self.state, State::Ready) {
                self.state = State::Downloading(dl);
                self.request_next();
            }
        }
        if self.timers.poll.is_some_and(|t| t <= now) {
            self.timers.poll = None;
            if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
                self.poll(now);
            }
        }
    }

    /// All bytes are in the slot: check them, validate the image, switch the boot partition.
    fn finish<P: Platform>(&mut self, p: &mut P) {
        let State::Downloading(dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        let (seq, version) = (dl.manifest.sequence, dl.manifest.version.clone());
        let rec = *self.record();
        if !self.slot_matches(p, dl.slot, dl.manifest.size, &dl.sha256) {
            if dl.delta.is_some() {
                self.state = State::Downloading(dl);
                return self.delta_failed(
                    p,
                    delta::DeltaError::BadControl {
                        reason: "the patched image does not match the manifest's SHA-256",
                    },
                );
            }
            p.ota_abort();
            let attempts = rec.attempts.saturating_add(1);
            if attempts >= self.cfg.max_attempts {
                let idle = Record {
                    phase: Phase::Idle,
                    attempts,
                    ..rec
                };
                if let Err(e) = self.store(p, idle) {
                    return self.halt("writing the journal", e);
                }
                let detail = format!(
                    "SHA-256 of the downloaded image does not match the manifest ({attempts} attempts)"
                );
                return self.refuse(seq, &version, Check::Hash, detail);
            }
            self.emit(Event::FetchFailed {
                sequence: seq,
                offset: dl.manifest.size,
                reason: "SHA-256 mismatch: downloading again from byte 0".to_string(),
                retry_in_ms: 0,
            });
            let again = Record {
                phase: Phase::Downloading,
                attempts,
                checkpoint: 0,
                ..rec
            };
            if let Err(e) = self.store(p, again) {
                return self.halt("writing the journal", e);
            }
            if let Err(e) = p.ota_begin(dl.slot) {
                return self.halt("esp_ota_begin", e);
            }
            return self.begin_download(dl.manifest, dl.sha256, dl.slot, 0, None);
        }
        match p.ota_end() {
            Ok(()) => {}
            Err(EspError::ValidateFailed) => {
                return self.give_up(p, rec, seq, &version, Check::ImageValidation,
                    "esp_ota_end: image validation failed (truncated, corrupt or not an ESP32-S3 app)".to_string());
            }
            Err(e) => return self.halt("esp_ota_end", e),
        }
        self.emit(Event::Verified { sequence: seq });
        let installed = Record {
            phase: Phase::Installed,
            installs: 0,
            checkpoint: rec.size,
            ..rec
        };
        if let Err(e) = self.store(p, installed) {
            return self.halt("writing the journal", e);
        }
        self.switch_boot(p, dl.slot, seq, &version, installed);
    }

    fn switch_boot<P: Platform>(
        &mut self,
        p: &mut P,
        slot: Slot,
        seq: u64,
        version: &str,
        rec: Record,
    ) {
        match p.set_boot_partition(slot) {
            Ok(()) => {
                self.emit(Event::BootSet {
                    sequence: seq,
                    slot: slot.kind,
                });
                self.timers = Timers::default();
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            Err(e @ (EspError::SmallSecVer | EspError::ValidateFailed)) => {
                self.give_up(
                    p,
                    rec,
                    seq,
                    version,
                    Check::BootPartition,
                    format!("esp_ota_set_boot_partition refused the image: {e}"),
                );
            }
            Err(e) => self.halt("esp_ota_set_boot_partition", e),
        }
    }

    fn give_up<P: Platform>(
        &mut self,
        p: &mut P,
        rec: Record,
        seq: u64,
        version: &str,
        check: Check,
        detail: String,
    ) {
        let idle = Record {
            phase: Phase::Idle,
            known_bad: rec.sha256,
            ..rec
        };
        if let Err(e) = self.store(p, idle) {
            return self.halt("writing the journal", e);
        }
        self.state = State::Ready;
        self.refuse(seq, version, check, detail);
    }

    /// Hash what is in the slot, as written, against the manifest.
    fn slot_matches<P: Platform>(&self, p: &mut P, slot: Slot, size: u32, sha: &[u8; 32]) -> bool {
        let mut h = Sha256::new();
        let mut buf = [0u8; 1024];
        let mut off = 0;
        while off < size {
            let n = core::cmp::min(buf.len() as u32, size - off) as usize;
            if p.slot_read(slot, off, &mut buf[..n]).is_err() {
                return false;
            }
            h.update(&buf[..n]);
            off += n as u32;
        }
        let got: [u8; 32] = h.finalize().into();
        &got == sha
    }

    // ---- helpers -----------------------------------------------------------------------

    fn record(&self) -> &Record {
        match &self.journal {
            Some(j) => j.record(),
            None => &Record::EMPTY,
        }
    }

    fn store<P: Platform>(&mut self, p: &mut P, rec: Record) -> Result<(), EspError> {
        match &mut self.journal {
            Some(j) => j.store(p, rec),
            None => Err(EspError::InvalidState),
        }
    }

    fn running_version(&self) -> String {
        self.running
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default()
    }

    fn ack(&mut self, sequence: u64, version: &str, outcome: Outcome) {
        self.out.push_back(Action::Ack(Ack {
            sequence,
            version: version.to_string(),
            outcome,
        }));
    }

    fn emit(&mut self, e: Event) {
        self.out.push_back(Action::Report(e));
    }

    fn halt(&mut self, during: &'static str, e: EspError) {
        self.timers = Timers::default();
        self.emit(Event::StorageError {
            during,
            error: e.to_string(),
        });
        self.state = State::Halted;
    }

    fn sync_wake(&mut self) {
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
