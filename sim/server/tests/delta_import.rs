//! A BSDIFF40 patch made by Python's bsdiff4 (fixtures/deltas/make.sh) transcodes into our
//! container and produces the new image byte for byte.

use std::path::Path;

#[test]
fn python_bsdiff4_patch_transcodes_and_applies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/deltas");
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    let (v1, v2, p40) = (read("v1.bin"), read("v2.bin"), read("v1-to-v2.bsdiff40"));
    let ours = otarig_server::delta::import_bsdiff40(&v1, &p40).unwrap();
    assert_eq!(otarig_server::delta::apply(&v1, &ours).unwrap(), v2);
    let mut broken = p40.clone();
    broken[40] ^= 0xFF; // inside the bzip2 control block
    assert!(otarig_server::delta::import_bsdiff40(&v1, &broken).is_err());
    assert!(otarig_server::delta::import_bsdiff40(&v1, b"not a patch at all, clearly").is_err());
}
