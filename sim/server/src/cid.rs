//! IPFS content identifiers of release blobs, so a firmware image can be fetched from any IPFS
//! gateway (or pinned) under the same name the server gives it at `/ipfs/<cid>`.
//!
//! The CID is the one `ipfs add --cid-version 1 FILE` prints with Kubo's defaults: UnixFS v1,
//! fixed 256 KiB chunks stored as raw leaves (codec 0x55), a balanced DAG of dag-pb nodes with
//! at most 174 links each, sha2-256 throughout. A file of at most one chunk is its own raw leaf
//! (`bafkrei…`); a larger one is a dag-pb root (`bafybei…`). `fixtures/ipfs/vectors.txt` holds
//! vectors from an independent implementation; the tests below check every one.
//!
//! The DAG itself is built by `rust-unixfs`; only the root CID is kept (blobs are served whole
//! from the release store, not as IPFS blocks).

use ipld_core::cid::{Cid, Version};
use rust_unixfs::file::adder::{BalancedCollector, Chunker, FileAdder};

/// Kubo's default chunk size (`size-262144`).
pub const CHUNK: usize = 256 * 1024;
/// Kubo's default maximum links per node of a balanced DAG.
pub const MAX_LINKS: usize = 174;

/// The CIDv1 (base32) of `bytes` as `ipfs add --cid-version 1` computes it.
pub fn cid_v1(bytes: &[u8]) -> String {
    let mut adder = FileAdder::builder()
        .with_cid_version(Version::V1)
        .with_raw_leaves(true)
        .with_chunker(Chunker::Size(CHUNK))
        .with_collector(BalancedCollector::with_branching_factor(MAX_LINKS))
        .build();
    // The root is the last block produced, which `push` itself returns when the file ends
    // exactly on a chunk boundary of a one-chunk file.
    let mut root = None;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (blocks, consumed) = adder.push(rest);
        root = blocks.map(|(cid, _)| cid).last().or(root);
        rest = &rest[consumed..];
    }
    root = adder.finish().map(|(cid, _)| cid).last().or(root);
    root.unwrap_or_else(empty_file).to_string()
}

/// `finish` always yields a leaf; this is its CID for the empty file, in case it ever does not.
fn empty_file() -> Cid {
    Cid::try_from("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku").unwrap_or_default()
}

/// A CID in the canonical form the store indexes by (CIDv1, base32 lower case), or why `text`
/// is not one. Any multibase a CIDv1 is written in names the same blob.
pub fn canonical(text: &str) -> Result<String, String> {
    let cid = Cid::try_from(text).map_err(|e| format!("'{text}' is not a CID: {e}"))?;
    if cid.version() != Version::V1 {
        return Err(format!(
            "'{text}' is a CIDv0; this server names blobs by CIDv1 (ipfs add --cid-version 1)"
        ));
    }
    Ok(cid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 31 + (i >> 11)) & 0xff) as u8)
            .collect()
    }

    #[test]
    fn matches_every_kubo_vector() {
        let text = include_str!("../../../fixtures/ipfs/vectors.txt");
        let mut checked = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (size, want) = line.split_once(' ').expect("SIZE CID");
            let bytes = match size {
                "hello" => b"hello world\n".to_vec(),
                n => pattern(n.parse().expect("size")),
            };
            assert_eq!(cid_v1(&bytes), want, "CID of {size} bytes");
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    #[test]
    fn one_changed_byte_changes_the_cid() {
        let mut b = pattern(300_000);
        let before = cid_v1(&b);
        b[299_999] ^= 1;
        assert_ne!(cid_v1(&b), before);
    }

    #[test]
    fn canonical_accepts_other_bases_and_refuses_v0_and_junk() {
        let v1 = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4";
        let cid = Cid::try_from(v1).unwrap();
        let b58 = cid
            .to_string_of_base(ipld_core::cid::multibase::Base::Base58Btc)
            .unwrap();
        assert_eq!(canonical(&b58).unwrap(), v1);
        assert!(canonical("QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o")
            .unwrap_err()
            .contains("CIDv0"));
        assert!(canonical("not-a-cid").unwrap_err().contains("not a CID"));
    }
}
