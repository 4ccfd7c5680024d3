//! The `otadata` partition: two 4 KiB sectors, each starting with one
//! `esp_ota_select_entry_t` (ESP-IDF `esp_flash_partitions.h`):
//!
//! ```text
//! [0:4]   ota_seq    u32   slot = (ota_seq - 1) % number of OTA slots
//! [4:24]  seq_label  [u8; 20]
//! [24:28] ota_state  u32   esp_ota_img_states_t
//! [28:32] crc        u32   esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)
//! ```
//!
//! Selection follows `bootloader_common_get_active_otadata`: an entry is valid when
//! `ota_seq != 0xFFFFFFFF`, its state is neither INVALID nor ABORTED, and its CRC matches; the
//! valid entry with the highest `ota_seq` is active.

use otarig_agent::OtaImgState;

pub const ENTRY_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ota_seq: u32,
    pub seq_label: [u8; 20],
    pub ota_state: u32,
    pub crc: u32,
}

/// `bootloader_common_ota_select_crc`: CRC-32 (`esp_rom_crc32_le` seeded with `UINT32_MAX`)
/// of the four `ota_seq` bytes; equal to Python's `zlib.crc32(pack('<I', seq), 0xFFFFFFFF)`.
pub fn seq_crc(seq: u32) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(0xFFFF_FFFF);
    h.update(&seq.to_le_bytes());
    h.finalize()
}

impl Entry {
    /// A fresh entry as `esp_rewrite_ota_data` writes it.
    pub fn new(ota_seq: u32, state: OtaImgState, seq_label: [u8; 20]) -> Entry {
        Entry {
            ota_seq,
            seq_label,
            ota_state: state.raw(),
            crc: seq_crc(ota_seq),
        }
    }

    pub fn decode(b: &[u8; ENTRY_LEN]) -> Entry {
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut seq_label = [0u8; 20];
        seq_label.copy_from_slice(&b[4..24]);
        Entry {
            ota_seq: u(0),
            seq_label,
            ota_state: u(24),
            crc: u(28),
        }
    }

    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&self.ota_seq.to_le_bytes());
        b[4..24].copy_from_slice(&self.seq_label);
        b[24..28].copy_from_slice(&self.ota_state.to_le_bytes());
        b[28..32].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn state(&self) -> OtaImgState {
        OtaImgState::from_raw(self.ota_state)
    }

    pub fn crc_ok(&self) -> bool {
        self.ota_seq != u32::MAX && self.crc == seq_crc(self.ota_seq)
    }

    /// `bootloader_common_ota_select_invalid`.
    pub fn is_invalid(&self) -> bool {
        self.ota_seq == u32::MAX
            || matches!(self.state(), OtaImgState::Invalid | OtaImgState::Aborted)
    }

    /// `bootloader_common_ota_select_valid`.
    pub fn is_valid(&self) -> bool {
        !self.is_invalid() && self.crc == seq_crc(self.ota_seq)
    }

    /// The OTA slot this entry selects: `(ota_seq - 1) % count` in `uint32_t` arithmetic, as
    /// `bootloader_utility_get_selected_boot_partition` computes it. A sequence of 0 (valid:
    /// its CRC is 0xFFFFFFFF) wraps to `0xFFFFFFFF % count`, ota_1 of two slots.
    pub fn slot(&self, ota_count: u8) -> Option<u8> {
        if ota_count == 0 || self.ota_seq == u32::MAX {
            return None;
        }
        Some((self.ota_seq.wrapping_sub(1) % ota_count as u32) as u8)
    }
}

/// `bootloader_common_select_otadata`: index of the valid entry with the highest (`max`) or
/// lowest sequence number.
pub fn select(two: &[Entry; 2], valid: [bool; 2], max: bool) -> Option<usize> {
    match valid {
        [true, true] => {
            let pick = if max {
                two[0].ota_seq.max(two[1].ota_seq)
            } else {
                two[0].ota_seq.min(two[1].ota_seq)
            };
            Some(if pick == two[0].ota_seq { 0 } else { 1 })
        }
        [true, false] => Some(0),
        [false, true] => Some(1),
        [false, false] => None,
    }
}

/// `bootloader_common_get_active_otadata`.
pub fn active(two: &[Entry; 2]) -> Option<usize> {
    select(two, [two[0].is_valid(), two[1].is_valid()], true)
}

/// The sequence number `esp_rewrite_ota_data` writes to select OTA slot `target` when entry
/// `active_seq` is active: the smallest `(target + 1) % count + i * count` not below it.
pub fn next_seq(active_seq: u32, target: u8, count: u8) -> u32 {
    let base = (target as u32 + 1) % count as u32;
    let mut i = 0u32;
    while active_seq > base + i * count as u32 {
        i += 1;
    }
    base + i * count as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_zero_is_valid_and_wraps_like_the_bootloader() {
        assert_eq!(seq_crc(0), 0xFFFF_FFFF);
        let e = Entry::new(0, OtaImgState::Valid, [0xFF; 20]);
        assert!(e.is_valid());
        assert_eq!(e.slot(2), Some(1), "0xFFFFFFFF % 2");
        assert_eq!(e.slot(3), Some(0), "0xFFFFFFFF % 3");
    }

    #[test]
    fn crc_matches_esp_idf_otatool() {
        // zlib.crc32(struct.pack('<I', seq), 0xFFFFFFFF), as otatool.py computes it.
        assert_eq!(seq_crc(1), 0x4743_989a);
        assert_eq!(seq_crc(2), 0x55f6_3774);
        assert_eq!(seq_crc(16), 0xafe6_a860);
    }

    #[test]
    fn highest_valid_sequence_wins_and_aborted_entries_are_skipped() {
        let a = Entry::new(1, OtaImgState::Valid, [0xFF; 20]);
        let mut b = Entry::new(2, OtaImgState::PendingVerify, [0xFF; 20]);
        assert_eq!(active(&[a, b]), Some(1));
        b.ota_state = OtaImgState::Aborted.raw();
        assert_eq!(active(&[a, b]), Some(0));
        let mut torn = Entry::new(3, OtaImgState::New, [0xFF; 20]);
        torn.crc ^= 1;
        assert_eq!(active(&[a, torn]), Some(0));
    }

    #[test]
    fn next_sequence_selects_the_target_slot() {
        // ota_0 active with seq 1; selecting ota_1 writes seq 2, then ota_0 writes 3.
        assert_eq!(next_seq(1, 1, 2), 2);
        assert_eq!(next_seq(2, 0, 2), 3);
        assert_eq!(Entry::new(3, OtaImgState::New, [0; 20]).slot(2), Some(0));
    }
}
