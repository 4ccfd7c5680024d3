use super::*;
use otarig_agent::chunk::{open_session, ChunkError};
use otarig_agent::Check;

const FLEET: &[u8] = b"fleet key for tests";

fn service() -> ChunkService {
    let s = ChunkService::default();
    s.enable(FLEET);
    s
}

fn blob() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 13 % 251) as u8).collect()
}

/// Opens a session for `dev` and returns the board's side of it.
fn open(s: &ChunkService, dev: &str) -> otarig_agent::chunk::Session {
    let answer = s.open(dev, 4, [1; 32], 5000, 0).expect("open");
    open_session(&answer, 4, 5000, 0).expect("the board reads the answer")
}

#[test]
fn a_board_takes_every_chunk_of_its_session_in_order() {
    let s = service();
    let mut board = open(&s, "d1");
    let key = ChunkKey::derive(FLEET, "d1");
    let blob = blob();
    let mut got = Vec::new();
    for n in 0..board.chunks() {
        let lookup = s.lookup("d1", &hex::encode(board.id)).expect("lookup");
        assert_eq!((lookup.sha256, lookup.chunks), ([1; 32], 5));
        let frame = s.frame("d1", n, &blob, None).expect("frame");
        got.extend_from_slice(board.take(&key, "d1", &frame).expect("genuine chunk"));
    }
    assert_eq!(got, blob);
    let st = s.status("d1").expect("status");
    assert_eq!((st.reached, st.progress_pct, st.frames), (5, 100, 5));
    s.verified("d1", 4).expect("verify");
    assert_eq!(s.status("d1").map(|s| s.stage), Some(Stage::Verified));
    s.completed("d1", 4, "installed").expect("complete");
    assert_eq!(
        s.status("d1").map(|s| s.stage),
        Some(Stage::Complete {
            outcome: "installed".into()
        })
    );
    assert!(s.verified("d1", 3).is_err(), "another release's verify");
}

#[test]
fn each_fault_is_refused_by_the_board_with_its_check() {
    let s = service();
    let key = ChunkKey::derive(FLEET, "d1");
    let blob = blob();
    let cases = [
        (ChunkFault::Reorder, Check::ChunkSequence),
        (ChunkFault::OtherSession, Check::ChunkSequence),
        (ChunkFault::OtherDevice, Check::ChunkMac),
    ];
    for (fault, check) in cases {
        let mut board = open(&s, "d1");
        let frame = s.frame("d1", 0, &blob, Some(fault)).expect("frame");
        let err = board.take(&key, "d1", &frame).unwrap_err();
        assert_eq!(err.check(), check, "{fault:?}: {err}");
    }
    // With an earlier session on record, the replayed chunk is that session's, verbatim.
    let mut board = open(&s, "d1");
    let frame = s
        .frame("d1", 0, &blob, Some(ChunkFault::OtherSession))
        .unwrap();
    assert_eq!(
        board.take(&key, "d1", &frame),
        Err(ChunkError::OtherSession { index: 0 })
    );
}

#[test]
fn a_replaced_session_and_a_stranger_are_not_found() {
    let s = service();
    let first = open(&s, "d1");
    let second = open(&s, "d1");
    assert_ne!(first.id, second.id, "a new session id each time");
    assert!(matches!(
        s.lookup("d1", &hex::encode(first.id)),
        Err(ChunkServiceError::NoSession { .. })
    ));
    assert!(s.lookup("d1", &hex::encode(second.id)).is_ok());
    assert!(s.lookup("d2", &hex::encode(second.id)).is_err());
    assert!(s.frame("d2", 0, &blob(), None).is_err());
}

#[test]
fn bounds_are_refused_with_what_to_do() {
    let off = ChunkService::default();
    assert_eq!(
        off.open("d1", 1, [0; 32], 10, 0),
        Err(ChunkServiceError::Disabled)
    );
    assert!(ChunkServiceError::Disabled
        .to_string()
        .contains("--chunk-psk"));
    let s = service();
    assert!(matches!(
        s.open("d1", 1, [0; 32], 5000, 5),
        Err(ChunkServiceError::PastEnd {
            index: 5,
            chunks: 5
        })
    ));
    assert!(s.open("", 1, [0; 32], 10, 0).is_err());
    assert!(s.open(&"x".repeat(129), 1, [0; 32], 10, 0).is_err());
    assert!(s.open("d1", 1, [0; 32], 1 << 33, 0).is_err());
    open(&s, "d1");
    assert!(matches!(
        s.frame("d1", 5, &blob(), None),
        Err(ChunkServiceError::PastEnd { .. })
    ));
    assert!(
        s.frame("d1", 0, &blob()[..10], None).is_err(),
        "not the session's blob"
    );
}

#[test]
fn session_ids_are_the_same_in_every_replay_and_differ_per_fleet_key() {
    let a = service();
    let b = service();
    assert_eq!(open(&a, "d1").id, open(&b, "d1").id);
    let c = ChunkService::default();
    c.enable(b"another fleet");
    assert_ne!(open(&a, "d9").id, open(&c, "d9").id);
}

#[test]
fn fleet_key_files_are_checked_and_say_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.psk");
    let made = generate_fleet_key(&mut rand::rngs::OsRng);
    std::fs::write(&path, format!("{made}\n")).unwrap();
    assert_eq!(hex::encode(load_fleet_key(&path).unwrap()), made);
    for bad in [
        "",
        "abcd",
        "zz".repeat(32).as_str(),
        "ab".repeat(65).as_str(),
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = load_fleet_key(&path).unwrap_err().to_string();
        assert!(e.contains("keys gen NAME --alg psk"), "{bad}: {e}");
    }
    // A huge file is read up to 1 KiB only, and refused.
    std::fs::write(&path, "ab".repeat(1 << 20)).unwrap();
    assert!(load_fleet_key(&path).is_err());
    let e = load_fleet_key(&dir.path().join("missing.psk")).unwrap_err();
    assert!(format!("{e:#}").contains("missing.psk"), "{e:#}");
}
