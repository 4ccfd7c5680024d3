//! ESP-IDF partition tables: the `partitions.csv` a project ships, and the binary table
//! `gen_esp32part.py` writes at 0x8000.
//!
//! Binary format (ESP-IDF `esp_flash_partitions.h`): 32-byte `esp_partition_info_t` entries
//! `{ magic 0x50AA (LE), type u8, subtype u8, offset u32, size u32, label[16], flags u32 }`,
//! then an MD5 entry (`0xEBEB`, 14 bytes of 0xFF, MD5 of all preceding entries), then 0xFF up
//! to 0xC00 bytes. The bootloader refuses a table whose MD5 does not match.

use md5::{Digest, Md5};
use otarig_agent::{Slot, SlotKind};

pub const TABLE_OFFSET: u32 = 0x8000;
pub const TABLE_MAX_LEN: usize = 0xC00;
const ENTRY_MAGIC: [u8; 2] = [0xAA, 0x50];
const MD5_MAGIC: [u8; 2] = [0xEB, 0xEB];

pub const TYPE_APP: u8 = 0x00;
pub const TYPE_DATA: u8 = 0x01;
pub const SUBTYPE_FACTORY: u8 = 0x00;
pub const SUBTYPE_OTA_0: u8 = 0x10;
pub const SUBTYPE_TEST: u8 = 0x20;
pub const SUBTYPE_DATA_OTA: u8 = 0x00;
/// Label of the agent's journal partition.
pub const AGENT_LABEL: &str = "otarig";

/// The ESP-IDF two-OTA default layout (with the agent's journal partition).
pub const DEFAULT_CSV: &str = include_str!("../../../fixtures/partitions/two_ota.csv");
/// Two OTA slots, no factory: the layout for anti-rollback.
pub const NO_FACTORY_CSV: &str =
    include_str!("../../../fixtures/partitions/two_ota_no_factory.csv");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub label: String,
    pub ptype: u8,
    pub subtype: u8,
    pub offset: u32,
    pub size: u32,
    pub flags: u32,
}

impl Partition {
    /// The agent's view of an app partition.
    pub fn slot(&self) -> Option<Slot> {
        if self.ptype != TYPE_APP {
            return None;
        }
        let kind = match self.subtype {
            SUBTYPE_FACTORY => SlotKind::Factory,
            s @ 0x10..=0x1F => SlotKind::Ota(s - SUBTYPE_OTA_0),
            SUBTYPE_TEST => SlotKind::Test,
            _ => return None,
        };
        Some(Slot {
            kind,
            address: self.offset,
            size: self.size,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    pub entries: Vec<Partition>,
}

/// A problem in a `partitions.csv`, with its line (1-based).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}: {message}")]
pub struct CsvError {
    pub source_name: String,
    pub line: usize,
    pub message: String,
}

/// A binary table the bootloader would refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("partition table at 0x8000 has no valid entries (first bytes {0:02x?})")]
    Empty([u8; 2]),
    #[error("partition table MD5 mismatch: the table at 0x8000 is corrupt")]
    Md5,
    #[error("partition table entry {0} has an unknown magic")]
    BadEntry(usize),
    #[error(
        "partition table has a second MD5 entry (entry {0}): only one MD5 checksum is allowed"
    )]
    SecondMd5(usize),
    #[error("partition table has no terminating entry within {MAX_ENTRIES} entries")]
    NoEnd,
    #[error("partition {index} invalid: offset 0x{offset:x} size 0x{size:x} exceeds flash chip size 0x{chip:x}")]
    PastChipEnd {
        index: usize,
        offset: u32,
        size: u32,
        chip: u32,
    },
    #[error("{0} partitions do not fit the 0xC00-byte table with its MD5 entry (at most {MAX_PARTITIONS})")]
    TooLong(usize),
}

/// `ESP_PARTITION_TABLE_MAX_ENTRIES`: 0xC00 bytes of 32-byte entries, the terminating
/// entry included.
pub const MAX_ENTRIES: usize = TABLE_MAX_LEN / 32;
/// The most partitions a table holds: `gen_esp32part.py` needs the entries and the MD5
/// entry below 0xC00 bytes, which leaves room for the terminating entry.
pub const MAX_PARTITIONS: usize = MAX_ENTRIES - 2;

fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(x) = s.strip_suffix(['K', 'k']) {
        (x, 1024)
    } else if let Some(x) = s.strip_suffix(['M', 'm']) {
        (x, 1024 * 1024)
    } else {
        (s, 1)
    };
    let v = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        num.parse::<u64>().ok()?
    };
    v.checked_mul(mult)
}

fn parse_type(s: &str) -> Option<u8> {
    match s {
        "app" => Some(TYPE_APP),
        "data" => Some(TYPE_DATA),
        _ => parse_int(s).and_then(|v| u8::try_from(v).ok()),
    }
}

fn parse_subtype(ptype: u8, s: &str) -> Option<u8> {
    let named = match (ptype, s) {
        (TYPE_APP, "factory") => Some(SUBTYPE_FACTORY),
        (TYPE_APP, "test") => Some(SUBTYPE_TEST),
        (TYPE_APP, s) if s.starts_with("ota_") => s[4..]
            .parse::<u8>()
            .ok()
            .filter(|n| *n < 16)
            .map(|n| SUBTYPE_OTA_0 + n),
        (TYPE_DATA, "ota") => Some(0x00),
        (TYPE_DATA, "phy") => Some(0x01),
        (TYPE_DATA, "nvs") => Some(0x02),
        (TYPE_DATA, "coredump") => Some(0x03),
        (TYPE_DATA, "nvs_keys") => Some(0x04),
        (TYPE_DATA, "efuse") => Some(0x05),
        (TYPE_DATA, "undefined") => Some(0x06),
        (TYPE_DATA, "esphttpd") => Some(0x80),
        (TYPE_DATA, "fat") => Some(0x81),
        (TYPE_DATA, "spiffs") => Some(0x82),
        (TYPE_DATA, "littlefs") => Some(0x83),
        _ => None,
    };
    named.or_else(|| parse_int(s).and_then(|v| u8::try_from(v).ok()))
}

/// One row of a `partitions.csv`: `name, type, subtype, offset, size[, flags]`. `next` is
/// where the previous partition ended (an empty offset is placed there, aligned).
fn csv_row(cols: &[&str], next: u32) -> Result<Partition, String> {
    if cols.len() < 5 {
        return Err(format!(
            "expected `name, type, subtype, offset, size[, flags]`, found {} column(s)",
            cols.len()
        ));
    }
    let label = cols[0];
    if label.is_empty() || label.len() > 16 {
        return Err(format!(
            "partition name '{label}' must be 1 to 16 characters"
        ));
    }
    let ptype = parse_type(cols[1]).ok_or_else(|| {
        format!(
            "unknown partition type '{}' (app, data or a number)",
            cols[1]
        )
    })?;
    let subtype = parse_subtype(ptype, cols[2])
        .ok_or_else(|| format!("unknown subtype '{}' for type '{}'", cols[2], cols[1]))?;
    let align = if ptype == TYPE_APP { 0x10000 } else { 0x1000 };
    let offset = if cols[3].is_empty() {
        next.div_ceil(align) * align
    } else {
        let o = parse_int(cols[3])
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("offset '{}' is not a number", cols[3]))?;
        if o % align != 0 {
            return Err(format!(
                "offset 0x{o:x} of '{label}' is not aligned to 0x{align:x}"
            ));
        }
        o
    };
    if offset < next {
        return Err(format!(
            "partition '{label}' at 0x{offset:x} overlaps the previous one (ends at 0x{next:x})"
        ));
    }
    let size = parse_int(cols[4])
        .and_then(|v| u32::try_from(v).ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("size '{}' is not a positive number", cols[4]))?;
    if ptype == TYPE_APP && size % 0x1000 != 0 {
        return Err(format!(
            "app partition '{label}' size 0x{size:x} is not a multiple of 4 KiB"
        ));
    }
    Ok(Partition {
        label: label.to_string(),
        ptype,
        subtype,
        offset,
        size,
        flags: csv_flags(&cols[5..])?,
    })
}

/// The flags column(s): `encrypted`, `readonly`, separated by `:`.
fn csv_flags(cols: &[&str]) -> Result<u32, String> {
    let mut flags = 0;
    for f in cols.iter().flat_map(|c| c.split(':')).map(str::trim) {
        match f {
            "" => {}
            "encrypted" => flags |= 1,
            "readonly" => flags |= 2,
            other => return Err(format!("unknown flag '{other}' (encrypted, readonly)")),
        }
    }
    Ok(flags)
}

impl PartitionTable {
    /// Parse a `partitions.csv` as ESP-IDF's `gen_esp32part.py` does (offsets may be left
    /// empty: app partitions then align to 64 KiB, others to 4 KiB, starting at 0x9000).
    pub fn from_csv(source_name: &str, text: &str) -> Result<PartitionTable, CsvError> {
        let err = |line: usize, message: String| CsvError {
            source_name: source_name.to_string(),
            line,
            message,
        };
        let mut entries: Vec<Partition> = Vec::new();
        let mut next = TABLE_OFFSET + 0x1000;
        for (i, raw) in text.lines().enumerate() {
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let cols: Vec<&str> = content.split(',').map(str::trim).collect();
            let p = csv_row(&cols, next).map_err(|m| err(i + 1, m))?;
            if entries.iter().any(|e| e.label == p.label) {
                return Err(err(
                    i + 1,
                    format!("partition name '{}' is used twice", p.label),
                ));
            }
            next = p
                .offset
                .checked_add(p.size)
                .ok_or_else(|| err(i + 1, "partition ends past 4 GiB".into()))?;
            entries.push(p);
        }
        let table = PartitionTable { entries };
        table.check_csv_layout().map_err(|m| err(0, m.into()))?;
        Ok(table)
    }

    /// What `gen_esp32part.py` requires of a table as a whole.
    fn check_csv_layout(&self) -> Result<(), &'static str> {
        if self.app_slots().is_empty() {
            return Err("no app partition: nothing could boot");
        }
        if self.ota_count() > 0 && self.otadata().is_none() {
            return Err("OTA app partitions need an `otadata` (data, ota) partition");
        }
        if self.otadata().is_some_and(|p| p.size != 0x2000) {
            return Err("the otadata partition must be 0x2000 bytes (two sectors)");
        }
        Ok(())
    }

    /// The binary table written at 0x8000, with its MD5 entry; more entries than fit the
    /// 0xC00 bytes are an error, as in `gen_esp32part.py`.
    pub fn to_binary(&self) -> Result<Vec<u8>, TableError> {
        if self.entries.len() > MAX_PARTITIONS {
            return Err(TableError::TooLong(self.entries.len()));
        }
        let mut out = Vec::with_capacity(TABLE_MAX_LEN);
        for e in &self.entries {
            out.extend_from_slice(&ENTRY_MAGIC);
            out.push(e.ptype);
            out.push(e.subtype);
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            let mut label = [0u8; 16];
            label[..e.label.len()].copy_from_slice(e.label.as_bytes());
            out.extend_from_slice(&label);
            out.extend_from_slice(&e.flags.to_le_bytes());
        }
        let md5 = Md5::digest(&out);
        out.extend_from_slice(&MD5_MAGIC);
        out.extend_from_slice(&[0xFF; 14]);
        out.extend_from_slice(&md5);
        out.resize(TABLE_MAX_LEN, 0xFF);
        Ok(out)
    }

    /// Read the binary table as `esp_partition_table_verify` (flash_partitions.c) does on a
    /// chip of `chip_size` bytes: every entry inside the chip, at most one MD5 entry (which
    /// must match the entries before it), entries up to the 0xFF end marker.
    pub fn from_binary_on(bytes: &[u8], chip_size: u32) -> Result<PartitionTable, TableError> {
        let table = Self::from_binary(bytes)?;
        for (index, e) in table.entries.iter().enumerate() {
            if e.offset
                .checked_add(e.size)
                .is_none_or(|end| end > chip_size)
            {
                return Err(TableError::PastChipEnd {
                    index,
                    offset: e.offset,
                    size: e.size,
                    chip: chip_size,
                });
            }
        }
        Ok(table)
    }

    /// Read the binary table, checking its MD5 like the bootloader does (but not the chip
    /// size: see [`PartitionTable::from_binary_on`]).
    pub fn from_binary(bytes: &[u8]) -> Result<PartitionTable, TableError> {
        let mut entries = Vec::new();
        let mut md5_seen = false;
        let mut ended = false;
        for (i, e) in bytes.chunks_exact(32).take(MAX_ENTRIES).enumerate() {
            if e[0..2] == ENTRY_MAGIC {
                let label_len = e[12..28].iter().position(|b| *b == 0).unwrap_or(16);
                entries.push(Partition {
                    label: String::from_utf8_lossy(&e[12..12 + label_len]).into_owned(),
                    ptype: e[2],
                    subtype: e[3],
                    offset: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                    size: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
                    flags: u32::from_le_bytes([e[28], e[29], e[30], e[31]]),
                });
            } else if e[0..2] == MD5_MAGIC {
                if md5_seen {
                    return Err(TableError::SecondMd5(i));
                }
                if Md5::digest(&bytes[..i * 32])[..] != e[16..32] {
                    return Err(TableError::Md5);
                }
                md5_seen = true;
            } else if e.iter().all(|b| *b == 0xFF) {
                ended = true;
                break;
            } else {
                return Err(TableError::BadEntry(i));
            }
        }
        if !ended && bytes.len() >= TABLE_MAX_LEN {
            return Err(TableError::NoEnd);
        }
        if entries.is_empty() {
            return Err(TableError::Empty([
                bytes.first().copied().unwrap_or(0xFF),
                bytes.get(1).copied().unwrap_or(0xFF),
            ]));
        }
        Ok(PartitionTable { entries })
    }

    pub fn default_two_ota() -> PartitionTable {
        Self::from_csv("fixtures/partitions/two_ota.csv", DEFAULT_CSV)
            .unwrap_or_else(|e| panic!("built-in partition table is invalid: {e}"))
    }

    pub fn no_factory() -> PartitionTable {
        Self::from_csv("fixtures/partitions/two_ota_no_factory.csv", NO_FACTORY_CSV)
            .unwrap_or_else(|e| panic!("built-in partition table is invalid: {e}"))
    }

    pub fn find(&self, label: &str) -> Option<&Partition> {
        self.entries.iter().find(|e| e.label == label)
    }

    pub fn otadata(&self) -> Option<&Partition> {
        self.entries
            .iter()
            .find(|e| e.ptype == TYPE_DATA && e.subtype == SUBTYPE_DATA_OTA)
    }

    pub fn factory(&self) -> Option<Slot> {
        self.entries
            .iter()
            .filter_map(Partition::slot)
            .find(|s| s.kind == SlotKind::Factory)
    }

    pub fn test_slot(&self) -> Option<Slot> {
        self.entries
            .iter()
            .filter_map(Partition::slot)
            .find(|s| s.kind == SlotKind::Test)
    }

    /// OTA slot `n` (`ota_n`), if the table has it.
    pub fn ota(&self, n: u8) -> Option<Slot> {
        self.entries
            .iter()
            .filter_map(Partition::slot)
            .find(|s| s.kind == SlotKind::Ota(n))
    }

    /// Number of OTA slots as the app counts them (`esp_ota_get_app_partition_count`):
    /// ota_0, ota_1, … up to the first gap.
    pub fn ota_count(&self) -> u8 {
        (0..16).take_while(|n| self.ota(*n).is_some()).count() as u8
    }

    /// Number of OTA slots as the bootloader counts them
    /// (`bootloader_utility_load_partition_table`: every OTA app partition, gaps or not;
    /// ota_0 and ota_2 are two, and an entry selecting index 1 finds no partition there).
    pub fn bootloader_ota_count(&self) -> u8 {
        (0..16).filter(|n| self.ota(*n).is_some()).count() as u8
    }

    pub fn app_slots(&self) -> Vec<Slot> {
        self.entries.iter().filter_map(Partition::slot).collect()
    }

    pub fn slot_at(&self, address: u32) -> Option<Slot> {
        self.app_slots().into_iter().find(|s| s.address == address)
    }

    /// Smallest flash size (a power of two, at least 4 MB) that holds every partition.
    pub fn flash_size(&self) -> u32 {
        let end = self
            .entries
            .iter()
            .map(|e| e.offset + e.size)
            .max()
            .unwrap_or(0);
        end.next_power_of_two().max(4 * 1024 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_round_trips_through_the_binary_format() {
        let t = PartitionTable::default_two_ota();
        assert_eq!(t.ota_count(), 2);
        assert_eq!(t.factory().map(|s| s.address), Some(0x10000));
        assert_eq!(t.find(AGENT_LABEL).map(|p| p.size), Some(0x2000));
        let bin = t.to_binary().unwrap();
        assert_eq!(bin.len(), TABLE_MAX_LEN);
        assert_eq!(&bin[0..2], &[0xAA, 0x50]);
        assert_eq!(PartitionTable::from_binary(&bin), Ok(t));
    }

    #[test]
    fn a_flipped_bit_fails_the_md5() {
        let mut bin = PartitionTable::default_two_ota().to_binary().unwrap();
        bin[40] ^= 1;
        assert_eq!(PartitionTable::from_binary(&bin), Err(TableError::Md5));
    }

    /// `n` data partitions of one sector each after the default app layout.
    fn table_with(n: usize) -> PartitionTable {
        let mut csv = String::from("nvs, data, nvs, , 0x6000\nfactory, app, factory, , 1M\n");
        for i in 0..n.saturating_sub(2) {
            csv.push_str(&format!("d{i}, data, 0x40, , 4K\n"));
        }
        PartitionTable::from_csv("p.csv", &csv).unwrap()
    }

    #[test]
    fn a_table_too_long_for_0xc00_bytes_is_an_error_not_a_truncation() {
        assert_eq!(
            table_with(MAX_PARTITIONS).to_binary().map(|b| b.len()),
            Ok(TABLE_MAX_LEN)
        );
        assert_eq!(
            table_with(MAX_PARTITIONS + 1).to_binary(),
            Err(TableError::TooLong(MAX_PARTITIONS + 1))
        );
    }

    #[test]
    fn only_one_md5_entry_is_allowed_and_entries_may_follow_it() {
        let mut bin = PartitionTable::default_two_ota().to_binary().unwrap();
        let n = PartitionTable::default_two_ota().entries.len();
        let (md5_at, after) = (n * 32, (n + 1) * 32);
        // Entries after the MD5 entry are read (esp_partition_table_verify goes on to the end
        // marker): move the last partition behind it.
        let last = bin[(n - 1) * 32..n * 32].to_vec();
        let md5 = bin[md5_at..after].to_vec();
        let mut moved = bin[..(n - 1) * 32].to_vec();
        let digest = Md5::digest(&moved);
        moved.extend_from_slice(&MD5_MAGIC);
        moved.extend_from_slice(&[0xFF; 14]);
        moved.extend_from_slice(&digest);
        moved.extend_from_slice(&last);
        moved.resize(TABLE_MAX_LEN, 0xFF);
        assert_eq!(
            PartitionTable::from_binary(&moved).map(|t| t.entries.len()),
            Ok(n)
        );
        // A second MD5 entry is refused.
        bin[after..after + 32].copy_from_slice(&md5);
        assert_eq!(
            PartitionTable::from_binary(&bin),
            Err(TableError::SecondMd5(n + 1))
        );
    }

    #[test]
    fn a_partition_past_the_chip_end_is_refused_at_boot() {
        let bin = PartitionTable::default_two_ota().to_binary().unwrap();
        let t = PartitionTable::from_binary(&bin).unwrap();
        let end = t.entries.iter().map(|e| e.offset + e.size).max().unwrap();
        assert!(PartitionTable::from_binary_on(&bin, end).is_ok());
        assert!(matches!(
            PartitionTable::from_binary_on(&bin, end - 0x1000),
            Err(TableError::PastChipEnd { .. })
        ));
    }

    #[test]
    fn the_bootloader_counts_every_ota_partition_the_app_stops_at_a_gap() {
        let t = PartitionTable::from_csv(
            "gap.csv",
            "nvs, data, nvs, , 0x6000\notadata, data, ota, , 0x2000\not_0, app, ota_0, , 1M\not_2, app, ota_2, , 1M\n",
        )
        .unwrap();
        assert_eq!((t.ota_count(), t.bootloader_ota_count()), (1, 2));
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = PartitionTable::from_csv(
            "p.csv",
            "nvs, data, nvs, 0x9000, 0x4000\nx, app, ota_9x, , 1M\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("ota_9x"), "{e}");
    }

    #[test]
    fn empty_offsets_are_aligned_like_gen_esp32part() {
        let t = PartitionTable::from_csv(
            "p.csv",
            "nvs, data, nvs, , 0x4000\notadata, data, ota, , 0x2000\nota_0, app, ota_0, , 1M\n",
        )
        .unwrap();
        assert_eq!(t.entries[0].offset, 0x9000);
        assert_eq!(t.entries[1].offset, 0xd000);
        assert_eq!(t.entries[2].offset, 0x10000);
    }
}
