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

struct NullSink {
    old_len: u32,
    written: u64,
}

impl Sink for NullSink {
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), SinkError> {
        if offset as u64 + buf.len() as u64 > self.old_len as u64 {
            return Err(SinkError);
        }
        buf.fill(0x5A);
        Ok(())
    }
    fn write_new(&mut self, data: &[u8]) -> Result<(), SinkError> {
        self.written += data.len() as u64;
        Ok(())
    }
    fn checkpoint(&mut self, _: Resume) {}
}

/// A delta patch, fed the way the network delivers it (in pieces).
pub fn patch(data: &[u8]) {
    let mut a = Applier::new(4096);
    let mut sink = NullSink {
        old_len: 64 * 1024,
        written: 0,
    };
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

/// MQTT payloads a board reads: release announcements and commands.
pub fn mqtt_payloads(data: &[u8]) {
    if let Ok(a) = otarig_agent::protocol::parse_announcement(data) {
        let _ = otarig_agent::manifest::open(
            &otarig_agent::protocol::announcement_manifest(&a),
            keys(),
        );
    }
    let _ = otarig_agent::protocol::parse_command(data, keys());
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
    if let Ok(payload) = otarig_agent::protocol::command_payload(&cmd) {
        let _ = otarig_agent::protocol::parse_command(payload.as_bytes(), keys());
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
