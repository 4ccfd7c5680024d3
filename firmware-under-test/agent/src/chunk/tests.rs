use super::*;
use alloc::vec;

const DEV: &str = "otarig-0001";

fn key() -> ChunkKey {
    ChunkKey::derive(b"fleet pre-shared key", DEV)
}

fn session(size: u32) -> Session {
    Session {
        id: [7; SESSION_LEN],
        sequence: 3,
        size,
        next: 0,
    }
}

fn place(index: u32) -> Place<'static> {
    Place {
        device: DEV,
        session: [7; SESSION_LEN],
        sequence: 3,
        index,
    }
}

fn data(index: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32 ^ index) as u8).collect()
}

#[test]
fn keys_differ_per_device_and_per_fleet_and_are_stable() {
    let a = ChunkKey::derive(b"fleet", "a");
    assert_eq!(a, ChunkKey::derive(b"fleet", "a"));
    assert_ne!(a, ChunkKey::derive(b"fleet", "b"));
    assert_ne!(a, ChunkKey::derive(b"other fleet", "a"));
    // The server, the NVS writer and the board must agree on the derivation for good: this is
    // HKDF-SHA256(salt "otarig chunk key v1", ikm "fleet", info "a"), as Python's hmac
    // module computes it by RFC 5869's two steps.
    assert_eq!(
        a.to_hex(),
        "5677759da742620304708f836b81174890cecd6bfb9b3b4385952033ee02a92b"
    );
    assert_eq!(ChunkKey::from_hex(&a.to_hex()), Some(a));
    assert_eq!(ChunkKey::from_hex("abc"), None);
}

#[test]
fn the_padded_hmac_key_gives_the_mac_of_the_key_itself() {
    let k = key();
    let mut m = k.mac();
    m.update(b"message");
    let mut direct = <Hmac<Sha256> as Mac>::new_from_slice(&k.0).expect("any length");
    direct.update(b"message");
    assert_eq!(m.finalize().into_bytes(), direct.finalize().into_bytes());
}

#[test]
fn chunks_in_order_are_taken_and_the_last_is_short() {
    let mut s = session(2 * CHUNK_SIZE + 100);
    assert_eq!(s.chunks(), 3);
    for i in 0..3 {
        let d = data(i, s.len_of(i));
        let f = frame(&key(), &place(i), &d);
        assert_eq!(s.take(&key(), DEV, &f), Ok(&d[..]));
    }
    assert_eq!(s.next, 3);
    assert_eq!(s.len_of(2), 100);
}

#[test]
fn an_altered_byte_anywhere_fails_the_tag_or_the_frame() {
    let d = data(0, CHUNK_SIZE as usize);
    let f = frame(&key(), &place(0), &d);
    for at in 0..f.len() {
        let mut bad = f.clone();
        bad[at] ^= 0x01;
        let err = session(4096).take(&key(), DEV, &bad).unwrap_err();
        assert_eq!(err.check(), Check::ChunkMac, "byte {at}: {err}");
    }
}

#[test]
fn a_chunk_made_for_another_device_fails_the_tag() {
    let other = ChunkKey::derive(b"fleet pre-shared key", "otarig-0002");
    let d = data(0, CHUNK_SIZE as usize);
    let f = frame(
        &other,
        &Place {
            device: "otarig-0002",
            ..place(0)
        },
        &d,
    );
    assert_eq!(
        session(4096).take(&key(), DEV, &f),
        Err(ChunkError::Tag { index: 0 })
    );
    // Its own key, but relabelled for this board: still not a tag this board's key makes.
    let relabelled = frame(&other, &place(0), &d);
    assert_eq!(
        session(4096).take(&key(), DEV, &relabelled),
        Err(ChunkError::Tag { index: 0 })
    );
}

#[test]
fn genuine_chunks_out_of_place_fail_the_sequence() {
    let d = data(0, CHUNK_SIZE as usize);
    let other_session = frame(
        &key(),
        &Place {
            session: [8; SESSION_LEN],
            ..place(0)
        },
        &d,
    );
    let other_release = frame(
        &key(),
        &Place {
            sequence: 2,
            ..place(0)
        },
        &d,
    );
    let mut s = session(4096);
    assert_eq!(
        s.take(&key(), DEV, &other_session),
        Err(ChunkError::OtherSession { index: 0 })
    );
    assert_eq!(
        s.take(&key(), DEV, &other_release),
        Err(ChunkError::OtherRelease {
            index: 0,
            sequence: 2
        })
    );
    let second = frame(&key(), &place(1), &data(1, CHUNK_SIZE as usize));
    assert_eq!(
        s.take(&key(), DEV, &second),
        Err(ChunkError::OutOfOrder {
            expected: 0,
            got: 1
        })
    );
    let first = frame(&key(), &place(0), &d);
    assert!(s.take(&key(), DEV, &first).is_ok());
    // The same chunk again: a duplicate.
    let err = s.take(&key(), DEV, &first).unwrap_err();
    assert_eq!(err.check(), Check::ChunkSequence);
    // A short chunk 1 with a valid tag: re-sized by whoever holds the key.
    let short = frame(&key(), &place(1), &data(1, 1000));
    assert_eq!(
        s.take(&key(), DEV, &short),
        Err(ChunkError::Size {
            index: 1,
            len: 1000,
            expected: 1024
        })
    );
    // Past the end.
    let past = frame(&key(), &place(4), &data(4, 10));
    let mut at_end = Session {
        next: 4,
        ..session(4096)
    };
    assert!(matches!(
        at_end.take(&key(), DEV, &past),
        Err(ChunkError::Size { expected: 0, .. })
    ));
}

#[test]
fn frames_of_any_length_never_panic() {
    let mut s = session(4096);
    for len in 0..MAX_FRAME + 4 {
        let bytes = vec![0x4F; len];
        assert!(s.take(&key(), DEV, &bytes).is_err());
    }
}

#[test]
fn a_session_answer_must_be_for_the_release_asked_for() {
    let answer = |seq: u64, size: u32, chunks: u32| {
        serde_json::to_vec(&SessionAnswer {
            v: 1,
            session: hex::encode([9u8; 16]),
            sequence: seq,
            size,
            chunk_size: CHUNK_SIZE,
            chunks,
        })
        .unwrap()
    };
    let s = open_session(&answer(3, 5000, 5), 3, 5000, 2).expect("good answer");
    assert_eq!((s.id, s.next, s.chunks()), ([9; 16], 2, 5));
    assert!(open_session(&answer(2, 5000, 5), 3, 5000, 0).is_err());
    assert!(open_session(&answer(3, 4000, 4), 3, 5000, 0).is_err());
    assert!(open_session(&answer(3, 5000, 6), 3, 5000, 0).is_err());
    assert!(open_session(&answer(3, 5000, 5), 3, 5000, 5).is_err());
    assert!(open_session(b"{}", 3, 5000, 0).is_err());
}
