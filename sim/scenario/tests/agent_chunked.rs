//! The agent in chunked mode against the server's chunk service, in-process: a whole update,
//! and the rule that nothing but a chunk whose tag verifies is ever written to the slot.

use std::sync::Arc;

use otarig_agent::chunk::ChunkKey;
use otarig_agent::manifest::Manifest;
use otarig_agent::{Action, Agent, Check, Config, Event, FetchMode, Input, SlotKind};
use otarig_esp32s3::appimage::{self, AppSpec};
use otarig_esp32s3::board::{Board, BootConfig, BootOutcome};
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
    v2: Vec<u8>,
    manifest: Vec<u8>,
    actions: Vec<Action>,
    events: Vec<Event>,
    now: u64,
}

impl Rig {
    fn new() -> Rig {
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
        let signed = key.sign_manifest(&m);
        let manifest = otarig_agent::protocol::release_payload(&signed, None, None, None)
            .expect("release payload");
        let mut cfg = Config::new(DEV, "chunky", vec![key.trusted().expect("trusted")]);
        cfg.fetch = FetchMode::Chunked(ChunkKey::derive(FLEET, DEV));
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
