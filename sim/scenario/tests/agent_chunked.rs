//! The agent in chunked mode against the server's chunk service, in-process: a whole update,
//! and the rule that nothing but a chunk whose tag verifies is ever written to the slot.

use std::sync::Arc;

use otarig_agent::chunk::ChunkKey;
use otarig_agent::cipher::ImageKeys;
use otarig_agent::manifest::Manifest;
use otarig_agent::{Action, Agent, Check, Config, Event, FetchMode, Input, Platform, SlotKind};
use otarig_esp32s3::appimage::{self, AppSpec};
use otarig_esp32s3::board::{Board, BoardEvent, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;
use otarig_server::chunked::{ChunkFault, ChunkService};
use otarig_server::keys::{fixture_dir, NamedKey};

const NOW: u64 = 1_767_225_600_000;
const FLEET: &[u8] = b"fleet key of the chunked tests";
const DEV: &str = "chunky-0";

struct Rig {
    board: Board,
    agent: Agent,
    chunks: ChunkService,
    /// What the server holds: v2, or its ciphertext.
    v2: Vec<u8>,
    manifest: Vec<u8>,
    actions: Vec<Action>,
    events: Vec<Event>,
    now: u64,
}

impl Rig {
    fn new() -> Rig {
        Rig::serving(|_, _| None)
    }

    /// A rig whose release `serve` may encrypt (setting the manifest's `encryption` and the
    /// board's key, and changing the bytes the server holds).
    fn serving(serve: impl FnOnce(&mut Manifest, &mut Vec<u8>) -> Option<ImageKeys>) -> Rig {
        let table = Arc::new(PartitionTable::default_two_ota());
        let v1 = appimage::build(&AppSpec::new("chunky", "1.0.0", 20 * 1024));
        let v2 = appimage::build(&AppSpec::new("chunky", "2.0.0", 30 * 1024));
        let mut board =
            Board::factory_flashed(table, BootConfig::default(), SlotKind::Factory, &v1, 0)
                .expect("flash v1");
        assert!(matches!(board.boot(), BootOutcome::App(_)));
        let key = NamedKey::load(&fixture_dir(), "ed25519-test").expect("fixture key");
        let mut m = Manifest::draft("chunky", "stable", "2.0.0", 1, NOW / 1000, 86_400);
        m.size = v2.len() as u32;
        m.sha256 = hex::encode(otarig_server::store::sha256(&v2));
        let mut v2 = v2;
        let image_keys = serve(&mut m, &mut v2);
        let signed = key.sign_manifest(&m);
        let manifest = otarig_agent::protocol::release_payload(&signed, None, None, None)
            .expect("release payload");
        let mut cfg = Config::new(DEV, "chunky", vec![key.trusted().expect("trusted")]);
        cfg.fetch = FetchMode::Chunked(ChunkKey::derive(FLEET, DEV));
        cfg.image_keys = image_keys.unwrap_or_default();
        let chunks = ChunkService::default();
        chunks.enable(FLEET);
        let mut rig = Rig {
            board,
            agent: Agent::new(cfg),
            chunks,
            v2,
            manifest,
            actions: Vec::new(),
            events: Vec::new(),
            now: NOW,
        };
        rig.feed(Input::Boot);
        rig.feed(Input::SelfTestDone {
            passed: true,
            detail: "",
        });
        rig.feed(Input::Online);
        let m = rig.manifest.clone();
        rig.feed(Input::Manifest(&m));
        rig
    }

    fn feed(&mut self, input: Input<'_>) {
        self.agent.handle(&mut self.board, self.now, input);
        while let Some(a) = self.agent.poll_action() {
            match a {
                Action::Report(e) => self.events.push(e),
                a => self.actions.push(a),
            }
        }
    }

    /// The last open-session or chunk request, taken.
    fn request(&mut self) -> Option<Action> {
        let i = self
            .actions
            .iter()
            .rposition(|a| matches!(a, Action::OpenSession { .. } | Action::FetchChunk { .. }))?;
        let a = self.actions.remove(i);
        self.actions.clear();
        Some(a)
    }

    /// Answer the pending request as the server would, bent by `fault`; false when none.
    fn answer(&mut self, fault: Option<ChunkFault>) -> bool {
        match self.request() {
            Some(Action::OpenSession {
                sequence,
                sha256,
                from,
                ..
            }) => {
                let answer = self
                    .chunks
                    .open(DEV, sequence, sha256, self.v2.len() as u64, from)
                    .expect("open");
                self.feed(Input::Session(&answer));
            }
            Some(Action::FetchChunk { index, .. }) => {
                let frame = self
                    .chunks
                    .frame(DEV, index, &self.v2, fault)
                    .expect("frame");
                self.feed(Input::Chunk(&frame));
            }
            _ => return false,
        }
        true
    }

    fn written_pct(&self) -> Option<u8> {
        self.agent.telemetry().progress_pct
    }
}

#[test]
fn a_chunked_update_installs_through_the_chunk_service() {
    let mut rig = Rig::new();
    let mut requests = 0;
    while rig.answer(None) {
        requests += 1;
    }
    assert_eq!(
        requests,
        1 + rig.v2.len().div_ceil(1024),
        "a session and every chunk once"
    );
    assert!(rig
        .events
        .iter()
        .any(|e| matches!(e, Event::Verified { .. })));
    assert!(rig.actions.contains(&Action::Reboot), "{:?}", rig.events);
    let st = rig.chunks.status(DEV).expect("session status");
    assert_eq!(st.progress_pct, 100);
}

#[test]
fn plain_range_bytes_are_never_written_in_chunked_mode() {
    let mut rig = Rig::new();
    assert!(matches!(rig.request(), Some(Action::OpenSession { .. })));
    let image = rig.v2.clone();
    rig.feed(Input::Body {
        offset: 0,
        data: &image,
    });
    rig.feed(Input::BodyEnd);
    assert_eq!(rig.written_pct(), Some(0), "nothing written");
    assert!(!rig
        .events
        .iter()
        .any(|e| matches!(e, Event::Verified { .. })));
}

#[test]
fn a_refused_chunk_writes_nothing_and_the_retry_opens_a_new_session() {
    let mut rig = Rig::new();
    assert!(rig.answer(None), "session");
    assert!(rig.answer(None), "chunk 0");
    let after_one = rig.written_pct();
    let first = rig.chunks.status(DEV).expect("status").session;
    assert!(rig.answer(Some(ChunkFault::OtherDevice)));
    assert_eq!(
        rig.written_pct(),
        after_one,
        "the refused chunk was not written"
    );
    let refusal = rig.events.iter().find_map(|e| match e {
        Event::TransportRefused { check, detail, .. } => Some((*check, detail.clone())),
        _ => None,
    });
    let (check, detail) = refusal.expect("a refusal event");
    assert_eq!(check, Check::ChunkMac);
    assert!(detail.contains("chunk 1"), "{detail}");
    // After the backoff, a new session from where it was.
    rig.now += 120_000;
    rig.feed(Input::Timer);
    let reopened = rig.actions.iter().find_map(|a| match a {
        Action::OpenSession { from, .. } => Some(*from),
        _ => None,
    });
    let Some(from) = reopened else {
        panic!("expected a new session, got {:?}", rig.actions);
    };
    assert_eq!(from, 1);
    while rig.answer(None) {}
    assert_ne!(rig.chunks.status(DEV).expect("status").session, first);
    assert!(rig.actions.contains(&Action::Reboot));
}

/// A chunk that ends the download (here: esp_encrypted_img's header does not unwrap, found
/// once its 512 bytes are in) restarts it; the restart's first request must not be counted as
/// a request that ended early (it was: one spurious failure and a backoff per restart).
#[test]
fn a_chunk_that_restarts_the_download_is_not_also_a_failed_request() {
    let mut rig = Rig::serving(|m, served| {
        use rand::SeedableRng;
        let dir = otarig_server::keys::fixture_dir();
        let key = otarig_server::encrypt::ImageKey::load(&dir.join("rsa-3072-image.pem")).unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let enc = otarig_server::encrypt::encrypt(&key, served, &mut rng).unwrap();
        m.encryption = Some(enc.entry);
        *served = enc.ciphertext;
        served[100] ^= 0x40; // inside the RSA-wrapped key
        let rsa = otarig_server::encrypt::load_board_rsa(&dir.join("rsa-3072-image.pem")).unwrap();
        Some(ImageKeys::default().with_rsa(rsa))
    });
    let mut requests = 0;
    while rig.answer(None) {
        requests += 1;
        assert!(requests < 100, "no end: {:?}", rig.events);
    }
    let spurious: Vec<&Event> = rig
        .events
        .iter()
        .filter(
            |e| matches!(e, Event::FetchFailed { reason, .. } if reason.contains("ended early")),
        )
        .collect();
    assert!(spurious.is_empty(), "{spurious:?}");
    let refused = rig.events.iter().any(|e| {
        matches!(
            e,
            Event::Refused {
                check: Check::Decrypt,
                ..
            }
        )
    });
    assert!(refused, "{:?}", rig.events);
    // Three attempts, each a session and its first chunk.
    assert_eq!(requests, 6, "{:?}", rig.events);
}

/// A man in the middle who never stops: after ten refused requests in a row the board gives
/// the release up, and its refusal and ack name the chunk check, not `download`.
#[test]
fn a_board_that_only_gets_foreign_chunks_gives_up_naming_chunk_mac() {
    let mut rig = Rig::new();
    for _ in 0..200 {
        if !rig.answer(Some(ChunkFault::OtherDevice)) {
            rig.now += 120_000;
            rig.feed(Input::Timer);
            if !rig.answer(Some(ChunkFault::OtherDevice)) {
                break;
            }
        }
    }
    let refused = rig.events.iter().find_map(|e| match e {
        Event::Refused { check, detail, .. } => Some((*check, detail.clone())),
        _ => None,
    });
    let (check, detail) = refused.expect("the release given up");
    assert_eq!(check, Check::ChunkMac, "{detail}");
    assert!(
        detail.contains("10 consecutive requests failed"),
        "{detail}"
    );
    let acked = rig.actions.iter().any(|a| {
        matches!(a, Action::Ack(ack) if matches!(ack.outcome,
            otarig_agent::Outcome::Refused { check: Check::ChunkMac, .. }))
    });
    assert!(acked, "{:?}", rig.actions);
    assert_eq!(rig.written_pct(), None, "no longer downloading");
}

/// One step of an arbitrary exchange between the board and a server that may be an attacker.
#[derive(Clone, Debug)]
enum Step {
    /// Answer the pending request as the server would, or bent by a fault.
    Answer(Option<ChunkFault>),
    /// A genuine frame of some chunk, whatever was asked for.
    Chunk(u32),
    /// Any bytes as a chunk or a session answer.
    GarbageChunk(Vec<u8>),
    GarbageSession(Vec<u8>),
    /// Plain range bytes of the image (must be ignored).
    Body(u32),
    Failed,
    /// Time passes and the agent's timer fires.
    Timer,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let fault = prop_oneof![
        Just(ChunkFault::Reorder),
        Just(ChunkFault::OtherSession),
        Just(ChunkFault::OtherDevice)
    ];
    prop_oneof![
        12 => proptest::option::weighted(0.15, fault).prop_map(Step::Answer),
        1 => (0u32..40).prop_map(Step::Chunk),
        1 => proptest::collection::vec(any::<u8>(), 0..1200).prop_map(Step::GarbageChunk),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Step::GarbageSession),
        1 => (0u32..40).prop_map(Step::Body),
        1 => Just(Step::Failed),
        2 => Just(Step::Timer),
    ]
}

impl Rig {
    fn step(&mut self, s: &Step) {
        match s {
            Step::Answer(fault) => {
                self.answer(*fault);
            }
            Step::Chunk(n) => {
                if let Ok(frame) = self.chunks.frame(DEV, *n, &self.v2, None) {
                    self.feed(Input::Chunk(&frame));
                }
            }
            Step::GarbageChunk(b) => self.feed(Input::Chunk(b)),
            Step::GarbageSession(b) => self.feed(Input::Session(b)),
            Step::Body(n) => {
                let start = (*n as usize * 1024).min(self.v2.len());
                let data = self.v2[start..].to_vec();
                self.feed(Input::Body {
                    offset: start as u32,
                    data: &data,
                });
            }
            Step::Failed => self.feed(Input::FetchFailed { reason: "test" }),
            Step::Timer => {
                self.now += 120_000;
                self.feed(Input::Timer);
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Whatever the server or a man in the middle sends, in any order: no panic, no program
    /// over unerased flash, and the boot partition switches only to the signed image.
    #[test]
    fn arbitrary_answers_never_corrupt_the_board(steps in proptest::collection::vec(step(), 1..150)) {
        let mut rig = Rig::new();
        for s in &steps {
            rig.step(s);
            if rig.agent.is_finished() {
                break;
            }
        }
        let events = rig.board.take_events();
        let violation = events.iter().any(|e| matches!(e, BoardEvent::FlashViolation { .. }));
        proptest::prop_assert!(!violation, "{:?}", events);
        if events.iter().any(|e| matches!(e, BoardEvent::BootPartitionSet { .. })) {
            let slot = rig.board.next_update_slot().expect("an update slot");
            let sha = rig.board.peek_image(slot).map(|i| i.sha256);
            proptest::prop_assert_eq!(sha, Some(otarig_server::store::sha256(&rig.v2)));
        }
    }
}
