//! The chunked OTA protocol, the board's half: per-device keys, chunk frames and the check
//! every chunk passes before a byte of it reaches flash.
//!
//! The server cuts a blob (an image, a ciphertext or a delta patch) into [`CHUNK_SIZE`]
//! chunks. A board opens a session for one release (`POST /ota/check`), asks for chunk *n*
//! (`GET /ota/chunk`) and gets a [`frame`]: the session, the release's sequence number, *n*,
//! the bytes, and an HMAC-SHA256 over all of them under the board's own key. The board takes
//! a chunk only when
//!
//! - its tag verifies under the board's key (`chunk-mac`: forged, altered, re-sized or
//!   re-keyed bytes, or a chunk made for another device), and then
//! - it is the chunk asked for: this session, this release, index *n*, the size chunk *n* has
//!   (`chunk-sequence`: replayed from another session or release, reordered, duplicated).
//!
//! **Why a key per device.** Boards without flash encryption give their NVS up to anyone with
//! a serial cable. With one fleet key, the key read out of one board would let its holder
//! forge chunks for every board; with keys derived by HKDF-SHA256 from the fleet's pre-shared
//! key and the device id ([`ChunkKey::derive`]), it forges chunks for that board only. The
//! server keeps the one fleet key and derives a board's key when the board opens a session;
//! a board holds only its own (`otarig pki nvs --chunk-psk` writes it, NVS key `chunk_key`).
//!
//! The tag is not what makes an image trustworthy (the signed manifest's SHA-256 is, checked
//! before the boot partition changes); it stops bytes that are not the server's from being
//! written at all, and lets the board name the attack.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::event::Check;

/// Bytes in every chunk but a blob's last.
pub const CHUNK_SIZE: u32 = 1024;
/// A session id's length.
pub const SESSION_LEN: usize = 16;
/// The HMAC-SHA256 tag's length.
pub const TAG_LEN: usize = 32;
/// Magic, session, sequence (u64), index (u32), length (u16); all integers big-endian.
pub const HEADER_LEN: usize = 4 + SESSION_LEN + 8 + 4 + 2;
/// The largest frame a board accepts.
pub const MAX_FRAME: usize = HEADER_LEN + CHUNK_SIZE as usize + TAG_LEN;

const MAGIC: [u8; 4] = *b"OTC1";
/// HKDF salt: the key derivation's domain.
const KDF_SALT: &[u8] = b"otarig chunk key v1";
/// Put in front of every tagged message, so a tag means nothing in another protocol.
const TAG_LABEL: &[u8] = b"otarig chunk v1";

/// A board's chunk key (32 bytes). Debug output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkKey([u8; 32]);

impl core::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

impl ChunkKey {
    /// `HKDF-SHA256(salt = "otarig chunk key v1", ikm = fleet key, info = device id)`, 32
    /// bytes (RFC 5869).
    pub fn derive(fleet_key: &[u8], device: &str) -> ChunkKey {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(KDF_SALT), fleet_key);
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 255 x 32: expand cannot fail.
        if hk.expand(device.as_bytes(), &mut key).is_err() {
            key = [0; 32];
        }
        ChunkKey(key)
    }

    pub const fn from_bytes(key: [u8; 32]) -> ChunkKey {
        ChunkKey(key)
    }

    /// From 64 hex digits (what NVS holds); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<ChunkKey> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).ok()?;
        Some(ChunkKey(key))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC pads a key shorter than SHA-256's 64-byte block with zeros (RFC 2104), so the
        // padded key gives the same MAC, through the constructor that cannot fail.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.0);
        <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
    }
}

/// Where a chunk belongs: the board it was made for, the session, the release and its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place<'a> {
    pub device: &'a str,
    pub session: [u8; SESSION_LEN],
    pub sequence: u64,
    pub index: u32,
}

/// The header fields of a frame, in their wire order.
fn header(place: &Place<'_>, len: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..20].copy_from_slice(&place.session);
    h[20..28].copy_from_slice(&place.sequence.to_be_bytes());
    h[28..32].copy_from_slice(&place.index.to_be_bytes());
    h[32..34].copy_from_slice(&len.to_be_bytes());
    h
}

/// The tag: HMAC-SHA256(key, label ‖ device-id length (u16) ‖ device id ‖ header ‖ data).
/// The device id is inside although the key is the device's already, so a chunk stays bound
/// to its board even where a deployment gives boards one key.
fn tagger(key: &ChunkKey, place: &Place<'_>, data: &[u8]) -> Hmac<Sha256> {
    let mut m = key.mac();
    m.update(TAG_LABEL);
    m.update(&(place.device.len() as u16).to_be_bytes());
    m.update(place.device.as_bytes());
    m.update(&header(place, data.len() as u16));
    m.update(data);
    m
}

/// Host side: the frame of `data` (at most [`CHUNK_SIZE`] bytes) at `place`.
pub fn frame(key: &ChunkKey, place: &Place<'_>, data: &[u8]) -> Vec<u8> {
    let data = &data[..data.len().min(CHUNK_SIZE as usize)];
    let tag = tagger(key, place, data).finalize().into_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() + TAG_LEN);
    out.extend_from_slice(&header(place, data.len() as u16));
    out.extend_from_slice(data);
    out.extend_from_slice(&tag);
    out
}

/// Why a chunk was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a frame at all: short, another magic, a length that does not add up.
    Malformed(&'static str),
    /// The tag does not verify under this board's key.
    Tag { index: u32 },
    /// A genuine chunk of another session (replayed).
    OtherSession { index: u32 },
    /// A genuine chunk of another release.
    OtherRelease { index: u32, sequence: u64 },
    /// A genuine chunk, not the one asked for (reordered, duplicated, skipped).
    OutOfOrder { expected: u32, got: u32 },
    /// A genuine chunk of another size than chunk `index` has.
    Size {
        index: u32,
        len: usize,
        expected: usize,
    },
}

impl ChunkError {
    /// The check that refused the chunk.
    pub fn check(&self) -> Check {
        match self {
            ChunkError::Malformed(_) | ChunkError::Tag { .. } => Check::ChunkMac,
            _ => Check::ChunkSequence,
        }
    }
}

impl core::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChunkError::Malformed(why) => write!(f, "not a chunk frame: {why}"),
            ChunkError::Tag { index } => write!(
                f,
                "chunk {index}: HMAC-SHA256 does not verify under this board's key (altered, forged, or made for another device)"
            ),
            ChunkError::OtherSession { index } => {
                write!(f, "chunk {index} belongs to another session (replayed)")
            }
            ChunkError::OtherRelease { index, sequence } => write!(
                f,
                "chunk {index} belongs to release sequence {sequence}, not the one being fetched"
            ),
            ChunkError::OutOfOrder { expected, got } => {
                write!(f, "chunk {got} came where chunk {expected} was asked for (reordered or duplicated)")
            }
            ChunkError::Size {
                index,
                len,
                expected,
            } => write!(f, "chunk {index} has {len} bytes; it has {expected}"),
        }
    }
}

/// A frame's fields, the tag still to verify.
struct Frame<'a> {
    session: [u8; SESSION_LEN],
    sequence: u64,
    index: u32,
    data: &'a [u8],
    tag: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<Frame<'_>, ChunkError> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes.len() > MAX_FRAME {
        return Err(ChunkError::Malformed("wrong length"));
    }
    if bytes[..4] != MAGIC {
        return Err(ChunkError::Malformed("wrong magic"));
    }
    let mut session = [0u8; SESSION_LEN];
    session.copy_from_slice(&bytes[4..20]);
    let word = |r: core::ops::Range<usize>| bytes[r].iter().fold(0u64, |a, b| a << 8 | *b as u64);
    let len = word(32..34) as usize;
    if HEADER_LEN + len + TAG_LEN != bytes.len() {
        return Err(ChunkError::Malformed(
            "length field disagrees with the frame",
        ));
    }
    Ok(Frame {
        session,
        sequence: word(20..28),
        index: word(28..32) as u32,
        data: &bytes[HEADER_LEN..HEADER_LEN + len],
        tag: &bytes[HEADER_LEN + len..],
    })
}

/// A session as the board holds it: what the next chunk must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: [u8; SESSION_LEN],
    pub sequence: u64,
    /// The blob's size in bytes.
    pub size: u32,
    /// The index of the chunk asked for next.
    pub next: u32,
}

impl Session {
    /// Chunks in the blob.
    pub fn chunks(&self) -> u32 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    /// Bytes chunk `index` has.
    pub fn len_of(&self, index: u32) -> usize {
        let start = index.saturating_mul(CHUNK_SIZE);
        self.size.saturating_sub(start).min(CHUNK_SIZE) as usize
    }

    /// The bytes of the frame, if it is the next chunk of this session and its tag verifies
    /// under `key` for `device`; the session then expects the chunk after it.
    pub fn take<'f>(
        &mut self,
        key: &ChunkKey,
        device: &str,
        bytes: &'f [u8],
    ) -> Result<&'f [u8], ChunkError> {
        let f = parse(bytes)?;
        let place = Place {
            device,
            session: f.session,
            sequence: f.sequence,
            index: f.index,
        };
        if tagger(key, &place, f.data).verify_slice(f.tag).is_err() {
            return Err(ChunkError::Tag { index: f.index });
        }
        if f.session != self.id {
            return Err(ChunkError::OtherSession { index: f.index });
        }
        if f.sequence != self.sequence {
            return Err(ChunkError::OtherRelease {
                index: f.index,
                sequence: f.sequence,
            });
        }
        if f.index != self.next {
            return Err(ChunkError::OutOfOrder {
                expected: self.next,
                got: f.index,
            });
        }
        let expected = self.len_of(f.index);
        if f.data.len() != expected || expected == 0 {
            return Err(ChunkError::Size {
                index: f.index,
                len: f.data.len(),
                expected,
            });
        }
        self.next += 1;
        Ok(f.data)
    }
}

/// The answer to `POST /ota/check`:
/// `{"v":1,"session":"<32 hex>","sequence":7,"size":123456,"chunk_size":1024,"chunks":121}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionAnswer {
    pub v: u32,
    pub session: String,
    pub sequence: u64,
    pub size: u32,
    pub chunk_size: u32,
    pub chunks: u32,
}

/// Read a `/ota/check` answer for the release `sequence` whose blob has `size` bytes; the
/// session starts at chunk `from`.
pub fn open_session(bytes: &[u8], sequence: u64, size: u32, from: u32) -> Result<Session, String> {
    if bytes.len() > crate::protocol::MAX_PAYLOAD {
        return Err("session answer too large".to_string());
    }
    let a: SessionAnswer = serde_json::from_slice(bytes)
        .map_err(|e| alloc::format!("session answer is not the expected JSON: {e}"))?;
    let mut id = [0u8; SESSION_LEN];
    if a.v != crate::protocol::VERSION || hex::decode_to_slice(&a.session, &mut id).is_err() {
        return Err("session answer: wrong format version or session id".to_string());
    }
    if a.sequence != sequence || a.size != size || a.chunk_size != CHUNK_SIZE {
        return Err(alloc::format!(
            "session answer for sequence {} ({} bytes in {}-byte chunks); asked for sequence {sequence} ({size} bytes in {CHUNK_SIZE}-byte chunks)",
            a.sequence, a.size, a.chunk_size
        ));
    }
    let s = Session {
        id,
        sequence,
        size,
        next: from,
    };
    if a.chunks != s.chunks() || from >= s.chunks() {
        return Err(alloc::format!(
            "session answer says {} chunks; {size} bytes make {}, starting at {from}",
            a.chunks,
            s.chunks()
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests;
