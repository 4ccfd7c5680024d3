//! The agent's persistent state, written power-safely to its own data partition.
//!
//! Two copies live in two 4 KiB sectors. A write goes to the sector holding the *older* copy:
//! erase it, then program one record (well under one 256-byte page) carrying a write counter
//! and a CRC-32. A power cut tears at most the copy being written; the other still has a valid
//! CRC, so reading picks the valid copy with the highest counter and loses at most the write
//! that was cut. This is the same two-sector scheme ESP-IDF uses for `otadata`.
//!
//! The record says what the agent was doing (idle, downloading, installed and awaiting
//! confirmation), how far a download durably got, the highest manifest sequence number ever
//! accepted (replay protection across reboots) and the last image that failed on this board.

use crate::platform::{EspResult, Platform};

pub const SECTOR: u32 = 4096;
const MAGIC: u32 = 0x4A52_544F; // "OTRJ"
pub const RECORD_LEN: usize = 224;

/// What the agent was doing when the record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Image bytes `[0, checkpoint)` of release `target` are durably in `slot_addr`.
    Downloading,
    /// The image is verified and the boot partition was (being) switched to it.
    Installed,
}

/// One persisted record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    /// Download attempts that ended in a hash or validation failure for `target_seq`.
    pub attempts: u8,
    /// Times `set_boot_partition` was retried after a reboot for `target_seq`.
    pub installs: u8,
    pub target_seq: u64,
    pub highest_seq: u64,
    pub size: u32,
    pub checkpoint: u32,
    pub slot_addr: u32,
    pub sha256: [u8; 32],
    /// SHA-256 of the last image that was rolled back or refused after download.
    pub known_bad: [u8; 32],
    pub version: [u8; 32],
    /// Downloading a delta patch (SHA-256 `patch_sha256`) rather than the full image.
    pub delta: bool,
    pub patch_sha256: [u8; 32],
    /// Where the patch applier resumes; its `new_written` equals `checkpoint`.
    pub resume: crate::delta::Resume,
}

impl Record {
    /// A board that never updated.
    pub const EMPTY: Record = Record {
        phase: Phase::Idle,
        attempts: 0,
        installs: 0,
        target_seq: 0,
        highest_seq: 0,
        size: 0,
        checkpoint: 0,
        slot_addr: 0,
        sha256: [0; 32],
        known_bad: [0; 32],
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
        b[11] = 0;
        b[12..20].copy_from_slice(&self.target_seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.highest_seq.to_le_bytes());
        b[28..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..36].copy_from_slice(&self.checkpoint.to_le_bytes());
        b[36..40].copy_from_slice(&self.slot_addr.to_le_bytes());
        b[40..72].copy_from_slice(&self.sha256);
        b[72..104].copy_from_slice(&self.known_bad);
        b[104..136].copy_from_slice(&self.version);
        b[136] = self.delta as u8;
        b[137..140].copy_from_slice(&[0; 3]);
        b[140..172].copy_from_slice(&self.patch_sha256);
        let r = &self.resume;
        b[172..176].copy_from_slice(&r.block_offset.to_le_bytes());
        b[176..180].copy_from_slice(&r.block_index.to_le_bytes());
        b[180..184].copy_from_slice(&r.raw_skip.to_le_bytes());
        b[184..188].copy_from_slice(&r.new_written.to_le_bytes());
        b[188..192].copy_from_slice(&r.old_pos.to_le_bytes());
        b[192..196].copy_from_slice(&(r.phase as u32).to_le_bytes());
        b[196..200].copy_from_slice(&r.remaining.to_le_bytes());
        b[200..204].copy_from_slice(&r.pending_copy.to_le_bytes());
        b[204..212].copy_from_slice(&r.seek.to_le_bytes());
        b[212..220].copy_from_slice(&[0; 8]);
        let crc = crc32fast::hash(&b[..220]);
        b[220..224].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; RECORD_LEN]) -> Option<(u32, Record)> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if u32_at(0) != MAGIC || u32_at(220) != crc32fast::hash(&b[..220]) {
            return None;
        }
        let phase = match b[8] {
            0 => Phase::Idle,
            1 => Phase::Downloading,
            2 => Phase::Installed,
            _ => return None,
        };
        let arr = |i: usize| {
            let mut x = [0u8; 32];
            x.copy_from_slice(&b[i..i + 32]);
            x
        };
        Some((
            u32_at(4),
            Record {
                phase,
                attempts: b[9],
                installs: b[10],
                target_seq: u64_at(12),
                highest_seq: u64_at(20),
                size: u32_at(28),
                checkpoint: u32_at(32),
                slot_addr: u32_at(36),
                sha256: arr(40),
                known_bad: arr(72),
                version: arr(104),
                delta: b[136] == 1,
                patch_sha256: arr(140),
                resume: crate::delta::Resume {
                    block_offset: u32_at(172),
                    block_index: u32_at(176),
                    raw_skip: u32_at(180),
                    new_written: u32_at(184),
                    old_pos: u32_at(188),
                    phase: b[192],
                    remaining: u32_at(196),
                    pending_copy: u32_at(200),
                    seek: u64_at(204) as i64,
                },
            },
        ))
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
            known_bad: [4; 32],
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
        };
        let mut bytes = rec.encode(42);
        assert_eq!(Record::decode(&bytes), Some((42, rec)));
        bytes[33] ^= 0x10;
        assert_eq!(Record::decode(&bytes), None);
    }

    #[test]
    fn erased_flash_is_no_record() {
        assert_eq!(Record::decode(&[0xFF; RECORD_LEN]), None);
    }
}
