//! The agent's persistent state, written power-safely to its own data partition.
//!
//! Two copies live in two 4 KiB sectors. A write goes to the sector holding the *older* copy:
//! erase it, then program one 384-byte record carrying a write counter and a CRC-32. A power cut tears at most the copy being written; the other still has a valid
//! CRC, so reading picks the valid copy with the highest counter and loses at most the write
//! that was cut. This is the same two-sector scheme ESP-IDF uses for `otadata`.
//!
//! The record says what the agent was doing (idle, downloading, installed and awaiting
//! confirmation), how far a download durably got, the highest manifest sequence number ever
//! accepted (replay protection across reboots), the last signed command acted on, a
//! bounded set of images that failed on this board, and how far the board's trust moved: the
//! newest key set, revocation list and timestamp it took ([`crate::trust`]).

use crate::platform::{EspResult, Platform};

pub const SECTOR: u32 = 4096;
/// "OTJ3": the current layout.
const MAGIC: u32 = 0x334A_544F;
/// "OTJ2": the second layout (320 bytes: no trust high-water marks), read and rewritten as
/// the current one on the next store.
const MAGIC_V2: u32 = 0x324A_544F;
/// "OTRJ": the first layout (224 bytes, one known-bad image), read once and rewritten on the
/// next store, so an update of the agent keeps the board's replay protection.
const MAGIC_V1: u32 = 0x4A52_544F;
pub const RECORD_LEN: usize = 384;
const V2_LEN: usize = 320;

/// What the agent was doing when the record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Image bytes `[0, checkpoint)` of release `target` are durably in `slot_addr`.
    Downloading,
    /// The image is verified and the boot partition was (being) switched to it.
    Installed,
}

/// Images that failed on this board: rolled back, refused after download, or never switched
/// to. A bounded set, newest first: with [`KnownBad::LEN`] entries, a signed release that
/// failed stays refused while fewer than that many later releases failed after it (so two
/// failed releases replayed alternately are both refused). Entries are the first 16 bytes of
/// the image's SHA-256: the hash comes from a signed manifest, so a collision would need a
/// second preimage of 128 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownBad([[u8; 16]; KnownBad::LEN]);

impl KnownBad {
    pub const LEN: usize = 8;
    const EMPTY: [u8; 16] = [0; 16];

    fn prefix(sha256: &[u8; 32]) -> [u8; 16] {
        let mut p = [0; 16];
        p.copy_from_slice(&sha256[..16]);
        p
    }

    pub fn contains(&self, sha256: &[u8; 32]) -> bool {
        let p = Self::prefix(sha256);
        p != Self::EMPTY && self.0.contains(&p)
    }

    /// The set with `sha256` as its newest entry (moved to the front if already there; the
    /// oldest entry drops out when the set is full).
    pub fn with(mut self, sha256: &[u8; 32]) -> KnownBad {
        let p = Self::prefix(sha256);
        let at = self.0.iter().position(|e| *e == p).unwrap_or(Self::LEN - 1);
        self.0.copy_within(0..at, 1);
        self.0[0] = p;
        self
    }

    /// Entries in use, newest first.
    pub fn len(&self) -> usize {
        self.0.iter().filter(|e| **e != Self::EMPTY).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One persisted record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    /// Download attempts that ended in a hash or validation failure for `target_seq`.
    pub attempts: u8,
    /// Times `set_boot_partition` was retried after a reboot for `target_seq`.
    pub installs: u8,
    /// Times the image of `target_seq` rolled back because it could not reach the network
    /// before its confirmation deadline (see [`Record::unreachable`]).
    pub outages: u8,
    /// Set by the installed image just before it rolls itself back for want of a network, so
    /// the previous image, booted again, retries the release instead of marking it known-bad.
    pub unreachable: bool,
    pub target_seq: u64,
    pub highest_seq: u64,
    pub size: u32,
    pub checkpoint: u32,
    pub slot_addr: u32,
    pub sha256: [u8; 32],
    pub known_bad: KnownBad,
    pub version: [u8; 32],
    /// Downloading a delta patch (SHA-256 `patch_sha256`) rather than the full image.
    pub delta: bool,
    pub patch_sha256: [u8; 32],
    /// Where the patch applier resumes; its `new_written` equals `checkpoint`.
    pub resume: crate::delta::Resume,
    /// The id of the last signed command acted on: a command must carry a higher one, so a
    /// retained or replayed command never acts twice, across reboots too.
    pub last_command: u64,
    /// The newest key set adopted: its version (0: the firmware's own keys) and digest.
    pub keys_version: u32,
    pub keys_digest: [u8; 16],
    /// The highest revocation-list serial seen when an install started.
    pub revocations_serial: u64,
    /// The `issued_at` of the timestamp an install last started under (Unix seconds).
    pub timestamp_at: u64,
}

impl Record {
    /// A board that never updated.
    pub const EMPTY: Record = Record {
        phase: Phase::Idle,
        attempts: 0,
        installs: 0,
        outages: 0,
        unreachable: false,
        target_seq: 0,
        highest_seq: 0,
        size: 0,
        checkpoint: 0,
        slot_addr: 0,
        sha256: [0; 32],
        known_bad: KnownBad([[0; 16]; KnownBad::LEN]),
        version: [0; 32],
        delta: false,
        patch_sha256: [0; 32],
        resume: crate::delta::Resume {
            block_offset: 0,
            block_index: 0,
            raw_skip: 0,
            new_written: 0,
            old_pos: 0,
            phase: 0,
            remaining: 0,
            pending_copy: 0,
            seek: 0,
        },
        last_command: 0,
        keys_version: 0,
        keys_digest: [0; 16],
        revocations_serial: 0,
        timestamp_at: 0,
    };

    fn encode(&self, counter: u32) -> [u8; RECORD_LEN] {
        let mut b = [0xFFu8; RECORD_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&counter.to_le_bytes());
        b[8] = match self.phase {
            Phase::Idle => 0,
            Phase::Downloading => 1,
            Phase::Installed => 2,
        };
        b[9] = self.attempts;
        b[10] = self.installs;
        b[11] = self.outages;
        b[12..20].copy_from_slice(&self.target_seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.highest_seq.to_le_bytes());
        b[28..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..36].copy_from_slice(&self.checkpoint.to_le_bytes());
        b[36..40].copy_from_slice(&self.slot_addr.to_le_bytes());
        b[40..72].copy_from_slice(&self.sha256);
        b[72..104].copy_from_slice(&self.version);
        b[104] = self.delta as u8;
        b[105] = self.unreachable as u8;
        b[106..108].copy_from_slice(&[0; 2]);
        b[108..140].copy_from_slice(&self.patch_sha256);
        self.resume.encode(&mut b[140..180]);
        b[180..188].copy_from_slice(&self.last_command.to_le_bytes());
        for (i, e) in self.known_bad.0.iter().enumerate() {
            b[188 + 16 * i..204 + 16 * i].copy_from_slice(e);
        }
        b[316..320].copy_from_slice(&self.keys_version.to_le_bytes());
        b[320..336].copy_from_slice(&self.keys_digest);
        b[336..344].copy_from_slice(&self.revocations_serial.to_le_bytes());
        b[344..352].copy_from_slice(&self.timestamp_at.to_le_bytes());
        let crc = crc32fast::hash(&b[..RECORD_LEN - 4]);
        b[RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A stored copy: its write counter and record, or None if it is not a valid record of
    /// either layout (erased, torn, corrupted). Public for the fuzz targets.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Option<(u32, Record)> {
        let f = Fields(b);
        let (counter, rec) = match f.u32_at(0) {
            MAGIC if f.u32_at(RECORD_LEN - 4) == crc32fast::hash(&b[..RECORD_LEN - 4]) => {
                Self::decode_v2_fields(f)?
            }
            MAGIC_V2 if f.u32_at(V2_LEN - 4) == crc32fast::hash(&b[..V2_LEN - 4]) => {
                return Self::decode_v2_fields(f);
            }
            MAGIC_V1 => return Self::decode_v1(f),
            _ => return None,
        };
        let mut keys_digest = [0; 16];
        keys_digest.copy_from_slice(&b[320..336]);
        Some((
            counter,
            Record {
                keys_version: f.u32_at(316),
                keys_digest,
                revocations_serial: f.u64_at(336),
                timestamp_at: f.u64_at(344),
                ..rec
            },
        ))
    }

    /// The fields the second and current layouts share, at the same places.
    fn decode_v2_fields(f: Fields<'_>) -> Option<(u32, Record)> {
        let b = f.0;
        let mut known_bad = KnownBad::default();
        for (i, e) in known_bad.0.iter_mut().enumerate() {
            e.copy_from_slice(&b[188 + 16 * i..204 + 16 * i]);
        }
        Some((
            f.u32_at(4),
            Record {
                outages: b[11],
                unreachable: b[105] == 1,
                known_bad,
                version: f.arr(72),
                delta: b[104] == 1,
                patch_sha256: f.arr(108),
                resume: crate::delta::Resume::decode(&b[140..180]),
                last_command: f.u64_at(180),
                ..f.head()?
            },
        ))
    }

    /// The first layout: the same fields minus outages, commands and all but one known-bad.
    fn decode_v1(f: Fields<'_>) -> Option<(u32, Record)> {
        let b = f.0;
        if f.u32_at(220) != crc32fast::hash(&b[..220]) {
            return None;
        }
        let mut known_bad = KnownBad::default();
        if f.arr(72) != [0; 32] {
            known_bad = known_bad.with(&f.arr(72));
        }
        Some((
            f.u32_at(4),
            Record {
                known_bad,
                version: f.arr(104),
                delta: b[136] == 1,
                patch_sha256: f.arr(140),
                resume: crate::delta::Resume::decode(&b[172..212]),
                ..f.head()?
            },
        ))
    }
}

/// Little-endian fields of a stored record.
#[derive(Clone, Copy)]
struct Fields<'a>(&'a [u8; RECORD_LEN]);

impl Fields<'_> {
    fn u32_at(self, i: usize) -> u32 {
        let b = self.0;
        u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
    }

    fn u64_at(self, i: usize) -> u64 {
        u64::from(self.u32_at(i)) | u64::from(self.u32_at(i + 4)) << 32
    }

    fn arr(self, i: usize) -> [u8; 32] {
        let mut x = [0u8; 32];
        x.copy_from_slice(&self.0[i..i + 32]);
        x
    }

    /// Bytes 8..72, laid out alike in both layouts; the other fields empty.
    fn head(self) -> Option<Record> {
        let b = self.0;
        let phase = match b[8] {
            0 => Phase::Idle,
            1 => Phase::Downloading,
            2 => Phase::Installed,
            _ => return None,
        };
        Some(Record {
            phase,
            attempts: b[9],
            installs: b[10],
            target_seq: self.u64_at(12),
            highest_seq: self.u64_at(20),
            size: self.u32_at(28),
            checkpoint: self.u32_at(32),
            slot_addr: self.u32_at(36),
            sha256: self.arr(40),
            ..Record::EMPTY
        })
    }
}

/// The in-RAM view of the journal: the current record and where the next write goes.
#[derive(Clone, Debug)]
pub struct Journal {
    record: Record,
    counter: u32,
    /// Sector (0 or 1) holding the current record; the next write goes to the other one.
    current: u8,
}

impl Journal {
    /// Read both copies; pick the valid one with the highest counter (none: a fresh board).
    pub fn load<P: Platform>(p: &mut P) -> EspResult<Journal> {
        let mut best: Option<(u32, Record, u8)> = None;
        for sector in 0..2u8 {
            let mut buf = [0u8; RECORD_LEN];
            p.state_read(sector as u32 * SECTOR, &mut buf)?;
            if let Some((counter, rec)) = Record::decode(&buf) {
                let newer = match &best {
                    None => true,
                    // Counters wrap after 2^32 writes; compare in serial-number arithmetic.
                    Some((c, _, _)) => (counter.wrapping_sub(*c) as i32) > 0,
                };
                if newer {
                    best = Some((counter, rec, sector));
                }
            }
        }
        Ok(match best {
            Some((counter, record, current)) => Journal {
                record,
                counter,
                current,
            },
            // Nothing valid: the next write lands in sector 0.
            None => Journal {
                record: Record::EMPTY,
                counter: 0,
                current: 1,
            },
        })
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Persist `record`: erase the older copy's sector and program the new record there.
    pub fn store<P: Platform>(&mut self, p: &mut P, record: Record) -> EspResult<()> {
        let target = if cfg!(feature = "fault-injection") && crate::fault::single_copy_journal() {
            // Deliberately broken variant: always rewrite sector 0 in place, so a power cut
            // between its erase and program leaves no valid copy at all.
            0
        } else {
            self.current ^ 1
        };
        let counter = self.counter.wrapping_add(1);
        let bytes = record.encode(counter);
        p.state_erase_sector(target as u32 * SECTOR)?;
        p.state_write(target as u32 * SECTOR, &bytes)?;
        self.record = record;
        self.counter = counter;
        self.current = target;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_crc_catches_a_flipped_bit() {
        let rec = Record {
            phase: Phase::Downloading,
            attempts: 2,
            installs: 1,
            target_seq: 7,
            highest_seq: 6,
            size: 1 << 20,
            checkpoint: 65536,
            slot_addr: 0x110000,
            sha256: [3; 32],
            outages: 1,
            unreachable: true,
            known_bad: KnownBad::default().with(&[4; 32]).with(&[6; 32]),
            version: [b'v'; 32],
            delta: true,
            patch_sha256: [5; 32],
            resume: crate::delta::Resume {
                block_offset: 900,
                block_index: 3,
                raw_skip: 17,
                new_written: 65536,
                old_pos: 70000,
                phase: 2,
                remaining: 12,
                pending_copy: 0,
                seek: -40,
            },
            last_command: 1_700_000_000_123,
            keys_version: 3,
            keys_digest: [9; 16],
            revocations_serial: 12,
            timestamp_at: 1_800_000_000,
        };
        let mut bytes = rec.encode(42);
        assert_eq!(Record::decode(&bytes), Some((42, rec)));
        bytes[33] ^= 0x10;
        assert_eq!(Record::decode(&bytes), None);
    }

    /// A v1 record, as the first agent wrote it: replay protection and the known-bad image
    /// must survive an update of the agent itself.
    #[test]
    fn a_first_layout_record_is_read() {
        let mut b = [0xFFu8; RECORD_LEN];
        b[0..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
        b[4..8].copy_from_slice(&9u32.to_le_bytes());
        b[8] = 0;
        b[9..12].copy_from_slice(&[1, 0, 0]);
        b[12..20].copy_from_slice(&5u64.to_le_bytes());
        b[20..28].copy_from_slice(&4u64.to_le_bytes());
        b[28..72].fill(0);
        b[72..104].copy_from_slice(&[7; 32]);
        b[104..212].fill(0);
        b[192] = 2;
        b[204..212].copy_from_slice(&(-3i64).to_le_bytes());
        let crc = crc32fast::hash(&b[..220]);
        b[220..224].copy_from_slice(&crc.to_le_bytes());
        let (counter, rec) = Record::decode(&b).expect("v1 record");
        assert_eq!(counter, 9);
        assert_eq!((rec.attempts, rec.target_seq, rec.highest_seq), (1, 5, 4));
        assert!(rec.known_bad.contains(&[7; 32]));
        assert_eq!(rec.known_bad.len(), 1);
        assert_eq!((rec.resume.phase, rec.resume.seek), (2, -3));
        b[100] ^= 1;
        assert_eq!(Record::decode(&b), None, "the v1 CRC is checked");
    }

    /// A v2 record (320 bytes) keeps everything but the trust marks, which start at zero.
    #[test]
    fn a_second_layout_record_is_read() {
        let rec = Record {
            highest_seq: 41,
            last_command: 77,
            known_bad: KnownBad::default().with(&[8; 32]),
            keys_version: 5,
            ..Record::EMPTY
        };
        let mut b = rec.encode(3);
        b[0..4].copy_from_slice(&MAGIC_V2.to_le_bytes());
        b[V2_LEN..].fill(0xFF);
        let crc = crc32fast::hash(&b[..V2_LEN - 4]);
        b[V2_LEN - 4..V2_LEN].copy_from_slice(&crc.to_le_bytes());
        let (counter, got) = Record::decode(&b).expect("v2 record");
        assert_eq!(counter, 3);
        assert_eq!(
            got,
            Record {
                keys_version: 0,
                ..rec
            }
        );
        b[30] ^= 1;
        assert_eq!(Record::decode(&b), None, "the v2 CRC is checked");
    }

    #[test]
    fn known_bad_keeps_the_newest_entries() {
        let mut set = KnownBad::default();
        for i in 1..=KnownBad::LEN as u8 + 2 {
            set = set.with(&[i; 32]);
        }
        assert_eq!(set.len(), KnownBad::LEN);
        assert!(!set.contains(&[1; 32]) && !set.contains(&[2; 32]));
        assert!(set.contains(&[3; 32]) && set.contains(&[10; 32]));
        // Failing again moves an entry to the front instead of duplicating it.
        set = set.with(&[3; 32]).with(&[11; 32]);
        assert!(set.contains(&[3; 32]) && !set.contains(&[4; 32]));
        assert!(!KnownBad::default().contains(&[0; 32]));
    }

    #[test]
    fn erased_flash_is_no_record() {
        assert_eq!(Record::decode(&[0xFF; RECORD_LEN]), None);
    }
}
