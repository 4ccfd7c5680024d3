//! Key sets, revocation lists and timestamps as the agent judges them, one rule per test: what
//! is adopted and persisted, and what is refused under which check.

use std::sync::Arc;

use otarig_agent::journal::Journal;
use otarig_agent::manifest::Manifest;
use otarig_agent::trust::RevocationsBody;
use otarig_agent::SlotKind;
use otarig_agent::{Action, Agent, Check, Config, Event, Input};
use otarig_esp32s3::appimage::{self, AppSpec};
use otarig_esp32s3::board::{Board, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;
use otarig_server::keys::{fixture_dir, NamedKey};
use otarig_server::statements::{self, Statements, TimestampSigner};

const NOW: u64 = 1_767_225_600_000;

fn key(id: &str) -> NamedKey {
    NamedKey::load(&fixture_dir(), id).unwrap()
}

/// One board with a fresh agent that trusts ed25519-test for releases and ed25519-root as
/// root, and a v2 image to offer.
struct Rig {
    board: Board,
    agent: Agent,
    cfg: Config,
    v2: Vec<u8>,
    now: u64,
}

impl Rig {
    fn new(tweak: impl FnOnce(&mut Config)) -> Rig {
        let table = Arc::new(PartitionTable::default_two_ota());
        let v1 = appimage::build(&AppSpec::new("trust", "1.0.0", 24 * 1024));
        let v2 = appimage::build(&AppSpec::new("trust", "2.0.0", 28 * 1024));
        let mut board =
            Board::factory_flashed(table, BootConfig::default(), SlotKind::Factory, &v1, 0)
                .unwrap();
        assert!(matches!(board.boot(), BootOutcome::App(_)));
        let mut cfg = Config::new(
            "trust-0",
            "trust",
            vec![key("ed25519-test").trusted().unwrap()],
        );
        cfg.root_keys = vec![key("ed25519-root").trusted().unwrap()];
        cfg.timestamp_keys = vec![key("ed25519-timestamp").trusted().unwrap()];
        tweak(&mut cfg);
        let mut rig = Rig {
            agent: Agent::new(cfg.clone()),
            board,
            cfg,
            v2,
            now: NOW,
        };
        rig.feed(Input::Boot);
        rig.feed(Input::Online);
        rig
    }

    /// A fresh agent on the same board (a reboot: RAM gone, journal kept).
    fn restart(&mut self) {
        self.agent = Agent::new(self.cfg.clone());
        self.feed(Input::Boot);
        self.feed(Input::Online);
    }

    fn feed(&mut self, input: Input<'_>) -> Vec<Action> {
        self.now += 100;
        self.agent.handle(&mut self.board, self.now, input);
        std::iter::from_fn(|| self.agent.poll_action()).collect()
    }

    /// v2's manifest with `sequence`, signed by `signer`.
    fn manifest(&self, signer: &str, sequence: u64) -> Vec<u8> {
        key(signer).sign_manifest(&Manifest {
            sequence,
            size: self.v2.len() as u32,
            sha256: hex::encode(otarig_server::store::sha256(&self.v2)),
            ..Manifest::draft("trust", "stable", "2.0.0", sequence, NOW / 1000, 86_400)
        })
    }

    fn highest_seq(&mut self) -> u64 {
        Journal::load(&mut self.board).unwrap().record().highest_seq
    }
}

fn key_set(version: u32, release: &str, base: Option<u64>) -> Vec<u8> {
    statements::key_set(
        &key("ed25519-root"),
        version,
        &[key(release)],
        &[key("ed25519-timestamp")],
        base,
    )
    .unwrap()
}

fn revocations(serial: u64, sequences: Vec<u64>) -> Vec<u8> {
    let body = RevocationsBody {
        device_type: "trust".into(),
        serial,
        sequences,
        images: Vec::new(),
    };
    statements::revocation_list(&key("ed25519-test"), &body).unwrap()
}

fn answer(manifest: &[u8], keys: Option<&[u8]>, revocations: Option<&[u8]>) -> Vec<u8> {
    Statements { keys, revocations }
        .announcement(manifest)
        .unwrap()
}

fn stamped(manifest: &[u8], revocations: Option<&[u8]>, issued_s: u64, for_s: u64) -> Vec<u8> {
    let signer = TimestampSigner {
        key: key("ed25519-timestamp"),
        valid_for_s: for_s,
    };
    Statements {
        keys: None,
        revocations,
    }
    .answer(manifest, Some(&signer), issued_s)
    .unwrap()
}

/// The checks of the refusals among `actions`.
fn refusals(actions: &[Action]) -> Vec<(Check, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(Event::Refused { check, detail, .. }) => Some((*check, detail.clone())),
            _ => None,
        })
        .collect()
}

fn started(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Report(Event::Downloading { .. })))
}

#[test]
fn a_key_set_is_adopted_persisted_and_never_rolled_back() {
    let mut rig = Rig::new(|_| {});
    let v2_new_key = rig.manifest("ed25519-release-2", 5);
    // Signed by a key the firmware never had: refused until a key set names it.
    let a = rig.feed(Input::Manifest(&answer(&v2_new_key, None, None)));
    assert_eq!(refusals(&a)[0].0, Check::Signature);
    let set2 = key_set(2, "ed25519-release-2", Some(3));
    let a = rig.feed(Input::Manifest(&answer(&v2_new_key, Some(&set2), None)));
    assert!(
        a.contains(&Action::Report(Event::KeysAdopted { version: 2 })),
        "{a:?}"
    );
    assert!(started(&a), "the new key's release installs: {a:?}");
    let rec = *Journal::load(&mut rig.board).unwrap().record();
    assert_eq!((rec.keys_version, rec.highest_seq), (2, 3));

    // After a reboot, the journal remembers v2: an answer without it, an older set, another
    // set under the same version, and the rotated-out key are all refused.
    rig.restart();
    let old_key = rig.manifest("ed25519-test", 6);
    let cases = [
        (
            answer(&old_key, None, None),
            Check::Keys,
            "carries no key set",
        ),
        (
            answer(&old_key, Some(&key_set(1, "ed25519-test", None)), None),
            Check::Keys,
            "older than v2",
        ),
        (
            answer(&old_key, Some(&key_set(2, "ed25519-test", None)), None),
            Check::Keys,
            "differs from the v2",
        ),
        (
            answer(&old_key, Some(&set2), None),
            Check::Signature,
            "ed25519-test",
        ),
    ];
    for (payload, check, text) in cases {
        rig.restart(); // a refusal is reported once per release and check in a boot
        let a = rig.feed(Input::Manifest(&payload));
        let r = refusals(&a);
        assert!(
            r.iter().any(|(c, d)| *c == check && d.contains(text)),
            "expected {check} ({text}), got {r:?}"
        );
        assert!(!started(&a));
    }
    // A key set signed by anything but a root key is refused, and changes nothing.
    rig.restart();
    let forged =
        statements::key_set(&key("ed25519-test"), 9, &[key("ed25519-test")], &[], None).unwrap();
    let a = rig.feed(Input::Manifest(&answer(&old_key, Some(&forged), None)));
    assert!(refusals(&a)
        .iter()
        .any(|(c, d)| *c == Check::Keys && d.contains("key set")));
    assert_eq!(
        Journal::load(&mut rig.board).unwrap().record().keys_version,
        2
    );
}

#[test]
fn a_key_set_with_a_sequence_base_undoes_a_fast_forward() {
    let mut rig = Rig::new(|_| {});
    // Install sequence 2^32 (what a compromised key can push), then adopt base 1.
    let ff = rig.manifest("ed25519-test", 1 << 32);
    let a = rig.feed(Input::Manifest(&answer(&ff, None, None)));
    assert!(started(&a));
    let mut j = Journal::load(&mut rig.board).unwrap();
    let rec = otarig_agent::journal::Record {
        highest_seq: 1 << 32,
        phase: otarig_agent::journal::Phase::Idle,
        ..*j.record()
    };
    j.store(&mut rig.board, rec).unwrap();
    rig.restart();
    let v2 = rig.manifest("ed25519-release-2", 2);
    let set = key_set(1, "ed25519-release-2", Some(1));
    let a = rig.feed(Input::Manifest(&answer(&v2, Some(&set), None)));
    assert!(started(&a), "sequence 2 installs above the new base: {a:?}");
    assert_eq!(rig.highest_seq(), 1);
}

#[test]
fn a_revoked_release_is_refused_and_an_older_list_after_an_install() {
    let mut rig = Rig::new(|_| {});
    let v2 = rig.manifest("ed25519-test", 4);
    let a = rig.feed(Input::Manifest(&answer(
        &v2,
        None,
        Some(&revocations(3, vec![4])),
    )));
    assert_eq!(refusals(&a)[0].0, Check::Revoked, "{a:?}");
    let serial = |rig: &mut Rig| {
        Journal::load(&mut rig.board)
            .unwrap()
            .record()
            .revocations_serial
    };
    assert_eq!(serial(&mut rig), 3, "kept as soon as seen");
    // A list that withdraws something else lets it install; its serial is kept.
    let a = rig.feed(Input::Manifest(&answer(
        &v2,
        None,
        Some(&revocations(5, vec![9])),
    )));
    assert!(started(&a), "{a:?}");
    assert_eq!(serial(&mut rig), 5);
    rig.restart();
    let v3 = rig.manifest("ed25519-test", 6);
    for (list, text) in [
        (Some(revocations(4, vec![])), "older than list 5"),
        (None, "carries no revocation list"),
    ] {
        rig.restart();
        let a = rig.feed(Input::Manifest(&answer(&v3, None, list.as_deref())));
        let r = refusals(&a);
        assert!(
            r.iter()
                .any(|(c, d)| *c == Check::Freshness && d.contains(text)),
            "{r:?}"
        );
    }
    // A key set replaces the keys that signed those lists: their serials no longer count.
    rig.restart();
    let v4 = rig.manifest("ed25519-release-2", 7);
    let set = key_set(1, "ed25519-release-2", None);
    let a = rig.feed(Input::Manifest(&answer(&v4, Some(&set), None)));
    assert!(started(&a), "{a:?}");
    assert_eq!(serial(&mut rig), 0);
}

#[test]
fn a_required_timestamp_must_be_fresh_and_name_the_manifest() {
    let mut rig = Rig::new(|c| c.require_timestamp = true);
    let now_s = NOW / 1000;
    let v2 = rig.manifest("ed25519-test", 4);
    let other = rig.manifest("ed25519-test", 5);
    let cases = [
        (answer(&v2, None, None), "no timestamp vouches"),
        (
            stamped(&v2, None, now_s - 700, 600),
            "the timestamp expired",
        ),
        (
            // The timestamp of another manifest, spliced in: a frozen or mixed answer.
            {
                let mut frozen: serde_json::Value =
                    serde_json::from_slice(&answer(&v2, None, None)).unwrap();
                let ts: serde_json::Value =
                    serde_json::from_slice(&stamped(&other, None, now_s, 600)).unwrap();
                frozen["timestamp"] = ts["timestamp"].clone();
                serde_json::to_vec(&frozen).unwrap()
            },
            "vouches for sequence 5",
        ),
    ];
    for (payload, text) in &cases {
        rig.restart();
        let a = rig.feed(Input::Manifest(payload));
        let r = refusals(&a);
        assert!(
            r.iter()
                .any(|(c, d)| *c == Check::Freshness && d.contains(text)),
            "expected freshness ({text}), got {r:?}"
        );
    }
    // An announcement without a timestamp makes the board poll instead of refusing.
    let a = rig.feed(Input::Announcement(&answer(&v2, None, None)));
    assert!(
        refusals(&a).is_empty() && a.contains(&Action::PollManifest),
        "{a:?}"
    );
    // A fresh timestamp that names the manifest and its list: installs, and is kept.
    let fresh = stamped(&v2, Some(&revocations(2, vec![])), now_s, 600);
    let a = rig.feed(Input::Manifest(&fresh));
    assert!(started(&a), "{a:?}");
    let rec = *Journal::load(&mut rig.board).unwrap().record();
    assert_eq!((rec.timestamp_at, rec.revocations_serial), (now_s, 2));
}
