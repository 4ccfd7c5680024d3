//! Encrypted images: decrypting a stream of ciphertext into plaintext as it arrives, in a
//! few hundred bytes of state, so that no buffer grows with the image.
//!
//! Two formats ([`Scheme`]):
//!
//! - **AES-256-CBC with PKCS#7 padding** under a fleet key, the IV in the signed manifest.
//!   The ciphertext is the plaintext's length rounded up to the next 16-byte block (a whole
//!   block of padding when it is already a multiple). A download resumes anywhere on a block
//!   boundary: the ciphertext block before it is the IV ([`Decryptor::new`] with `from > 0`
//!   asks for those 16 bytes first).
//! - **ESP-IDF's `esp_encrypted_img`** (component 2.x, RSA-3072 scheme; its
//!   `esp_encrypted_img_decrypt_data` is what this models): a 512-byte header (magic
//!   `0x0788b6cf` little-endian, the AES-256-GCM key under RSA-3072 PKCS#1 v1.5, a 16-byte
//!   IV, the image length, the GCM tag), then the image encrypted with AES-256-GCM without
//!   associated data. Plaintext is written before the tag is checked, as ESP-IDF does; the tag
//!   is checked at the end ([`Decryptor::finish`], `esp_encrypted_img_decrypt_end`) before
//!   anything can switch the boot partition. There is no resume: GCM's running hash lives in
//!   RAM, and ESP-IDF refuses `ota_resumption` with a decrypt callback; a cut means fetching
//!   the image again from byte 0.
//!
//! The signed manifest's SHA-256 covers the plaintext, so what lands in the slot is checked
//! the same way for every format; decryption adds confidentiality, not integrity.
//!
//! GCM is composed from RustCrypto's `ctr` and `ghash` the way the `aes-gcm` crate composes
//! it (that crate only seals whole buffers); the tests check it against `aes-gcm`.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use aes::Aes256;
use cbc::cipher::block_padding::{Pkcs7, RawPadding};
use ghash::universal_hash::UniversalHash;
use ghash::GHash;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::manifest::{Encryption, Scheme};

/// AES block length.
pub const BLOCK: usize = 16;

/// `esp_encrypted_img`'s header layout (`esp_encrypted_img_priv.h`, `pre_enc_bin_header`).
pub mod esp_img {
    /// Header length: the ciphertext starts here.
    pub const HEADER_LEN: usize = 512;
    /// `0x0788b6cf`, stored little-endian.
    pub const MAGIC: u32 = 0x0788_b6cf;
    /// The AES-256-GCM key, encrypted for the device's RSA-3072 key (384 bytes).
    pub const KEY: core::ops::Range<usize> = 4..388;
    pub const IV: core::ops::Range<usize> = 388..404;
    /// The plaintext length, `u32` little-endian.
    pub const BIN_SIZE: core::ops::Range<usize> = 404..408;
    pub const TAG: core::ops::Range<usize> = 408..424;
    /// The RSA modulus length esp_encrypted_img's RSA scheme uses.
    pub const RSA_BITS: usize = 3072;
}

/// The keys a board decrypts images with; kept out of `Debug` output. The RSA key is shared,
/// not copied, by clones (a fleet's configurations, each download's decryptor).
#[derive(Clone, Default)]
pub struct ImageKeys {
    aes256: Option<[u8; 32]>,
    rsa: Option<Arc<rsa::RsaPrivateKey>>,
}

impl fmt::Debug for ImageKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageKeys")
            .field("aes-256-cbc", &self.key_id(Scheme::Aes256Cbc))
            .field("esp-encrypted-img", &self.key_id(Scheme::EspEncryptedImg))
            .finish()
    }
}

impl ImageKeys {
    /// The fleet's AES-256 key for [`Scheme::Aes256Cbc`].
    pub fn with_aes256(mut self, key: [u8; 32]) -> ImageKeys {
        self.aes256 = Some(key);
        self
    }

    /// The board's RSA-3072 key for [`Scheme::EspEncryptedImg`] (`rsa_key/private.pem` in
    /// ESP-IDF's pre_encrypted_ota example).
    pub fn with_rsa(mut self, key: rsa::RsaPrivateKey) -> ImageKeys {
        self.rsa = Some(Arc::new(key));
        self
    }

    /// The keys as a factory NVS image holds them (`image_aes`: 64 hex digits; `image_rsa`:
    /// an RSA private key in PEM, PKCS#8 or PKCS#1), as the esp32s3 shell and the virtual
    /// board read them at boot. A value that does not parse is left out and its NVS key
    /// returned, so the board refuses releases encrypted for it (`decrypt`) instead of failing
    /// to boot.
    pub fn from_nvs(
        aes_hex: Option<&str>,
        rsa_pem: Option<&str>,
    ) -> (ImageKeys, Vec<&'static str>) {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let (mut keys, mut ignored) = (ImageKeys::default(), Vec::new());
        if let Some(text) = aes_hex {
            let mut key = [0u8; 32];
            match hex::decode_to_slice(text.trim(), &mut key) {
                Ok(()) => keys = keys.with_aes256(key),
                Err(_) => ignored.push("image_aes"),
            }
        }
        if let Some(pem) = rsa_pem {
            match rsa::RsaPrivateKey::from_pkcs8_pem(pem)
                .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
            {
                Ok(k) => keys = keys.with_rsa(k),
                Err(_) => ignored.push("image_rsa"),
            }
        }
        (keys, ignored)
    }

    /// The id a manifest names this board's key for `scheme` by, if it holds one.
    pub fn key_id(&self, scheme: Scheme) -> Option<String> {
        match scheme {
            Scheme::Aes256Cbc => self.aes256.as_ref().map(aes256_key_id),
            Scheme::EspEncryptedImg => self.rsa.as_ref().map(|k| rsa_key_id(&k.to_public_key())),
        }
    }
}

/// An AES key's id: the first 8 bytes of SHA-256 over a label and the key, in hex. It names
/// the key without revealing it.
pub fn aes256_key_id(key: &[u8; 32]) -> String {
    short_id(&[b"otarig/image-key/aes-256/v1", key])
}

/// An RSA key's id: the first 8 bytes of SHA-256 over its modulus and exponent, in hex.
pub fn rsa_key_id(key: &rsa::RsaPublicKey) -> String {
    use rsa::traits::PublicKeyParts;
    short_id(&[&key.n().to_bytes_be(), &key.e().to_bytes_be()])
}

fn short_id(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

/// Why an encrypted image could not be decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecryptError {
    /// The board holds no key with the manifest's key id for its scheme.
    NoKey { scheme: Scheme, key_id: String },
    /// The manifest's encryption entry cannot describe this image (lengths, IV).
    Manifest(&'static str),
    /// The esp_encrypted_img header is not one (magic, lengths).
    Header(&'static str),
    /// The wrapped AES key does not decrypt under the board's RSA key.
    KeyUnwrap,
    /// The last block's PKCS#7 padding is wrong (a wrong key or altered ciphertext).
    Padding,
    /// The GCM tag does not match (a wrong key or altered ciphertext).
    Tag,
}

impl fmt::Display for DecryptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecryptError::NoKey { scheme, key_id } => write!(
                f,
                "encrypted ({}) for key {key_id}, which this board does not hold",
                scheme.name()
            ),
            DecryptError::Manifest(why) => write!(f, "manifest's encryption entry: {why}"),
            DecryptError::Header(why) => write!(f, "esp_encrypted_img header: {why}"),
            DecryptError::KeyUnwrap => f.write_str(
                "esp_encrypted_img header: the AES key does not decrypt under this board's RSA key",
            ),
            DecryptError::Padding => {
                f.write_str("AES-256-CBC: bad PKCS#7 padding (wrong key or altered ciphertext)")
            }
            DecryptError::Tag => f.write_str(
                "esp_encrypted_img: AES-GCM tag mismatch (wrong key or altered ciphertext)",
            ),
        }
    }
}

impl core::error::Error for DecryptError {}

/// What [`Decryptor::feed`] and [`Decryptor::finish`] fail with: the ciphertext, or the sink
/// the plaintext went to.
#[derive(Debug)]
pub enum FeedError<E> {
    Decrypt(DecryptError),
    Sink(E),
}

impl<E> From<DecryptError> for FeedError<E> {
    fn from(e: DecryptError) -> Self {
        FeedError::Decrypt(e)
    }
}

/// Check what a manifest's encryption entry says against the plaintext length and the keys
/// this board holds, before anything is fetched.
pub fn check(enc: &Encryption, plain_size: u32, keys: &ImageKeys) -> Result<(), DecryptError> {
    if keys.key_id(enc.scheme).as_deref() != Some(enc.key_id.as_str()) {
        return Err(DecryptError::NoKey {
            scheme: enc.scheme,
            key_id: enc.key_id.clone(),
        });
    }
    if Some(enc.size) != ciphertext_len(enc.scheme, plain_size) {
        return Err(DecryptError::Manifest(
            "the ciphertext length does not fit the image length",
        ));
    }
    if blob_sha256(enc).is_none() {
        return Err(DecryptError::Manifest("sha256 is not 64 hex digits"));
    }
    if enc.scheme == Scheme::Aes256Cbc && manifest_iv(enc).is_none() {
        return Err(DecryptError::Manifest("AES-256-CBC needs a 16-byte hex IV"));
    }
    Ok(())
}

/// The ciphertext length of a `plain`-byte image in `scheme` (None: too large).
pub fn ciphertext_len(scheme: Scheme, plain: u32) -> Option<u32> {
    match scheme {
        Scheme::Aes256Cbc => (plain / BLOCK as u32)
            .checked_add(1)?
            .checked_mul(BLOCK as u32),
        Scheme::EspEncryptedImg => plain.checked_add(esp_img::HEADER_LEN as u32),
    }
}

/// The ciphertext's address in the release store.
pub fn blob_sha256(enc: &Encryption) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(&enc.sha256, &mut out).ok()?;
    Some(out)
}

fn manifest_iv(enc: &Encryption) -> Option<[u8; BLOCK]> {
    let mut iv = [0u8; BLOCK];
    hex::decode_to_slice(enc.iv.as_deref()?, &mut iv).ok()?;
    Some(iv)
}

/// Whether a download in `scheme` can resume after a power cut (see the module docs).
pub const fn resumable(scheme: Scheme) -> bool {
    matches!(scheme, Scheme::Aes256Cbc)
}

/// A ciphertext stream being decrypted. Feed it the ciphertext from [`Self::next_offset`] on,
/// in pieces of any size; it hands plaintext to a sink in order.
pub struct Decryptor {
    /// Ciphertext offset of the next byte expected.
    at: u32,
    /// Ciphertext length.
    total: u32,
    /// The image's length: the plaintext must come to exactly this.
    plain_size: u32,
    /// Bytes of an incomplete block (or of the header) carried to the next piece.
    carry: [u8; BLOCK],
    carry_len: usize,
    state: State,
}

impl fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decryptor")
            .field("at", &self.at)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

enum State {
    /// CBC, resuming: the next 16 bytes are the previous ciphertext block, the IV.
    CbcIv {
        key: [u8; 32],
    },
    Cbc(Box<cbc::Decryptor<Aes256>>),
    /// esp_encrypted_img: collecting the header.
    Header {
        key: Arc<rsa::RsaPrivateKey>,
        header: Box<[u8; esp_img::HEADER_LEN]>,
    },
    Gcm(Box<Gcm>),
}

/// AES-256-GCM in CTR + GHASH halves, as `aes-gcm` 0.10 computes them for a 16-byte nonce.
struct Gcm {
    ctr: ctr::Ctr32BE<Aes256>,
    ghash: GHash,
    /// E_K(J0), XORed into the tag.
    tag_mask: [u8; BLOCK],
    expected_tag: [u8; BLOCK],
    ciphertext_len: u64,
}

impl Gcm {
    fn new(key: &[u8; 32], iv: &[u8; BLOCK], expected_tag: [u8; BLOCK]) -> Gcm {
        let cipher = Aes256::new(GenericArray::from_slice(key));
        let mut h = GenericArray::default();
        cipher.encrypt_block(&mut h);
        let ghash = GHash::new(&h);
        // J0 for a nonce that is not 12 bytes: GHASH(IV ‖ 0^64 ‖ [len(IV) in bits]_64).
        let mut j0 = ghash.clone();
        j0.update_padded(iv);
        let mut lengths = ghash::Block::default();
        lengths[8..].copy_from_slice(&((BLOCK as u64) * 8).to_be_bytes());
        j0.update(&[lengths]);
        let j0 = j0.finalize();
        let mut ctr = ctr::Ctr32BE::<Aes256>::new(GenericArray::from_slice(key), &j0);
        let mut tag_mask = [0u8; BLOCK];
        ctr.apply_keystream(&mut tag_mask);
        Gcm {
            ctr,
            ghash,
            tag_mask,
            expected_tag,
            ciphertext_len: 0,
        }
    }

    /// Decrypt whole blocks in place.
    fn blocks(&mut self, data: &mut [u8]) {
        // Whole blocks only, so nothing is padded: GHASH takes them all in one call.
        self.ghash.update_padded(data);
        self.ciphertext_len += data.len() as u64;
        self.ctr.apply_keystream(data);
    }

    /// Decrypt the last, partial block in place and check the tag.
    fn finish(mut self, tail: &mut [u8]) -> Result<(), DecryptError> {
        self.ghash.update_padded(tail);
        self.ciphertext_len += tail.len() as u64;
        self.ctr.apply_keystream(tail);
        let mut lengths = ghash::Block::default();
        lengths[8..].copy_from_slice(&(self.ciphertext_len * 8).to_be_bytes());
        self.ghash.update(&[lengths]);
        let mut tag = self.ghash.finalize();
        for (t, m) in tag.iter_mut().zip(self.tag_mask) {
            *t ^= m;
        }
        if bool::from(tag.as_slice().ct_eq(&self.expected_tag)) {
            Ok(())
        } else {
            Err(DecryptError::Tag)
        }
    }
}

/// Plaintext is handed out in pieces of at most this many bytes (a stack buffer).
const SCRATCH: usize = 512;

impl Decryptor {
    /// Decrypt `enc` (already [`check`]ed) for a `plain_size`-byte image, the plaintext
    /// resuming at `from` (a multiple of 16; 0 for a scheme that cannot resume).
    pub fn new(
        enc: &Encryption,
        plain_size: u32,
        keys: &ImageKeys,
        from: u32,
    ) -> Result<Decryptor, DecryptError> {
        check(enc, plain_size, keys)?;
        let no_key = || DecryptError::NoKey {
            scheme: enc.scheme,
            key_id: enc.key_id.clone(),
        };
        let (at, state) = match enc.scheme {
            Scheme::Aes256Cbc => {
                let key = keys.aes256.ok_or_else(no_key)?;
                let iv = manifest_iv(enc).ok_or(DecryptError::Manifest("bad IV"))?;
                if !from.is_multiple_of(BLOCK as u32) || from > plain_size {
                    return Err(DecryptError::Manifest("resume point off a block boundary"));
                }
                if from == 0 {
                    (0, State::Cbc(Box::new(cbc_decryptor(&key, &iv))))
                } else {
                    (from - BLOCK as u32, State::CbcIv { key })
                }
            }
            Scheme::EspEncryptedImg => {
                if from != 0 {
                    return Err(DecryptError::Manifest("esp_encrypted_img cannot resume"));
                }
                let key = keys.rsa.clone().ok_or_else(no_key)?;
                let header = Box::new([0u8; esp_img::HEADER_LEN]);
                (0, State::Header { key, header })
            }
        };
        Ok(Decryptor {
            at,
            total: enc.size,
            plain_size,
            carry: [0; BLOCK],
            carry_len: 0,
            state,
        })
    }

    /// Ciphertext offset of the next byte this decryptor takes.
    pub fn next_offset(&self) -> u32 {
        self.at
    }

    /// Ciphertext length.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Take the ciphertext bytes at [`Self::next_offset`] (the caller cuts them at
    /// [`Self::total`]); plaintext goes to `out` in order.
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        out: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        let room = (self.total - self.at) as usize;
        data = &data[..data.len().min(room)];
        while !data.is_empty() {
            if let Some(rest) = self.take_prefix(data)? {
                data = rest;
                continue;
            }
            let mut buf = [0u8; SCRATCH];
            let n = self.carry_len;
            buf[..n].copy_from_slice(&self.carry[..n]);
            let take = data.len().min(SCRATCH - n);
            buf[n..n + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            self.at += take as u32;
            let filled = n + take;
            let whole = filled / BLOCK * BLOCK;
            self.carry_len = filled - whole;
            self.carry[..self.carry_len].copy_from_slice(&buf[whole..filled]);
            let plain = self.blocks(&mut buf[..whole])?;
            out(plain).map_err(FeedError::Sink)?;
        }
        Ok(())
    }

    /// The CBC IV or the esp_encrypted_img header, taken before any block; `Some(rest)` when
    /// bytes went there.
    fn take_prefix<'d, E>(&mut self, data: &'d [u8]) -> Result<Option<&'d [u8]>, FeedError<E>> {
        match &mut self.state {
            State::CbcIv { key } => {
                let n = (BLOCK - self.carry_len).min(data.len());
                self.carry[self.carry_len..self.carry_len + n].copy_from_slice(&data[..n]);
                self.carry_len += n;
                self.at += n as u32;
                if self.carry_len == BLOCK {
                    self.state = State::Cbc(Box::new(cbc_decryptor(key, &self.carry)));
                    self.carry_len = 0;
                }
                Ok(Some(&data[n..]))
            }
            State::Header { header, .. } => {
                let have = self.at as usize;
                let n = (esp_img::HEADER_LEN - have).min(data.len());
                header[have..have + n].copy_from_slice(&data[..n]);
                self.at += n as u32;
                if self.at as usize == esp_img::HEADER_LEN {
                    self.open_header()?;
                }
                Ok(Some(&data[n..]))
            }
            State::Cbc(_) | State::Gcm(_) => Ok(None),
        }
    }

    /// `esp_encrypted_img`'s header is complete: unwrap the key, start GCM.
    fn open_header(&mut self) -> Result<(), DecryptError> {
        let State::Header { key, header } = &self.state else {
            return Ok(());
        };
        let field = |r: core::ops::Range<usize>| &header[r];
        let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if magic != esp_img::MAGIC {
            return Err(DecryptError::Header(
                "bad magic (not an esp_encrypted_img image)",
            ));
        }
        let size = field(esp_img::BIN_SIZE);
        let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
        if size != self.plain_size {
            return Err(DecryptError::Header(
                "its image length differs from the manifest's",
            ));
        }
        let aes_key = key
            .decrypt(rsa::Pkcs1v15Encrypt, field(esp_img::KEY))
            .map_err(|_| DecryptError::KeyUnwrap)?;
        let aes_key: [u8; 32] = aes_key
            .as_slice()
            .try_into()
            .map_err(|_| DecryptError::KeyUnwrap)?;
        let mut iv = [0u8; BLOCK];
        iv.copy_from_slice(field(esp_img::IV));
        let mut tag = [0u8; BLOCK];
        tag.copy_from_slice(field(esp_img::TAG));
        self.state = State::Gcm(Box::new(Gcm::new(&aes_key, &iv, tag)));
        Ok(())
    }

    /// Decrypt whole blocks in place; the plaintext to hand out.
    fn blocks<'b>(&mut self, buf: &'b mut [u8]) -> Result<&'b [u8], DecryptError> {
        match &mut self.state {
            State::Cbc(d) => {
                for block in buf.chunks_exact_mut(BLOCK) {
                    d.decrypt_block_mut(GenericArray::from_mut_slice(block));
                }
                if self.at < self.total || buf.is_empty() {
                    return Ok(buf);
                }
                // The ciphertext's last block: strip its padding, which must leave exactly
                // the image (valid padding of another length is a wrong key or altered
                // ciphertext too, and would write past the image or short of it).
                let last = buf.len() - BLOCK;
                let kept = Pkcs7::raw_unpad(&buf[last..])
                    .map_err(|_| DecryptError::Padding)?
                    .len();
                let pad = (BLOCK - kept) as u32;
                if self.total - pad != self.plain_size {
                    return Err(DecryptError::Padding);
                }
                Ok(&buf[..last + kept])
            }
            State::Gcm(g) => {
                g.blocks(buf);
                Ok(buf)
            }
            State::CbcIv { .. } | State::Header { .. } => Ok(&buf[..0]),
        }
    }

    /// The whole ciphertext was fed: hand out the last partial block and check the GCM tag,
    /// or that CBC saw its padded last block.
    pub fn finish<E>(
        self,
        out: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        if self.at < self.total {
            return Err(DecryptError::Manifest("the ciphertext ended early").into());
        }
        match self.state {
            State::Gcm(g) => {
                let mut tail = self.carry;
                let tail = &mut tail[..self.carry_len];
                g.finish(tail)?;
                out(tail).map_err(FeedError::Sink)
            }
            State::Cbc(_) if self.carry_len == 0 => Ok(()),
            _ => Err(DecryptError::Manifest("the ciphertext ended inside a block").into()),
        }
    }
}

fn cbc_decryptor(key: &[u8; 32], iv: &[u8; BLOCK]) -> cbc::Decryptor<Aes256> {
    cbc::Decryptor::new(GenericArray::from_slice(key), GenericArray::from_slice(iv))
}

#[cfg(test)]
mod tests;
