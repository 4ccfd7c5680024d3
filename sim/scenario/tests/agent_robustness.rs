//! The agent against arbitrary input sequences: valid and garbage manifests, announcements
//! and commands, image bytes at random offsets, early ends, failures and timers, in any order.
//! Whatever arrives, it never panics, never programs flash that is not erased, and never
//! switches the boot partition to anything but the image the signed manifest names.

use std::sync::Arc;

use otarig_agent::manifest::{DeltaRef, Manifest};
use otarig_agent::protocol::CommandKind;
use otarig_agent::{Action, Agent, Config, Event, Input, Platform, SlotKind};
use otarig_esp32s3::appimage::{self, AppSpec};
use otarig_esp32s3::board::{Board, BoardEvent, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;
use otarig_server::delta::control_record;
use otarig_server::keys::{fixture_dir, NamedKey};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Online,
    Offline,
    GoodManifest,
    GarbageManifest(Vec<u8>),
    Announcement(Vec<u8>),
    Command(Vec<u8>),
    /// Bytes of the real image at `offset` (`len`), possibly corrupted at one position.
    Body {
        offset: u32,
        len: u32,
        flip: Option<u32>,
    },
    /// Answer the agent's last range request (corrupting one byte if `flip`), then end it.
    Serve {
        flip: Option<u32>,
    },
    BodyEnd,
    FetchFailed,
    Timer(u64),
    SelfTest(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::Online),
        1 => Just(Step::Offline),
        3 => Just(Step::GoodManifest),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Step::GarbageManifest),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Step::Announcement),
        1 => prop_oneof![
            Just(br#"{"v":1,"id":"a","cmd":"report"}"#.to_vec()),
            Just(br#"{"v":1,"id":"b","cmd":"update-now"}"#.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
        .prop_map(Step::Command),
        8 => (0u32..40_000, 1u32..20_000, proptest::option::of(0u32..40_000))
            .prop_map(|(offset, len, flip)| Step::Body { offset, len, flip }),
        12 => proptest::option::weighted(0.1, 0u32..16_384).prop_map(|flip| Step::Serve { flip }),
        4 => Just(Step::BodyEnd),
        1 => Just(Step::FetchFailed),
        1 => (0u64..200_000).prop_map(Step::Timer),
        1 => any::<bool>().prop_map(Step::SelfTest),
    ]
}

const NOW: u64 = 1_767_225_600_000;

/// The signed release of `v2`, offering `deltas`.
fn release(v2: &[u8], deltas: Vec<DeltaRef>) -> Manifest {
    Manifest {
        format: 1,
        device_type: "robust".into(),
        channel: "stable".into(),
        version: "2.0.0".into(),
        secure_version: 0,
        sequence: 1,
        size: v2.len() as u32,
        sha256: hex::encode(otarig_server::store::sha256(v2)),
        url: None,
        cid: None,
        deltas,
        encryption: None,
        issued_at: NOW / 1000,
        expires_at: NOW / 1000 + 86_400,
    }
}

struct Rig {
    board: Board,
    agent: Agent,
    manifest: Vec<u8>,
    v2: Vec<u8>,
    v2_sha: [u8; 32],
    last_fetch: Option<(u32, u32)>,
    /// A delta patch the manifest offers (empty: none), and whether the last fetch asked for it.
    patch: Vec<u8>,
    fetching_patch: bool,
    now: u64,
    cfg: Config,
}

/// A signed manifest as a server answers a poll (no statements).
fn answer(manifest: &[u8]) -> Vec<u8> {
    otarig_agent::protocol::release_payload(manifest, None, None, None).unwrap()
}

impl Rig {
    fn new() -> Rig {
        Rig::configured(|_| {})
    }

    /// A rig whose agent configuration `tweak` changed.
    fn configured(tweak: impl FnOnce(&mut Config)) -> Rig {
        let table = Arc::new(PartitionTable::default_two_ota());
        let v1 = appimage::build(&AppSpec::new("robust", "1.0.0", 24 * 1024));
        let v2 = appimage::build(&AppSpec::new("robust", "2.0.0", 36 * 1024));
        let v2_sha = otarig_server::store::sha256(&v2);
        let mut board =
            Board::factory_flashed(table, BootConfig::default(), SlotKind::Factory, &v1, 0)
                .unwrap();
        assert!(matches!(board.boot(), BootOutcome::App(_)));
        let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
        let manifest = answer(&key.sign_manifest(&release(&v2, Vec::new())));
        let mut cfg = Config::new("robust-0", "robust", vec![key.trusted().unwrap()]);
        tweak(&mut cfg);
        let mut agent = Agent::new(cfg.clone());
        agent.handle(&mut board, NOW, Input::Boot);
        let mut rig = Rig {
            board,
            agent,
            manifest,
            v2,
            v2_sha,
            last_fetch: None,
            patch: Vec::new(),
            fetching_patch: false,
            now: NOW,
            cfg,
        };
        rig.drain();
        rig
    }

    fn feed(&mut self, input: Input<'_>) {
        self.agent.handle(&mut self.board, self.now, input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.agent.poll_action() {
            if let otarig_agent::Action::Fetch {
                offset,
                len,
                sha256,
                ..
            } = a
            {
                self.last_fetch = Some((offset, len));
                self.fetching_patch = sha256 == otarig_server::store::sha256(&self.patch);
            }
        }
    }

    fn step(&mut self, s: &Step) {
        self.now += 100;
        let mut data;
        match s {
            Step::Online => self.feed(Input::Online),
            Step::Offline => self.feed(Input::Offline),
            Step::GoodManifest => {
                let m = self.manifest.clone();
                self.feed(Input::Manifest(&m))
            }
            Step::GarbageManifest(b) => self.feed(Input::Manifest(b)),
            Step::Announcement(b) => self.feed(Input::Announcement(b)),
            Step::Command(b) => self.feed(Input::Command {
                payload: b,
                retained: false,
            }),
            Step::Body { offset, len, flip } => {
                let start = (*offset as usize).min(self.v2.len());
                let end = (start + *len as usize).min(self.v2.len());
                data = self.v2[start..end].to_vec();
                if let (Some(f), false) = (flip, data.is_empty()) {
                    let n = data.len();
                    data[*f as usize % n] ^= 0x10;
                }
                self.feed(Input::Body {
                    offset: start as u32,
                    data: &data,
                })
            }
            Step::Serve { flip } => {
                let Some((offset, len)) = self.last_fetch.take() else {
                    return;
                };
                let (start, end) = (offset as usize, (offset + len) as usize);
                let src = if self.fetching_patch {
                    &self.patch
                } else {
                    &self.v2
                };
                data = src[start.min(src.len())..end.min(src.len())].to_vec();
                if let (Some(f), false) = (flip, data.is_empty()) {
                    let n = data.len();
                    data[*f as usize % n] ^= 0x10;
                }
                self.feed(Input::Body {
                    offset,
                    data: &data,
                });
                // The agent may have dropped this response and asked for another (a patch
                // that failed falls back to the image): the old one's end is not the new one's.
                if self.last_fetch.is_none() {
                    self.feed(Input::BodyEnd);
                }
            }
            Step::BodyEnd => self.feed(Input::BodyEnd),
            Step::FetchFailed => self.feed(Input::FetchFailed { reason: "test" }),
            Step::Timer(dt) => {
                self.now += dt;
                self.feed(Input::Timer)
            }
            Step::SelfTest(p) => self.feed(Input::SelfTestDone {
                passed: *p,
                detail: "test",
            }),
        }
    }

    /// A rig whose agent took the good manifest and served every range it asked for.
    fn installed() -> Rig {
        Rig::install(Rig::new())
    }

    fn install(mut rig: Rig) -> Rig {
        rig.step(&Step::Online);
        rig.step(&Step::GoodManifest);
        for _ in 0..10 {
            rig.step(&Step::Serve { flip: None });
        }
        rig
    }

    /// Offer `patch` from the running image in the manifest, signed like the release.
    fn offer_patch(&mut self, patch: Vec<u8>) {
        let running = self.board.running_slot();
        let from = self
            .board
            .peek_image(running)
            .expect("a running image")
            .sha256;
        let delta = DeltaRef {
            from_sha256: hex::encode(from),
            sha256: hex::encode(otarig_server::store::sha256(&patch)),
            size: patch.len() as u32,
            url: None,
        };
        let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
        self.manifest = answer(&key.sign_manifest(&release(&self.v2, vec![delta])));
        self.patch = patch;
    }

    /// Reset the board and start a fresh agent on it, its clock reading `now`.
    fn restart_at(&mut self, now: u64) {
        self.board.take_events();
        assert!(matches!(self.board.boot(), BootOutcome::App(_)));
        self.agent = Agent::new(self.cfg.clone());
        self.now = now;
        self.feed(Input::Boot);
    }

    /// Check the board after the run; returns whether the boot partition was switched.
    fn verdict(mut self) -> Result<bool, String> {
        let events = self.board.take_events();
        if events
            .iter()
            .any(|e| matches!(e, BoardEvent::FlashViolation { .. }))
        {
            return Err(format!("flash violation: {events:?}"));
        }
        let switched = events
            .iter()
            .any(|e| matches!(e, BoardEvent::BootPartitionSet { .. }));
        if switched {
            let slot = self.board.next_update_slot().ok_or("no update slot")?;
            let info = self.board.peek_image(slot);
            if info.as_ref().is_none_or(|i| i.sha256 != self.v2_sha) {
                return Err(format!(
                    "switched to an image that is not the signed one: {info:?}"
                ));
            }
        }
        match self.board.boot() {
            BootOutcome::App(b) if b.info.version() == "1.0.0" || b.info.sha256 == self.v2_sha => {
                Ok(switched)
            }
            other => Err(format!(
                "board does not boot a known image after the sequence: {other:?}"
            )),
        }
    }
}

#[test]
fn the_harness_reaches_the_switch() {
    let rig = Rig::installed();
    assert_eq!(rig.verdict(), Ok(true));
}

/// An update is installed, and the board restarts with its clock back at 1970 (SNTP has not
/// run yet). The confirmation deadline is set on that clock; when SNTP sets it the clock jumps
/// 56 years: the deadline must move with it, not pass at once and roll the good image back.
#[test]
fn setting_the_clock_does_not_pass_the_confirmation_deadline() {
    let mut rig = Rig::installed();
    rig.restart_at(1_000);
    rig.feed(Input::SelfTestDone {
        passed: true,
        detail: "test",
    });
    rig.now = NOW + 2_000;
    rig.feed(Input::Timer);
    let events = rig.board.take_events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, BoardEvent::BootPartitionSet { .. })),
        "the clock jump rolled the new image back: {events:?}"
    );
    rig.feed(Input::Online);
    let running = rig.board.running_slot();
    assert_eq!(
        rig.board.slot_state(running),
        Ok(Some(otarig_agent::OtaImgState::Valid))
    );
    assert_eq!(
        rig.board.peek_image(running).map(|i| i.sha256),
        Some(rig.v2_sha)
    );
}

/// A signed patch whose header claims an old image larger than the slot, and whose seek
/// then reads past the slot's end: the read fails, and the agent falls back to the full image
/// (it halted before, and a halted agent updates no more).
#[test]
fn a_patch_that_reads_past_the_running_slot_falls_back_to_the_full_image() {
    let mut rig = Rig::new();
    let claimed_old = vec![0u8; 4 * 1024 * 1024];
    let mut raw = control_record(0, 0, 3 * 1024 * 1024).to_vec();
    raw.extend(control_record(16, 0, 0));
    raw.extend([0u8; 16]);
    let patch = otarig_server::delta::container(&claimed_old, &rig.v2.clone(), &raw);
    rig.offer_patch(patch);
    let rig = Rig::install(rig);
    assert_eq!(rig.verdict(), Ok(true));
}

/// Timers are set as `now` plus a configured interval: the largest intervals must not
/// overflow (a panic with overflow checks on) but mean "not in this board's lifetime".
#[test]
fn the_longest_intervals_do_not_overflow_the_timers() {
    let mut rig = Rig::install(Rig::configured(|c| {
        c.confirm_timeout_ms = u64::MAX;
        c.poll_interval_ms = u64::MAX;
        c.retry_base_ms = u64::MAX;
        c.retry_max_ms = u64::MAX;
    }));
    rig.restart_at(NOW + 1_000);
    rig.feed(Input::FetchFailed { reason: "test" });
    rig.now = u64::MAX - 1;
    rig.feed(Input::Timer);
    rig.feed(Input::Online);
    let running = rig.board.running_slot();
    assert_eq!(
        rig.board.slot_state(running),
        Ok(Some(otarig_agent::OtaImgState::PendingVerify)),
        "no self-test result came, and the confirmation deadline has not passed"
    );
}

/// A storage error halts updating; the agent must still obey `reboot` (it ignored every
/// input once halted, so only a power cycle could bring such a board back).
#[test]
fn a_halted_agent_still_reboots_on_command() {
    let mut rig = Rig::new();
    let m = rig.manifest.clone();
    rig.board.wear_out_agent_partition();
    let worn = &mut rig.board;
    rig.agent.handle(worn, NOW + 100, Input::Online);
    rig.agent.handle(worn, NOW + 200, Input::Manifest(&m));
    let mut actions = Vec::new();
    while let Some(a) = rig.agent.poll_action() {
        actions.push(a);
    }
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Report(otarig_agent::Event::StorageError { .. }))),
        "the journal write failed, so the agent halts: {actions:?}"
    );
    let reboot = signed_reboot("robust-0", NOW + 300);
    let cmd = Input::Command {
        payload: &reboot,
        retained: false,
    };
    rig.agent.handle(worn, NOW + 300, cmd);
    let after: Vec<Action> = std::iter::from_fn(|| rig.agent.poll_action()).collect();
    assert_eq!(after, vec![Action::Reboot]);
}

/// A `reboot` for `device`, sent at `at` by the operator key, valid for a minute.
fn signed_reboot(device: &str, at: u64) -> Vec<u8> {
    let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
    otarig_scenario::scenario::signed_command(&key, device, CommandKind::Reboot, (at, 1), 60_000)
}

/// What the agent did with one command payload: rebooted, or refused it by this check.
fn command_outcome(rig: &mut Rig, payload: &[u8], retained: bool) -> Result<(), String> {
    rig.agent.handle(
        &mut rig.board,
        rig.now,
        Input::Command { payload, retained },
    );
    let actions: Vec<Action> = std::iter::from_fn(|| rig.agent.poll_action()).collect();
    if actions.contains(&Action::Reboot) {
        return Ok(());
    }
    match actions.iter().find_map(|a| match a {
        Action::Report(Event::CommandRefused { check, .. }) => Some(check.name()),
        _ => None,
    }) {
        Some(check) => Err(check.to_string()),
        None => Err(format!("neither rebooted nor refused: {actions:?}")),
    }
}

/// Only an authentic command acts: signed by a trusted key, for this device, unexpired, never
/// seen before (also after a reboot: the last id is in the journal), not retained. Any client
/// of the broker could reboot any board before.
#[test]
fn only_authentic_commands_act() {
    let mut rig = Rig::new();
    let good = signed_reboot("robust-0", rig.now);
    let rogue = {
        let key = NamedKey::load(&fixture_dir(), "ed25519-rogue").unwrap();
        otarig_scenario::scenario::signed_command(
            &key,
            "robust-0",
            CommandKind::Reboot,
            (rig.now, 2),
            60_000,
        )
    };
    let forged = br#"{"v":1,"id":"x","cmd":"reboot"}"#;
    let elsewhere = signed_reboot("robust-1", rig.now + 1);
    let expired = signed_reboot("robust-0", rig.now - 120_000);
    assert_eq!(
        command_outcome(&mut rig, &rogue, false),
        Err("signature".into())
    );
    assert!(command_outcome(&mut rig, forged, false).is_err());
    assert_eq!(
        command_outcome(&mut rig, &elsewhere, false),
        Err("device".into())
    );
    assert_eq!(
        command_outcome(&mut rig, &expired, false),
        Err("expired".into())
    );
    assert_eq!(
        command_outcome(&mut rig, &good, true),
        Err("retained".into())
    );
    assert_eq!(command_outcome(&mut rig, &good, false), Ok(()));
    let now = rig.now + 5_000;
    rig.restart_at(now);
    assert_eq!(
        command_outcome(&mut rig, &good, false),
        Err("replayed".into())
    );
    let later = signed_reboot("robust-0", now);
    assert_eq!(command_outcome(&mut rig, &later, false), Ok(()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_inputs_never_corrupt_the_board(steps in proptest::collection::vec(step(), 1..120)) {
        let mut rig = Rig::new();
        for s in &steps {
            rig.step(s);
            if rig.agent.is_finished() {
                break;
            }
        }
        let verdict = rig.verdict();
        prop_assert!(verdict.is_ok(), "{:?}", verdict);
    }
}
