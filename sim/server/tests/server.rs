//! The firmware server over real loopback sockets: manifests, blobs with Range/ETag/If-Match,
//! acks, and the release log's tamper evidence.

use std::sync::Arc;

use otarig_agent::manifest::{self, Manifest};
use otarig_esp32s3::appimage::{build, AppSpec};
use otarig_server::keys::{fixture_dir, NamedKey};
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{Limits, Server};
use reqwest::header;
use reqwest::StatusCode;

/// `GET url` with `headers`.
async fn get(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    headers: &[(header::HeaderName, &str)],
) -> reqwest::Response {
    let mut req = http.get(url);
    for (name, value) in headers {
        req = req.header(name, *value);
    }
    req.send().await.unwrap()
}

/// `POST url` with `body`.
async fn post(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    http.post(url).body(body).send().await.unwrap()
}

fn manifest(version: &str, sequence: u64) -> Manifest {
    Manifest::draft(
        "srv-board",
        "stable",
        version,
        sequence,
        1_767_225_600,
        86_400,
    )
}

/// A server over a store holding v1 (sequence 1) and v2 (sequence 2, with a patch from v1),
/// both for `srv-board` on `stable`.
struct Served {
    /// The store's files: dropping it deletes them (bind it for the whole test).
    dir: tempfile::TempDir,
    server: Server,
    http: reqwest::Client,
    base: String,
    key: NamedKey,
    v2: Vec<u8>,
}

impl Served {
    async fn start() -> Served {
        Served::start_with(Limits::default()).await
    }

    async fn start_with(limits: Limits) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ReleaseStore::open(dir.path()).unwrap());
        let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
        let v1 = build(&AppSpec::new("srv", "1.0.0", 40_000));
        let v2 = build(&AppSpec::new("srv", "2.0.0", 50_000));
        store
            .publish(&key, manifest("1.0.0", 1), &v1, &[], 1)
            .unwrap();
        store
            .publish(
                &key,
                manifest("2.0.0", 2),
                &v2,
                std::slice::from_ref(&v1),
                2,
            )
            .unwrap();
        let server = Server::start_with(store, "127.0.0.1:0".parse().unwrap(), limits)
            .await
            .unwrap();
        let base = server.url();
        Served {
            dir,
            server,
            http: reqwest::Client::new(),
            base,
            key,
            v2,
        }
    }

    /// v2's blob URL and its ETag.
    async fn blob(&self) -> (String, String) {
        let url = format!(
            "{}/blobs/{}",
            self.base,
            hex::encode(otarig_server::store::sha256(&self.v2))
        );
        let r = get(&self.http, &url, &[]).await;
        let etag = r
            .headers()
            .get(header::ETAG)
            .expect("an ETag")
            .to_str()
            .unwrap()
            .to_string();
        (url, etag)
    }
}

#[tokio::test]
async fn the_latest_manifest_is_signed_and_offers_a_patch() {
    let Served {
        dir: _dir,
        server,
        http,
        base,
        key,
        v2,
        ..
    } = Served::start().await;
    // The latest manifest verifies with the trusted key and offers a patch from v1.
    let r = http
        .get(format!("{base}/firmware/latest?deviceType=srv-board"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer = otarig_agent::protocol::parse_release(&r.bytes().await.unwrap()).unwrap();
    let m = manifest::open_parsed(&answer.signed, &[key.trusted().unwrap()]).unwrap();
    assert!(
        answer.keys.is_none() && answer.revocations.is_none() && answer.timestamp.is_none(),
        "a store without statements and a server without a timestamp key add none"
    );
    assert_eq!(
        (m.version.as_str(), m.sequence, m.size as usize),
        ("2.0.0", 2, v2.len())
    );
    assert_eq!(m.deltas.len(), 1);
    let r = http
        .get(format!("{base}/firmware/latest?deviceType=other-board"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .get(format!("{base}/firmware/latest?deviceType=../../etc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http
        .get(format!("{base}/firmware/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("deviceType"));

    server.shutdown().await;
}

#[tokio::test]
async fn blob_ranges_carry_a_strong_etag_and_if_match_refuses_another_blob() {
    let Served {
        dir: _dir,
        server,
        http,
        base,
        v2,
        ..
    } = Served::start().await;
    let m_sha256 = hex::encode(otarig_server::store::sha256(&v2));
    // A range of the blob, with a strong ETag; a resume with If-Match on that ETag works, with
    // another ETag it is refused rather than mixing blobs.
    let url = format!("{base}/blobs/{m_sha256}");
    let r = get(&http, &url, &[(header::RANGE, "bytes=1000-1999")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let etag_value = r.headers().get(header::ETAG).cloned().expect("an ETag");
    let etag = etag_value.to_str().unwrap();
    assert!(!etag.starts_with("W/"), "the ETag is strong");
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[1000..2000]);
    let r = get(
        &http,
        &url,
        &[(header::RANGE, "bytes=2000-"), (header::IF_MATCH, etag)],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[2000..]);
    let r = get(&http, &url, &[(header::IF_MATCH, "\"some-other-blob\"")]).await;
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert!(
        r.text().await.unwrap().contains("from byte 0"),
        "412 says what to do"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn if_range_resumes_the_same_blob_and_restarts_a_changed_one() {
    let s = Served::start().await;
    let (url, etag) = s.blob().await;
    let (http, v2, etag) = (&s.http, &s.v2, etag.as_str());
    // If-Range: the same blob resumes; a changed one gets all of it again, from byte 0.
    let r = get(
        http,
        &url,
        &[(header::RANGE, "bytes=2000-"), (header::IF_RANGE, etag)],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[2000..]);
    let r = get(
        http,
        &url,
        &[
            (header::RANGE, "bytes=2000-"),
            (header::IF_RANGE, "\"an-older-blob\""),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[..]);
    s.server.shutdown().await;
}

#[tokio::test]
async fn suffix_ranges_and_ranges_past_the_end() {
    let s = Served::start().await;
    let (url, _) = s.blob().await;
    let (http, v2) = (&s.http, &s.v2);
    // The last 100 bytes; a range past the end is refused with the blob's length.
    let r = get(http, &url, &[(header::RANGE, "bytes=-100")]).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers().get(header::CONTENT_RANGE).unwrap(),
        &format!("bytes {}-{}/{}", v2.len() - 100, v2.len() - 1, v2.len())
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[v2.len() - 100..]);
    let r = get(
        http,
        &url,
        &[(header::RANGE, &format!("bytes={}-", v2.len()))],
    )
    .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.headers().get(header::CONTENT_RANGE).unwrap(),
        &format!("bytes */{}", v2.len())
    );
    s.server.shutdown().await;
}

#[tokio::test]
async fn an_invalid_range_is_ignored_and_if_none_match_says_not_modified() {
    let s = Served::start().await;
    let (url, etag) = s.blob().await;
    let (http, v2, base, etag) = (&s.http, &s.v2, &s.base, etag.as_str());
    // An invalid range (last before first) is ignored: the whole blob.
    let r = get(http, &url, &[(header::RANGE, "bytes=5-3")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), v2.len());
    let r = get(http, &url, &[(header::IF_NONE_MATCH, etag)]).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = http
        .get(format!("{base}/blobs/{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    s.server.shutdown().await;
}

#[tokio::test]
async fn blobs_by_ipfs_cid() {
    let s = Served::start().await;
    let (_, etag) = s.blob().await;
    let (http, v2, base) = (&s.http, &s.v2, &s.base);
    // The same blob by its IPFS CID: same bytes, same ETag, Range works; unknown or malformed
    // CIDs say so.
    let cid = otarig_server::cid::cid_v1(v2);
    assert!(
        cid.starts_with("bafkrei"),
        "a one-chunk image is a raw leaf: {cid}"
    );
    let r = get(
        http,
        format!("{base}/ipfs/{cid}"),
        &[(header::RANGE, "bytes=1000-1999")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers().get(header::ETAG).unwrap(), etag.as_str());
    assert_eq!(&r.bytes().await.unwrap()[..], &v2[1000..2000]);
    let r = http
        .get(format!(
            "{base}/ipfs/{}",
            otarig_server::cid::cid_v1(b"not released")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .get(format!("{base}/ipfs/not-a-cid"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("not a CID"));

    s.server.shutdown().await;
}

#[tokio::test]
async fn acks_are_recorded_and_malformed_ones_explained() {
    let Served {
        dir,
        server,
        http,
        base,
        ..
    } = Served::start().await;
    // Acks: a good one is recorded, a malformed one says what is wrong.
    let ok = r#"{"v":1,"device":"d-1","sequence":2,"version":"2.0.0","outcome":"installed","detail":""}"#;
    let r = http
        .post(format!("{base}/ack"))
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = http
        .post(format!("{base}/ack"))
        .body(r#"{"v":1,"device":"d-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("missing field"));
    let r = http
        .post(format!("{base}/ack"))
        .body(r#"{"v":1,"device":"d","sequence":2,"version":"x","outcome":"exploded","detail":""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let acks = std::fs::read_to_string(dir.path().join("acks.jsonl")).unwrap();
    assert_eq!(acks.lines().count(), 1);
    server.shutdown().await;
}

#[test]
fn the_release_log_is_signed_chained_and_tamper_evident() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReleaseStore::open(dir.path()).unwrap();
    let key = NamedKey::load(&fixture_dir(), "rsa-test").unwrap();
    let trusted = [key.trusted().unwrap()];
    let img = |v: &str| build(&AppSpec::new("log", v, 8_000));
    for (i, v) in ["1.0.0", "1.1.0", "1.2.0"].iter().enumerate() {
        store
            .publish(&key, manifest(v, i as u64 + 1), &img(v), &[], 10 + i as u64)
            .unwrap();
    }
    let entries = store.verify_log(&trusted).unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| e.version.as_str())
            .collect::<Vec<_>>(),
        ["1.0.0", "1.1.0", "1.2.0"]
    );
    // A replayed sequence number is refused at publication.
    let err = store
        .publish(&key, manifest("0.9.0", 2), &img("0.9.0"), &[], 20)
        .unwrap_err();
    assert!(err.to_string().contains("not above 3"), "{err}");
    // Removing a line breaks the chain, and the error says where.
    let log = dir.path().join("releases.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let without_second: String = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    std::fs::write(&log, without_second).unwrap();
    let err = store.verify_log(&trusted).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    // A log signed by someone else does not verify against our key.
    std::fs::write(&log, text).unwrap();
    let rogue = NamedKey::load(&fixture_dir(), "ed25519-rogue")
        .unwrap()
        .trusted()
        .unwrap();
    assert!(store.verify_log(&[rogue]).is_err());
}

/// Any client may name any `deviceId`: the server counted served bytes under every one it
/// was ever given (+24 MB from 400 requests). Now it keeps at most `tracked_devices` of them,
/// none longer than 128 bytes, and still serves everyone.
#[tokio::test]
async fn unknown_device_ids_do_not_grow_the_server() {
    let served = Served::start_with(Limits {
        tracked_devices: 10,
        ..Limits::default()
    })
    .await;
    let (url, _) = served.blob().await;
    let long = "x".repeat(60_000);
    for id in (0..40).map(|i| format!("stranger-{i}")).chain([long]) {
        let r = get(
            &served.http,
            format!("{url}?deviceId={id}"),
            &[(header::RANGE, "bytes=0-15")],
        )
        .await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    }
    assert_eq!(served.server.faults.tracked(), 10);
    served.server.shutdown().await;
}

/// acks.jsonl had no quota: any client could fill the disk. Past its quota an ack is refused
/// with 507 and a message saying what to do, and the file stays within it.
#[tokio::test]
async fn ack_storage_has_a_quota() {
    let Served {
        dir,
        server,
        http,
        base,
        ..
    } = Served::start_with(Limits {
        ack_log_bytes: 1_000,
        ..Limits::default()
    })
    .await;
    let ack = r#"{"v":1,"device":"d-1","sequence":2,"version":"2.0.0","outcome":"installed","detail":""}"#;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = http
            .post(format!("{base}/ack"))
            .body(ack)
            .send()
            .await
            .unwrap();
        statuses.push(r.status());
        if r.status() == StatusCode::INSUFFICIENT_STORAGE {
            assert!(r.text().await.unwrap().contains("rotate"));
        }
    }
    assert!(statuses.contains(&StatusCode::NO_CONTENT));
    assert_eq!(statuses.last(), Some(&StatusCode::INSUFFICIENT_STORAGE));
    let len = std::fs::metadata(dir.path().join("acks.jsonl"))
        .unwrap()
        .len();
    assert!(len <= 1_000, "acks.jsonl is {len} bytes");
    server.shutdown().await;
}

/// A client that opens a connection and sends nothing (or trickles a request head) held a
/// descriptor forever: 300 of them starved `/healthz` under a 256-descriptor limit. The header
/// timeout now closes both, and the server answers others meanwhile.
#[tokio::test]
async fn silent_and_trickling_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start_with(Limits {
        header_read: std::time::Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let addr = served.server.addr;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let slow = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            .iter()
            .cycle()
            .take(60)
        {
            if trickle.write_all(&[*b]).await.is_err() {
                return true; // cut off
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut buf = [0u8; 64];
        matches!(trickle.read(&mut buf).await, Ok(0) | Err(_))
    });
    let r = get(&served.http, format!("{}/healthz", served.base), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed within the header timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(slow.await.unwrap(), "the trickling client was cut off");
    served.server.shutdown().await;
}

/// As documented: dropping the handle does not stop the server (only `shutdown` does). The
/// accept loop stopped when the handle's stop channel closed with it.
#[tokio::test]
async fn dropping_the_handle_keeps_the_server_up() {
    let Served {
        dir: _dir,
        server,
        http,
        base,
        ..
    } = Served::start().await;
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = get(&http, format!("{base}/healthz"), &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// With a key set and a revocation list in the store and a timestamp key, every answer carries
/// both statements and a timestamp signed now that names the manifest and the list; a frozen
/// offer is served word for word.
#[tokio::test]
async fn answers_carry_the_statements_and_a_fresh_timestamp() {
    use otarig_agent::trust;
    let Served {
        dir,
        server,
        http,
        base,
        key,
        ..
    } = Served::start().await;
    let store = ReleaseStore::open(dir.path()).unwrap();
    let root = NamedKey::load(&fixture_dir(), "ed25519-root").unwrap();
    let stamper = NamedKey::load(&fixture_dir(), "ed25519-timestamp").unwrap();
    let keys = otarig_server::statements::key_set(
        &root,
        1,
        std::slice::from_ref(&key),
        std::slice::from_ref(&stamper),
        None,
    )
    .unwrap();
    store.set_keys(&keys).unwrap();
    let older = otarig_server::statements::key_set(&root, 1, std::slice::from_ref(&key), &[], None)
        .unwrap();
    let e = store.set_keys(&older).unwrap_err().to_string();
    assert!(e.contains("not above v1"), "{e}");
    let list = trust::RevocationsBody {
        device_type: "srv-board".into(),
        serial: 4,
        sequences: vec![1],
        images: Vec::new(),
    };
    let revocations = otarig_server::statements::revocation_list(&key, &list).unwrap();
    store.set_revocations("srv-board", &revocations).unwrap();
    server.timestamps.sign_with(
        otarig_server::statements::TimestampSigner {
            key: stamper.clone(),
            valid_for_s: 300,
        },
        Some(Arc::new(|| 1_800_000_000)),
    );
    let latest = format!("{base}/firmware/latest?deviceType=srv-board&deviceId=d0");
    let fetch = || async { http.get(&latest).send().await.unwrap() };
    let body = fetch().await.bytes().await.unwrap();
    let answer = otarig_agent::protocol::parse_release(&body).unwrap();
    let ks = trust::open_keyset(answer.keys.as_ref().unwrap(), &[root.trusted().unwrap()]).unwrap();
    assert_eq!(ks.version, 1);
    let m = manifest::open_parsed(&answer.signed, &ks.release).unwrap();
    let got = trust::open_revocations(answer.revocations.as_ref().unwrap(), &ks.release).unwrap();
    assert_eq!(got, list);
    let ts = trust::open_timestamp(answer.timestamp.as_ref().unwrap(), &ks.timestamp).unwrap();
    assert_eq!(
        (
            ts.sequence,
            ts.sha256.as_str(),
            ts.revocations,
            ts.issued_at,
            ts.expires_at
        ),
        (
            m.sequence,
            m.sha256.as_str(),
            4,
            1_800_000_000,
            1_800_000_300
        )
    );
    // A frozen mirror answers with what it answered then, whatever the store holds now.
    server.offers.freeze("d0", Some(body.to_vec()));
    store.set_revocations("srv-board", b"{}").unwrap();
    assert_eq!(fetch().await.bytes().await.unwrap(), body);
    server.offers.freeze("d0", None);
    let r = fetch().await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// One connection that makes requests faster than the limit gets 429 with Retry-After; a
/// new connection is served (the limit is per connection, not global).
#[tokio::test]
async fn a_connection_past_its_request_rate_gets_429() {
    let served = Served::start_with(Limits {
        requests_per_second: 5,
        ..Limits::default()
    })
    .await;
    let url = format!("{}/healthz", served.base);
    let mut limited = None;
    for _ in 0..40 {
        let r = served.http.get(&url).send().await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("40 requests in a row on one connection were never limited");
    assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
    let fresh = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(
        fresh.status(),
        StatusCode::OK,
        "another connection is not limited"
    );
}

#[test]
fn an_encrypted_release_stores_only_its_ciphertext_and_refuses_patches() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReleaseStore::open(dir.path()).unwrap();
    let key = NamedKey::load(&fixture_dir(), "ed25519-test").unwrap();
    let image_key =
        otarig_server::encrypt::ImageKey::load(&fixture_dir().join("aes-256-image.hex")).unwrap();
    let v1 = build(&AppSpec::new("srv", "1.0.0", 40_000));
    let v2 = build(&AppSpec::new("srv", "2.0.0", 50_000));
    let err = store
        .publish_with(
            &key,
            manifest("1.0.0", 1),
            &v1,
            std::slice::from_ref(&v2),
            Some(&image_key),
            1,
        )
        .unwrap_err();
    assert!(err.to_string().contains("no delta patches"), "{err}");
    let entry = store
        .publish_with(&key, manifest("2.0.0", 2), &v2, &[], Some(&image_key), 2)
        .unwrap();
    let plain = otarig_server::store::sha256(&v2);
    assert_eq!(entry.image_sha256, hex::encode(plain));
    assert!(
        store.blob(&plain).unwrap().is_none(),
        "the plaintext is not in the store"
    );
    let signed = std::fs::read(dir.path().join("manifests/srv-board/stable.json")).unwrap();
    let m = otarig_agent::manifest::open(&signed, &[key.trusted().unwrap()]).unwrap();
    let enc = m
        .encryption
        .expect("the manifest says how the image is encrypted");
    assert_eq!(enc.key_id, image_key.key_id());
    assert_eq!(enc.size as usize, (v2.len() / 16 + 1) * 16);
    let blob = otarig_agent::cipher::blob_sha256(&enc).unwrap();
    let stored = store
        .blob(&blob)
        .unwrap()
        .expect("the ciphertext is stored");
    assert_ne!(&stored.bytes[1000..1100], &v2[1000..1100]);
    // The log names what the store holds, so an IPFS fetch by the logged CID finds it.
    assert_eq!(entry.image_cid, otarig_server::cid::cid_v1(&stored.bytes));
}

#[tokio::test]
async fn the_chunked_protocol_over_http_from_check_to_complete() {
    use otarig_agent::chunk::{open_session, ChunkKey};
    let Served {
        dir,
        server,
        http,
        base,
        v2,
        ..
    } = Served::start().await;
    let sha = hex::encode(otarig_server::store::sha256(&v2));
    let check = serde_json::json!({"v":1,"device":"d-7","sequence":2,"sha256":sha,"from":0});
    // Off until the server has a fleet key, and the answer says how to turn it on.
    let r = post(&http, format!("{base}/ota/check"), check.to_string()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("--chunk-psk"));
    server.chunks.enable(b"http fleet key");

    let r = post(&http, format!("{base}/ota/check"), check.to_string()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer = r.bytes().await.unwrap();
    let mut session = open_session(&answer, 2, v2.len() as u32, 0).expect("a session for v2");
    let key = ChunkKey::derive(b"http fleet key", "d-7");
    let mut got = Vec::new();
    for n in 0..session.chunks() {
        let url = format!(
            "{base}/ota/chunk?device=d-7&session={}&n={n}",
            hex::encode(session.id)
        );
        let frame = get(&http, url, &[]).await.bytes().await.unwrap();
        got.extend_from_slice(session.take(&key, "d-7", &frame).expect("a genuine chunk"));
    }
    assert_eq!(got, v2);
    let json = |b: bytes::Bytes| -> serde_json::Value { serde_json::from_slice(&b).unwrap() };
    let status = json(
        get(&http, format!("{base}/ota/status?device=d-7"), &[])
            .await
            .bytes()
            .await
            .unwrap(),
    );
    assert_eq!(status["progress_pct"], 100);
    assert_eq!(status["state"], "downloading");

    let r = post(
        &http,
        format!("{base}/ota/verify"),
        r#"{"v":1,"device":"d-7","sequence":2}"#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let ack = r#"{"v":1,"device":"d-7","sequence":2,"version":"2.0.0","outcome":"installed","detail":""}"#;
    let r = post(&http, format!("{base}/ota/complete"), ack).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let all = json(
        get(&http, format!("{base}/ota/status"), &[])
            .await
            .bytes()
            .await
            .unwrap(),
    );
    assert_eq!(all[0]["state"], "complete");
    assert_eq!(all[0]["outcome"], "installed");
    let acks = std::fs::read_to_string(dir.path().join("acks.jsonl")).unwrap();
    assert!(acks.contains("\"d-7\""), "the complete is the ack: {acks}");

    // Wrong requests say what is wrong.
    let stale = get(
        &http,
        format!(
            "{base}/ota/chunk?device=d-7&session={}&n=0",
            "00".repeat(16)
        ),
        &[],
    )
    .await;
    assert_eq!(stale.status(), StatusCode::NOT_FOUND);
    assert!(stale.text().await.unwrap().contains("POST /ota/check"));
    let past = get(
        &http,
        format!(
            "{base}/ota/chunk?device=d-7&session={}&n=9999",
            hex::encode(session.id)
        ),
        &[],
    )
    .await;
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = post(
        &http,
        format!("{base}/ota/check"),
        r#"{"v":1,"device":"d-7"}"#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let unknown = serde_json::json!({"v":1,"device":"d-7","sequence":2,"sha256":"ab".repeat(32)});
    let r = post(&http, format!("{base}/ota/check"), unknown.to_string()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    server.shutdown().await;
}
