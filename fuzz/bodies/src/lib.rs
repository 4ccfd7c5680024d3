//! # otarig-fuzz-bodies
//!
//! Bodies of the fuzz targets for every parser that faces untrusted bytes. `fuzz/` (cargo-fuzz,
//! libFuzzer) calls them; `tests/parsers_never_panic.rs` runs them on random input under
//! `cargo test`. Each must return without panicking, hanging or allocating without bound,
//! whatever the input.
//!
//! It sits above every crate whose parsers it reaches; no crate may depend on it but `fuzz/`.

use std::path::Path;
use std::sync::OnceLock;

use rand::SeedableRng;

use otarig_agent::delta::{Applier, Resume, Sink, SinkError};
use otarig_agent::{PublicKey, TrustedKey};

/// The key the targets trust; [`signed`] signs with its private half.
fn signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

fn keys() -> &'static [TrustedKey] {
    static KEYS: OnceLock<Vec<TrustedKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let sk = signing_key();
        let key = PublicKey::ed25519(&sk.verifying_key().to_bytes()).map(|key| TrustedKey {
            id: "fuzz".into(),
            key,
        });
        key.into_iter().collect()
    })
}

/// A signed manifest envelope (MQTT announcement or HTTP answer).
pub fn manifest(data: &[u8]) {
    let _ = otarig_agent::manifest::open(data, keys());
}

/// Where the fuzzed patches go: a 64 KiB old image of 0x5A bytes and an output that is only
/// counted. Reads and writes fail from the `fail_at`th operation on, as a flash that wears out
/// mid-patch does (`u32::MAX`: never).
struct TestSink {
    ops: u32,
    fail_at: u32,
    written: u64,
}

impl TestSink {
    const OLD_LEN: u64 = 64 * 1024;

    fn failing_at(fail_at: u32) -> TestSink {
        TestSink {
            ops: 0,
            fail_at,
            written: 0,
        }
    }

    fn fails_now(&mut self) -> bool {
        self.ops = self.ops.saturating_add(1);
        self.ops >= self.fail_at
    }
}

impl Sink for TestSink {
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), SinkError> {
        if self.fails_now() || offset as u64 + buf.len() as u64 > Self::OLD_LEN {
            return Err(SinkError);
        }
        buf.fill(0x5A);
        Ok(())
    }
    fn write_new(&mut self, data: &[u8]) -> Result<(), SinkError> {
        if self.fails_now() {
            return Err(SinkError);
        }
        self.written += data.len() as u64;
        Ok(())
    }
    fn checkpoint(&mut self, _: Resume) {}
}

/// A delta patch, fed the way the network delivers it (in pieces).
pub fn patch(data: &[u8]) {
    let mut a = Applier::new(4096);
    let mut sink = TestSink::failing_at(u32::MAX);
    let mut pos = 0usize;
    while pos < data.len() && !a.is_done() {
        if a.next_offset() as usize != pos {
            break; // the applier wants bytes from elsewhere (a resume jump)
        }
        let end = (pos + 777).min(data.len());
        match a.feed(&data[pos..end], &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => pos += n,
        }
    }
    if let Some(h) = a.header() {
        assert!(
            sink.written <= h.new_size as u64,
            "applier wrote past the new image size"
        );
    }
}

/// An app image in a slot (bootloader, `esp_ota_end`).
pub fn image(data: &[u8]) {
    let _ = otarig_agent::image::verify(data.len() as u32, |off, buf| {
        let src = data.get(off as usize..off as usize + buf.len()).ok_or(())?;
        buf.copy_from_slice(src);
        Ok(())
    });
}

/// A scenario file.
pub fn scenario(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = otarig_scenario::scenario::Scenario::parse(Path::new("fuzz.toml"), text);
    }
}

/// A binary partition table and a partitions.csv.
pub fn partition_table(data: &[u8]) {
    let _ = otarig_esp32s3::partition::PartitionTable::from_binary(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = otarig_esp32s3::partition::PartitionTable::from_csv("fuzz.csv", text);
    }
}

/// A BSDIFF40 patch to import.
pub fn bsdiff40(data: &[u8]) {
    let _ = otarig_server::delta::import_bsdiff40(&[0u8; 4096], data);
}

/// Payloads a board reads: releases (announcements and poll answers, with their key set,
/// revocation list and timestamp) and commands.
pub fn mqtt_payloads(data: &[u8]) {
    if let Ok(r) = otarig_agent::protocol::parse_release(data) {
        let _ = otarig_agent::manifest::open_parsed(&r.signed, keys());
        open_statements(&r);
    }
    let _ = otarig_agent::protocol::parse_command(data, keys());
}

/// Every statement of a release payload, verified with the fuzz key in every role.
fn open_statements(r: &otarig_agent::protocol::ReleasePayload) {
    use otarig_agent::trust;
    if let Some(k) = &r.keys {
        let _ = trust::open_keyset(k, keys());
    }
    if let Some(l) = &r.revocations {
        if let Ok(list) = trust::open_revocations(l, keys()) {
            let _ = list.revokes(u64::MAX, &[0xAB; 32]);
        }
    }
    if let Some(t) = &r.timestamp {
        let _ = trust::open_timestamp(t, keys());
    }
}

/// `body` in a valid envelope signed for `ctx` by the trusted key.
fn signed(ctx: otarig_agent::manifest::Context, body: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let sig = signing_key().sign(&ctx.message(body)).to_bytes();
    let env =
        otarig_agent::manifest::envelope(body, "fuzz", otarig_agent::manifest::Alg::Ed25519, &sig);
    serde_json::to_vec(&env).unwrap_or_default()
}

/// Bodies behind a valid signature: what a holder of a release or operator key could send,
/// past the check that stops everyone else. A manifest body, then a command body; and the
/// same signed bytes under the wrong context must not verify.
pub fn signed_bodies(data: &[u8]) {
    use otarig_agent::manifest::Context;
    let manifest = signed(Context::Manifest, data);
    let _ = otarig_agent::manifest::open(&manifest, keys());
    let cmd = signed(Context::Command, data);
    if let Ok(payload) = otarig_agent::protocol::signed_payload(&cmd) {
        let _ = otarig_agent::protocol::parse_command(payload.as_bytes(), keys());
    }
    // The same body as a key set, a revocation list and a timestamp, each signed for its own
    // purpose, in one release payload.
    let statement = |ctx| signed(ctx, data);
    if let Ok(payload) = otarig_agent::protocol::release_payload(
        &manifest,
        Some(&statement(Context::KeySet)),
        Some(&statement(Context::Revocations)),
        Some(&statement(Context::Timestamp)),
    ) {
        if let Ok(r) = otarig_agent::protocol::parse_release(&payload) {
            open_statements(&r);
        }
    }
    let crossed = otarig_agent::manifest::verify_envelope(&cmd, keys(), Context::Manifest);
    assert!(
        crossed.is_err() || data.len() > otarig_agent::manifest::MAX_SIGNED_MANIFEST_LEN,
        "a command signature verified as a manifest"
    );
}

/// A serial line in both directions (console protocol), and the same bytes as ROM loader
/// input to a virtual board's loader over a small flash: never a panic, never a write outside
/// the flash.
pub fn serial(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let _ = otarig_agent::console::parse_board_line(line);
        let _ = otarig_agent::console::parse_command_line(line);
    }
    let mut flash = otarig_serial::rom::VecFlash(vec![0xFF; 64 * 1024]);
    let mut loader = otarig_serial::rom::RomLoader::new(64 * 1024, [0x7C, 0xDF, 0xA1, 0, 0, 1]);
    let mut frames = otarig_serial::rom::SlipFrames::default();
    for f in frames.push(data) {
        let _ = loader.handle(&f, &mut flash);
    }
    // The request as one frame, unescaped.
    let _ = loader.handle(data, &mut flash);
}

/// A stored journal copy (both layouts) and a pair of otadata entries as the bootloader
/// reads them: any bytes on flash, torn or corrupted, decode to a record or to nothing.
pub fn journal_and_otadata(data: &[u8]) {
    use otarig_agent::journal::{Record, RECORD_LEN};
    let mut copy = [0xFFu8; RECORD_LEN];
    let n = data.len().min(RECORD_LEN);
    copy[..n].copy_from_slice(&data[..n]);
    let _ = Record::decode(&copy);
    use otarig_esp32s3::otadata::{select, Entry, ENTRY_LEN};
    let mut e = [[0xFFu8; ENTRY_LEN]; 2];
    for (k, entry) in e.iter_mut().enumerate() {
        let from = (k * ENTRY_LEN).min(data.len());
        let to = ((k + 1) * ENTRY_LEN).min(data.len());
        entry[..to - from].copy_from_slice(&data[from..to]);
    }
    let two = [Entry::decode(&e[0]), Entry::decode(&e[1])];
    let flags = data.last().copied().unwrap_or(0);
    if let Some(i) = select(&two, [flags & 1 != 0, flags & 2 != 0], flags & 4 != 0) {
        assert!(i < 2, "otadata selection out of range");
        let _ = two[i].slot(2);
    }
}

/// A release log: the lines as they are (signatures that do not verify), then the same lines
/// each signed by the trusted key, so the entry parser and the hash chain see fuzzed bodies.
pub fn release_log(data: &[u8]) {
    use otarig_agent::manifest::Context;
    let lines: Vec<Vec<u8>> = data.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    let _ = otarig_server::release_store::verify_log_lines(&lines, keys());
    let signed: Vec<Vec<u8>> = lines.iter().map(|l| signed(Context::LogEntry, l)).collect();
    let _ = otarig_server::release_store::verify_log_lines(&signed, keys());
}

/// A patch applied from a fuzzed resume point (as a corrupted but CRC-valid journal, or a
/// journal of another patch, would give), into a sink that fails after a fuzzed number of
/// operations: errors, never a panic or a write past the new image.
pub fn applier_resume(data: &[u8]) {
    if data.len() < Resume::ENCODED_LEN + 1 {
        return;
    }
    let at = Resume::decode(&data[..Resume::ENCODED_LEN]);
    let fail_at = u32::from(data[Resume::ENCODED_LEN]).saturating_add(1);
    let patch = &data[Resume::ENCODED_LEN + 1..];
    let mut a = Applier::resume(4096, at);
    let mut sink = TestSink::failing_at(fail_at);
    // Serve the patch from wherever the applier asks, as the agent's range requests do.
    for _ in 0..10_000 {
        let pos = a.next_offset();
        let Some(rest) = usize::try_from(pos).ok().and_then(|p| patch.get(p..)) else {
            break;
        };
        if rest.is_empty() || a.is_done() {
            break;
        }
        match a.feed(&rest[..rest.len().min(777)], &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Some(h) = a.header() {
        assert!(
            a.new_written() <= h.new_size as u64,
            "applier counted output past the new image size"
        );
    }
}

/// The firmware server's routes, in process: the request's method, path and query, headers
/// and body come from `data` (`METHOD PATH\nName: value\n…\n\nbody`). Whatever comes, the
/// server answers without panicking, and a partial answer is a well-formed one.
pub fn http_server(data: &[u8]) {
    use tower::ServiceExt;
    let Some(req) = request_from(data) else {
        return;
    };
    let (router, rt) = server_under_test();
    let router = router.clone();
    rt.block_on(async move {
        let Ok(resp) = router.oneshot(req).await;
        let status = resp.status();
        let length = resp
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let ranged = resp
            .headers()
            .contains_key(axum::http::header::CONTENT_RANGE);
        let body = axum::body::to_bytes(resp.into_body(), 4 << 20).await;
        if status == axum::http::StatusCode::PARTIAL_CONTENT {
            assert!(ranged, "206 without Content-Range");
        }
        if let (Ok(body), Some(len)) = (body, length) {
            assert_eq!(body.len(), len, "body length differs from Content-Length");
        }
    });
}

/// `METHOD PATH`, header lines, a blank line, the body.
fn request_from(data: &[u8]) -> Option<axum::http::Request<axum::body::Body>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, path) = lines.next()?.split_once(' ')?;
    let mut b = axum::http::Request::builder().method(method).uri(path);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        b = b.header(name.trim(), value.trim());
    }
    b.body(axum::body::Body::from(body.to_vec())).ok()
}

/// One server over a store holding one signed release (built once per process, over a store
/// directory shared by every process). A harness that cannot be set up is a failure that says
/// why, not a target that silently checks nothing.
fn server_under_test() -> &'static (axum::Router, tokio::runtime::Runtime) {
    static SERVER: OnceLock<(axum::Router, tokio::runtime::Runtime)> = OnceLock::new();
    SERVER.get_or_init(|| {
        // One store for every process on the machine, made once and reused: a server needs
        // its files for as long as it runs, and statics are never dropped, so a directory per
        // process would be left behind by every run.
        let dir = std::env::temp_dir().join("otarig-fuzz-http-server");
        let store = otarig_server::release_store::ReleaseStore::open(&dir).unwrap_or_else(|e| {
            panic!("the http_server target's store at {}: {e:#}", dir.display())
        });
        if !matches!(store.latest("fuzz", "stable"), Ok(Some(_))) {
            let key = otarig_server::keys::NamedKey::load(
                &otarig_server::keys::fixture_dir(),
                "ed25519-test",
            )
            .unwrap_or_else(|e| panic!("the fixture key ed25519-test: {e:#}"));
            let image = otarig_esp32s3::appimage::build(&otarig_esp32s3::appimage::AppSpec::new(
                "fuzz",
                "1.0.0",
                8 * 1024,
            ));
            let m = otarig_agent::manifest::Manifest::draft(
                "fuzz",
                "stable",
                "1.0.0",
                1,
                1_767_225_600,
                86_400,
            );
            // Another process may publish first; then its release serves as well.
            let _ = store.publish(&key, m, &image, &[], 1);
        }
        let router = otarig_server::server::router(
            std::sync::Arc::new(store),
            Default::default(),
            Default::default(),
            otarig_server::server::Limits {
                ack_log_bytes: 1 << 20,
                ..Default::default()
            },
            Default::default(),
            {
                // The chunked protocol's endpoints are fuzzed with the rest.
                let chunks = otarig_server::chunked::ChunkService::default();
                chunks.enable(b"fuzz fleet key");
                std::sync::Arc::new(chunks)
            },
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a tokio runtime for the http_server target: {e}"));
        (router, rt)
    })
}

/// NVS partition images (a board's factory provisioning): any bytes as a partition, never a
/// panic; and strings cut from the input, written and read back unchanged.
pub fn nvs_image(data: &[u8]) {
    use otarig_esp32s3::nvs::{read, NvsValue, NvsWriter, PAGE};
    let mut raw = data.to_vec();
    raw.resize(raw.len().max(3 * PAGE).next_multiple_of(PAGE), 0xFF);
    let _ = read(&raw);
    let Ok(mut w) = NvsWriter::new(0x6000) else {
        return;
    };
    if w.namespace("fuzz").is_err() {
        return;
    }
    let mut written = Vec::new();
    for (n, chunk) in data.chunks(97).enumerate() {
        let (key, value) = (
            format!("k{n}"),
            String::from_utf8_lossy(chunk).replace('\0', ""),
        );
        if w.string(&key, &value).is_ok() {
            written.push((key, value));
        }
    }
    let values = read(&w.finish());
    for (key, value) in written {
        assert_eq!(
            values.get(&("fuzz".to_string(), key.clone())),
            Some(&NvsValue::Str(value)),
            "NVS string {key} did not read back"
        );
    }
}

/// Encrypted images: any bytes as AES-256-CBC and as esp_encrypted_img ciphertext (a header
/// with the right magic when the first byte asks for one, so the RSA unwrap is reached), fed
/// in pieces the input chooses: an error or plaintext, never a panic, and never more
/// plaintext than the manifest's size. And a CBC round trip of the input, in pieces.
pub fn encrypted_image(data: &[u8]) {
    use otarig_agent::cipher::{ciphertext_len, esp_img, Decryptor, Encryption, Scheme};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (keys, aes) = image_keys();
    let piece = usize::from(first % 61) + 1;
    let feed = |enc: &Encryption, plain_size: u32, ct: &[u8]| {
        let Ok(mut d) = Decryptor::new(enc, plain_size, keys, 0) else {
            return None;
        };
        let mut out = Vec::new();
        let mut sink = |p: &[u8]| -> Result<(), ()> {
            out.extend_from_slice(p);
            Ok(())
        };
        for chunk in ct.chunks(piece) {
            d.feed(chunk, &mut sink).ok()?;
        }
        d.finish(&mut sink).ok()?;
        assert!(
            out.len() <= plain_size as usize,
            "more plaintext than the image"
        );
        Some(out)
    };
    let entry = |scheme, ct: &[u8], iv| Encryption {
        scheme,
        key_id: keys.key_id(scheme).unwrap_or_default(),
        sha256: hex_sha256(ct),
        size: ct.len() as u32,
        iv,
    };
    // Any bytes as CBC ciphertext of the longest image they could hold.
    let cbc_plain = (rest.len() as u32 / 16).saturating_sub(1) * 16;
    if ciphertext_len(Scheme::Aes256Cbc, cbc_plain) == Some(rest.len() as u32) {
        let _ = feed(
            &entry(Scheme::Aes256Cbc, rest, Some("00".repeat(16))),
            cbc_plain,
            rest,
        );
    }
    // Any bytes as esp_encrypted_img.
    let mut img = rest.to_vec();
    if first == 0xE5 && img.len() >= 4 {
        img[..4].copy_from_slice(&esp_img::MAGIC.to_le_bytes());
    }
    let plain = (img.len() as u32).saturating_sub(esp_img::HEADER_LEN as u32);
    let _ = feed(&entry(Scheme::EspEncryptedImg, &img, None), plain, &img);
    // Round trip.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(u64::from(first));
    if let Ok(enc) = otarig_server::encrypt::encrypt(aes, rest, &mut rng) {
        let out = feed(&enc.entry, rest.len() as u32, &enc.ciphertext);
        assert_eq!(out.as_deref(), Some(rest), "AES-256-CBC round trip");
    }
}

/// Chunk frames of the chunked protocol: any bytes as a frame (refused or taken, never a
/// panic, and a taken chunk is exactly the size its index has), any bytes as a session answer,
/// and the input as a genuine chunk, taken whole and refused after any one bit flips.
pub fn chunk_frames(data: &[u8]) {
    use otarig_agent::chunk::{frame, open_session, ChunkKey, Place, Session, CHUNK_SIZE};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let key = ChunkKey::derive(b"fuzz fleet key", "fuzz-0");
    let size = u32::from(first) * 97 + 1;
    let mut session = Session {
        id: [first; 16],
        sequence: 9,
        size,
        next: u32::from(first % 4),
    };
    let next = session.next;
    if let Ok(taken) = session.take(&key, "fuzz-0", rest) {
        assert_eq!(
            taken.len(),
            session.len_of(next),
            "a chunk of the wrong size was taken"
        );
    }
    let _ = open_session(rest, 9, size, u32::from(first % 8));
    let piece = &rest[..rest.len().min(CHUNK_SIZE as usize)];
    if piece.is_empty() {
        return;
    }
    let place = Place {
        device: "fuzz-0",
        session: [first; 16],
        sequence: 9,
        index: 0,
    };
    let genuine = frame(&key, &place, piece);
    let mut whole = Session {
        id: [first; 16],
        sequence: 9,
        size: piece.len() as u32,
        next: 0,
    };
    assert_eq!(
        whole.take(&key, "fuzz-0", &genuine),
        Ok(piece),
        "round trip"
    );
    let mut flipped = genuine;
    let at = usize::from(first) * 31 % flipped.len();
    flipped[at] ^= 1 << (first % 8);
    let mut again = Session { next: 0, ..whole };
    assert!(
        again.take(&key, "fuzz-0", &flipped).is_err(),
        "a flipped bit at {at} was taken"
    );
}

fn hex_sha256(data: &[u8]) -> String {
    otarig_server::store::sha256(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fixture image keys (fixtures/keys), loaded once.
fn image_keys() -> &'static (
    otarig_agent::cipher::ImageKeys,
    otarig_server::encrypt::ImageKey,
) {
    use otarig_server::encrypt::{load_board_rsa, ImageKey};
    static KEYS: OnceLock<(otarig_agent::cipher::ImageKeys, ImageKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = otarig_server::keys::fixture_dir();
        let aes = ImageKey::load(&dir.join("aes-256-image.hex"))
            .unwrap_or_else(|e| panic!("the fuzz target's AES key: {e:#}"));
        let rsa = load_board_rsa(&dir.join("rsa-3072-image.pem"))
            .unwrap_or_else(|e| panic!("the fuzz target's RSA key: {e:#}"));
        let mut keys = otarig_agent::cipher::ImageKeys::default().with_rsa(rsa);
        if let ImageKey::Aes256(k) = &aes {
            keys = keys.with_aes256(*k);
        }
        (keys, aes)
    })
}
