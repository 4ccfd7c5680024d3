extern crate std;

use alloc::string::ToString;
use alloc::vec::Vec;

use aes_gcm::aead::{AeadInPlace, KeyInit as _};
use cbc::cipher::{BlockEncryptMut, KeyIvInit as _};
use rsa::pkcs8::DecodePrivateKey;

use super::*;

const AES_KEY: [u8; 32] = [7; 32];
const IV: [u8; 16] = [9; 16];

fn plain(n: usize) -> Vec<u8> {
    // The fixture's plaintext (made for `esp_enc_img_gen.py`; see fixtures/encrypted).
    (0..n).map(|i| ((i * 7 + i / 256) % 251) as u8).collect()
}

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path)
}

fn rsa_key() -> rsa::RsaPrivateKey {
    let pem = std::fs::read_to_string(fixture("keys/rsa-3072-image.pem")).unwrap();
    rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap()
}

fn cbc_encrypt(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    cbc::Encryptor::<Aes256>::new(key.into(), (&IV).into()).encrypt_padded_vec_mut::<Pkcs7>(data)
}

fn cbc_entry(key: &[u8; 32], ct: &[u8]) -> Encryption {
    Encryption {
        scheme: Scheme::Aes256Cbc,
        key_id: aes256_key_id(key),
        sha256: hex::encode(Sha256::digest(ct)),
        size: ct.len() as u32,
        iv: Some(hex::encode(IV)),
    }
}

/// Feed `ct[from..]` in pieces of `piece` bytes; the plaintext, or the first error.
fn run(mut d: Decryptor, ct: &[u8], piece: usize) -> Result<Vec<u8>, DecryptError> {
    let mut out = Vec::new();
    let mut sink = |p: &[u8]| -> Result<(), ()> {
        out.extend_from_slice(p);
        Ok(())
    };
    let from = d.next_offset() as usize;
    for chunk in ct[from..].chunks(piece) {
        d.feed(chunk, &mut sink).map_err(unwrap_decrypt)?;
    }
    d.finish(&mut sink).map_err(unwrap_decrypt)?;
    Ok(out)
}

fn unwrap_decrypt(e: FeedError<()>) -> DecryptError {
    match e {
        FeedError::Decrypt(e) => e,
        FeedError::Sink(()) => unreachable!("the test sink never fails"),
    }
}

#[test]
fn cbc_decrypts_in_pieces_of_any_size() {
    let keys = ImageKeys::default().with_aes256(AES_KEY);
    for n in [0, 1, 15, 16, 17, 4096, 5000] {
        let data = plain(n);
        let ct = cbc_encrypt(&AES_KEY, &data);
        let enc = cbc_entry(&AES_KEY, &ct);
        for piece in [1, 7, 16, 100, 513, 9000] {
            let d = Decryptor::new(&enc, n as u32, &keys, 0).unwrap();
            assert_eq!(run(d, &ct, piece).unwrap(), data, "n {n} piece {piece}");
        }
    }
}

#[test]
fn cbc_resumes_at_a_block_with_the_previous_ciphertext_block_as_iv() {
    let keys = ImageKeys::default().with_aes256(AES_KEY);
    let data = plain(10_000);
    let ct = cbc_encrypt(&AES_KEY, &data);
    let enc = cbc_entry(&AES_KEY, &ct);
    for from in [16u32, 4096, 8192] {
        let d = Decryptor::new(&enc, data.len() as u32, &keys, from).unwrap();
        assert_eq!(d.next_offset(), from - 16, "it asks for the IV block first");
        assert_eq!(run(d, &ct, 333).unwrap(), data[from as usize..]);
    }
}

#[test]
fn cbc_with_the_wrong_key_or_a_cut_stream_is_refused() {
    let data = plain(5000);
    let ct = cbc_encrypt(&AES_KEY, &data);
    let other = ImageKeys::default().with_aes256([8; 32]);
    let enc = cbc_entry(&AES_KEY, &ct);
    assert!(matches!(
        Decryptor::new(&enc, 5000, &other, 0),
        Err(DecryptError::NoKey { .. })
    ));
    // A key that claims the right id (a misconfigured board) still cannot unpad.
    let lying = Encryption {
        key_id: aes256_key_id(&[8; 32]),
        ..enc.clone()
    };
    let d = Decryptor::new(&lying, 5000, &other, 0).unwrap();
    assert_eq!(run(d, &ct, 512), Err(DecryptError::Padding));
    // A flipped bit in the last block breaks the padding.
    let mut bad = ct.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let keys = ImageKeys::default().with_aes256(AES_KEY);
    let d = Decryptor::new(&enc, 5000, &keys, 0).unwrap();
    assert_eq!(run(d, &bad, 512), Err(DecryptError::Padding));
    // Finishing early.
    let mut d = Decryptor::new(&enc, 5000, &keys, 0).unwrap();
    d.feed(&ct[..100], &mut |_: &[u8]| Ok::<(), ()>(()))
        .unwrap();
    assert!(matches!(
        d.finish(&mut |_: &[u8]| Ok::<(), ()>(())),
        Err(FeedError::Decrypt(DecryptError::Manifest(_)))
    ));
}

/// Found by the `encrypted_image` fuzz target: valid padding of another length than the
/// manifest's size gave more (or less) plaintext than the image, and the excess went to flash.
#[test]
fn cbc_padding_must_leave_exactly_the_manifests_size() {
    let keys = ImageKeys::default().with_aes256(AES_KEY);
    for (real, claimed) in [(111, 100), (97, 100)] {
        let ct = cbc_encrypt(&AES_KEY, &plain(real));
        let enc = cbc_entry(&AES_KEY, &ct);
        let d = Decryptor::new(&enc, claimed, &keys, 0).unwrap();
        assert_eq!(
            run(d, &ct, 16),
            Err(DecryptError::Padding),
            "{real} bytes as {claimed}"
        );
    }
}

#[test]
fn a_manifest_entry_that_does_not_fit_the_image_is_refused() {
    let keys = ImageKeys::default().with_aes256(AES_KEY);
    let ct = cbc_encrypt(&AES_KEY, &plain(100));
    let enc = cbc_entry(&AES_KEY, &ct);
    assert!(check(&enc, 100, &keys).is_ok());
    assert!(
        check(&enc, 112, &keys).is_err(),
        "a whole block of padding at 112"
    );
    let no_iv = Encryption {
        iv: None,
        ..enc.clone()
    };
    assert!(matches!(
        check(&no_iv, 100, &keys),
        Err(DecryptError::Manifest(_))
    ));
    assert_eq!(ciphertext_len(Scheme::Aes256Cbc, u32::MAX), None);
}

/// Encrypt as `esp_enc_img_gen.py encrypt` does, with `aes-gcm` itself.
fn esp_img(plaintext: &[u8], rsa_pub: &rsa::RsaPublicKey, aes_key: &[u8; 32]) -> Vec<u8> {
    type Gcm16 = aes_gcm::AesGcm<Aes256, aes_gcm::aead::consts::U16>;
    let mut rng = rand_for_tests();
    let wrapped = rsa_pub
        .encrypt(&mut rng, rsa::Pkcs1v15Encrypt, aes_key)
        .unwrap();
    let mut body = plaintext.to_vec();
    let tag = Gcm16::new(aes_key.into())
        .encrypt_in_place_detached((&IV).into(), b"", &mut body)
        .unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&esp_img::MAGIC.to_le_bytes());
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(&IV);
    out.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
    out.extend_from_slice(&tag);
    out.resize(esp_img::HEADER_LEN, 0);
    out.extend_from_slice(&body);
    out
}

/// rsa's PKCS#1 v1.5 encryption wants a CryptoRng; a seeded one keeps the test reproducible.
fn rand_for_tests() -> impl rsa::rand_core::CryptoRngCore {
    struct Counter(u64);
    impl rsa::rand_core::RngCore for Counter {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                *b = (self.next_u64() >> 24) as u8 | 1;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl rsa::rand_core::CryptoRng for Counter {}
    Counter(42)
}

fn esp_entry(ct: &[u8], key: &rsa::RsaPrivateKey) -> Encryption {
    Encryption {
        scheme: Scheme::EspEncryptedImg,
        key_id: rsa_key_id(&key.to_public_key()),
        sha256: hex::encode(Sha256::digest(ct)),
        size: ct.len() as u32,
        iv: None,
    }
}

#[test]
fn an_image_made_by_esp_enc_img_gen_py_decrypts() {
    let key = rsa_key();
    let ct = std::fs::read(fixture("encrypted/esp-enc-img-5000.bin")).unwrap();
    let keys = ImageKeys::default().with_rsa(key.clone());
    let enc = esp_entry(&ct, &key);
    for piece in [1, 16, 511, 512, 513, 4096] {
        let d = Decryptor::new(&enc, 5000, &keys, 0).unwrap();
        assert_eq!(run(d, &ct, piece).unwrap(), plain(5000), "piece {piece}");
    }
}

#[test]
fn streaming_gcm_matches_aes_gcm_and_catches_every_altered_byte() {
    let key = rsa_key();
    let keys = ImageKeys::default().with_rsa(key.clone());
    for n in [0, 1, 16, 33, 4096, 5000] {
        let data = plain(n);
        let ct = esp_img(&data, &key.to_public_key(), &AES_KEY);
        let enc = esp_entry(&ct, &key);
        let d = Decryptor::new(&enc, n as u32, &keys, 0).unwrap();
        assert_eq!(run(d, &ct, 100).unwrap(), data, "n {n}");
    }
    let data = plain(3000);
    let ct = esp_img(&data, &key.to_public_key(), &AES_KEY);
    let enc = esp_entry(&ct, &key);
    for (at, want) in [
        (
            0,
            DecryptError::Header("bad magic (not an esp_encrypted_img image)"),
        ),
        (100, DecryptError::KeyUnwrap),
        (390, DecryptError::Tag), // the IV
        (410, DecryptError::Tag), // the tag
        (esp_img::HEADER_LEN + 5, DecryptError::Tag),
        (ct.len() - 1, DecryptError::Tag),
    ] {
        let mut bad = ct.clone();
        bad[at] ^= 0x10;
        let d = Decryptor::new(&enc, 3000, &keys, 0).unwrap();
        assert_eq!(run(d, &bad, 700), Err(want), "byte {at}");
    }
    let mut short = ct.clone();
    short[esp_img::BIN_SIZE.start] ^= 1;
    let d = Decryptor::new(&enc, 3000, &keys, 0).unwrap();
    assert!(matches!(run(d, &short, 700), Err(DecryptError::Header(_))));
    assert!(
        Decryptor::new(&enc, 3000, &keys, 4096).is_err(),
        "esp_encrypted_img has no resume"
    );
    assert_eq!(
        DecryptError::Tag.to_string(),
        "esp_encrypted_img: AES-GCM tag mismatch (wrong key or altered ciphertext)"
    );
}

#[test]
fn keys_from_nvs_strings_leave_out_what_does_not_parse() {
    let pem = std::fs::read_to_string(fixture("keys/rsa-3072-image.pem")).unwrap();
    let aes = hex::encode(AES_KEY);
    let (keys, ignored) = ImageKeys::from_nvs(Some(&aes), Some(&pem));
    assert!(ignored.is_empty(), "{ignored:?}");
    assert_eq!(
        keys.key_id(Scheme::Aes256Cbc),
        Some(aes256_key_id(&AES_KEY))
    );
    assert_eq!(
        keys.key_id(Scheme::EspEncryptedImg),
        Some(rsa_key_id(&rsa_key().to_public_key()))
    );
    let (keys, ignored) = ImageKeys::from_nvs(Some("12ab"), Some("-----BEGIN nothing"));
    assert_eq!(ignored, ["image_aes", "image_rsa"]);
    assert_eq!(keys.key_id(Scheme::Aes256Cbc), None);
    assert_eq!(keys.key_id(Scheme::EspEncryptedImg), None);
}
