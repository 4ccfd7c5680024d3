//! Every parser that faces untrusted bytes survives random and mutated input (the same bodies
//! the cargo-fuzz targets in `fuzz/` run under libFuzzer).

use otarig_fuzz_bodies as fuzzing;
use proptest::prelude::*;

fn valid_patch() -> Vec<u8> {
    let a = otarig_esp32s3::appimage::build(&otarig_esp32s3::appimage::AppSpec::new(
        "p",
        "1",
        16 * 1024,
    ));
    let b = otarig_esp32s3::appimage::build(&otarig_esp32s3::appimage::AppSpec::new(
        "p",
        "2",
        17 * 1024,
    ));
    otarig_server::delta::make(&a, &b)
}

/// A ROM loader request: header, then `data`.
fn rom_request(op: u8, data: &[u8], checksum: u32) -> Vec<u8> {
    let mut r = vec![0, op];
    r.extend_from_slice(&(data.len() as u16).to_le_bytes());
    r.extend_from_slice(&checksum.to_le_bytes());
    r.extend_from_slice(data);
    r
}

proptest! {

    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Well-formed loader requests with hostile fields (addresses, sizes, sequence numbers).
    #[test]
    fn rom_loader_requests(op in prop_oneof![Just(0x02u8), Just(0x03), Just(0x04), Just(0x09), Just(0x0A), Just(0x13)],
                           words in proptest::collection::vec(any::<u32>(), 0..8),
                           tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        data.extend_from_slice(&tail);
        let frame = rom_request(op, &data, 0xEF);
        fuzzing::serial(&otarig_serial::rom::slip_encode(&frame));
    }

    #[test]
    fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::manifest(&data);
        fuzzing::patch(&data);
        fuzzing::image(&data);
        fuzzing::scenario(&data);
        fuzzing::partition_table(&data);
        fuzzing::bsdiff40(&data);
        fuzzing::mqtt_payloads(&data);
        fuzzing::serial(&data);
        fuzzing::signed_bodies(&data);
        fuzzing::journal_and_otadata(&data);
        fuzzing::release_log(&data);
        fuzzing::applier_resume(&data);
        fuzzing::http_server(&data);
        fuzzing::nvs_image(&data);
        fuzzing::encrypted_image(&data);
        fuzzing::chunk_frames(&data);
    }

    /// Plausible requests with hostile parts: every route, odd queries, Range and conditional
    /// headers, ack bodies.
    #[test]
    fn server_requests(route in 0usize..11, query in "[a-zA-Z0-9=&%_.-]{0,40}",
                       range in prop_oneof![Just(String::new()), "bytes=[0-9]{0,12}-[0-9]{0,12}", "bytes=[-0-9,]{0,20}", ".{0,30}"],
                       cond in prop_oneof![Just(String::new()), "If-None-Match: \"[0-9a-f]{0,64}\"", "If-Range: .{0,40}", "If-Match: \\*"],
                       body in ".{0,200}") {
        let path = ["/firmware/latest", "/blobs/0000", "/ipfs/bafy", "/ack", "/healthz", "/",
            "/ota/check", "/ota/chunk", "/ota/verify", "/ota/complete", "/ota/status"][route];
        let method = if [3, 6, 8, 9].contains(&route) { "POST" } else { "GET" };
        let mut req = format!("{method} {path}?{query}\n");
        if !range.is_empty() {
            req.push_str(&format!("Range: {range}\n"));
        }
        if !cond.is_empty() {
            req.push_str(&cond);
            req.push('\n');
        }
        req.push('\n');
        req.push_str(&body);
        fuzzing::http_server(req.as_bytes());
    }

    /// A valid patch resumed from arbitrary checkpoints into a sink that fails at any point.
    #[test]
    fn patches_resumed_anywhere(resume in proptest::collection::vec(any::<u8>(), 40), fail_at in any::<u8>()) {
        let mut data = resume;
        data.push(fail_at);
        data.extend(valid_patch());
        fuzzing::applier_resume(&data);
    }

    #[test]
    fn mutated_patches(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut p = valid_patch();
        for (at, x) in flips {
            let n = p.len();
            p[at % n] ^= x | 1;
        }
        fuzzing::patch(&p);
    }

    #[test]
    fn mutated_images(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut img = otarig_esp32s3::appimage::build(&otarig_esp32s3::appimage::AppSpec::new("p", "1", 8 * 1024));
        for (at, x) in flips {
            let n = img.len();
            img[at % n] ^= x | 1;
        }
        fuzzing::image(&img);
    }
}
