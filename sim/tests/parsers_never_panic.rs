//! Every parser that faces untrusted bytes survives random and mutated input (the same bodies
//! the cargo-fuzz targets in `fuzz/` run under libFuzzer).

use otarig::fuzzing;
use proptest::prelude::*;

fn valid_patch() -> Vec<u8> {
    let a = otarig::appimage::build(&otarig::appimage::AppSpec::new("p", "1", 16 * 1024));
    let b = otarig::appimage::build(&otarig::appimage::AppSpec::new("p", "2", 17 * 1024));
    otarig::delta::make(&a, &b)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzzing::manifest(&data);
        fuzzing::patch(&data);
        fuzzing::image(&data);
        fuzzing::scenario(&data);
        fuzzing::partition_table(&data);
        fuzzing::bsdiff40(&data);
        fuzzing::mqtt_payloads(&data);
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
        let mut img = otarig::appimage::build(&otarig::appimage::AppSpec::new("p", "1", 8 * 1024));
        for (at, x) in flips {
            let n = img.len();
            img[at % n] ^= x | 1;
        }
        fuzzing::image(&img);
    }
}
