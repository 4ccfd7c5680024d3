//! NVS partition images in ESP-IDF's format (version 2, as `nvs_partition_gen.py` writes
//! them), and reading them back: how factories provision a board's identity (its CA, device
//! certificate and key, broker and server, Wi-Fi) before the first boot.
//!
//! Layout (ESP-IDF `components/nvs_flash`, `nvs_page.hpp`, `nvs_types.hpp`): 4 KiB pages. A
//! page header of 32 bytes (state u32, sequence u32, version 0xFE, CRC-32 of bytes 4..28 at 28);
//! a bitmap of 2 bits per entry (0b11 empty, 0b10 written); 126 entries of 32 bytes. An entry
//! is namespace index u8, type u8, span u8, chunk index u8, CRC-32 (of bytes 0..4 and 8..32),
//! key[16] (NUL-padded, at most 15 characters), 8 bytes of data. A string's entry holds its
//! size (u16, with the NUL) and the CRC-32 of its bytes; the bytes follow in the next entries.
//! Namespaces are U8 entries in namespace 0 whose value is the namespace's index. The last page
//! is left erased, as the generator reserves it for NVS's garbage collection. CRC-32 here is
//! zlib's `crc32(data, 0xFFFFFFFF)`, as in otadata.
//!
//! Written: namespaces, strings, u8 values; enough for provisioning. Not modelled: blobs,
//! other integer widths, encrypted NVS.

use std::collections::HashMap;

pub const PAGE: usize = 4096;
const ENTRY: usize = 32;
const ENTRIES: usize = 126;
const FIRST_ENTRY: usize = 64;
const STATE_ACTIVE: u32 = 0xFFFF_FFFE;
const STATE_FULL: u32 = 0xFFFF_FFFC;
const VERSION2: u8 = 0xFE;
const TYPE_U8: u8 = 0x01;
const TYPE_SZ: u8 = 0x21;
const CHUNK_ANY: u8 = 0xFF;
/// The longest string one entry chain holds, with its NUL (`nvs_partition_gen.py`).
pub const MAX_STRING: usize = 4000;
pub const MAX_KEY: usize = 15;

fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(0xFFFF_FFFF);
    h.update(bytes);
    h.finalize()
}

/// Why an image could not be written, or a value not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvsError {
    /// The partition size is not a multiple of 4 KiB, or under 0x3000.
    Size(usize),
    KeyTooLong(String),
    ValueTooLong {
        key: String,
        len: usize,
    },
    /// The values do not fit the partition (its last page stays erased).
    Full,
}

impl std::fmt::Display for NvsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NvsError::Size(n) => write!(
                f,
                "NVS partition size {n:#x} must be a multiple of 0x1000 and at least 0x3000"
            ),
            NvsError::KeyTooLong(k) => {
                write!(f, "NVS key '{k}' is longer than {MAX_KEY} characters")
            }
            NvsError::ValueTooLong { key, len } => write!(
                f,
                "NVS string '{key}' is {len} bytes with its NUL, more than {MAX_STRING}"
            ),
            NvsError::Full => f.write_str(
                "the values do not fit the NVS partition (its last page stays erased): give it more room",
            ),
        }
    }
}

impl std::error::Error for NvsError {}

struct Page {
    buf: Vec<u8>,
    used: usize,
}

impl Page {
    fn new(seq: u32) -> Page {
        let mut buf = vec![0xFF; PAGE];
        buf[0..4].copy_from_slice(&STATE_ACTIVE.to_le_bytes());
        buf[4..8].copy_from_slice(&seq.to_le_bytes());
        buf[8] = VERSION2;
        let c = crc(&buf[4..28]);
        buf[28..32].copy_from_slice(&c.to_le_bytes());
        Page { buf, used: 0 }
    }

    /// Put `bytes` at entry `used` onwards and mark `entries` entries written.
    fn put(&mut self, bytes: &[u8], entries: usize) {
        let at = FIRST_ENTRY + ENTRY * self.used;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        for _ in 0..entries {
            let bit = self.used * 2;
            self.buf[32 + bit / 8] &= !(1 << (bit % 8));
            self.used += 1;
        }
    }
}

/// An NVS image being written, as `nvs_partition_gen.py generate` lays it out.
pub struct NvsWriter {
    size: usize,
    pages: Vec<Page>,
    namespaces: HashMap<String, u8>,
    current_ns: u8,
}

impl NvsWriter {
    /// An empty image for a partition of `size` bytes.
    pub fn new(size: usize) -> Result<NvsWriter, NvsError> {
        if !size.is_multiple_of(PAGE) || size < 3 * PAGE {
            return Err(NvsError::Size(size));
        }
        Ok(NvsWriter {
            size,
            pages: vec![Page::new(0)],
            namespaces: HashMap::new(),
            current_ns: 0,
        })
    }

    /// Start a new page (the current one is then full).
    fn next_page(&mut self) -> Result<(), NvsError> {
        // The last page stays erased for NVS's garbage collection.
        if (self.pages.len() + 1) * PAGE > self.size - PAGE {
            return Err(NvsError::Full);
        }
        if let Some(p) = self.pages.last_mut() {
            p.buf[0..4].copy_from_slice(&STATE_FULL.to_le_bytes());
        }
        let seq = self.pages.len() as u32;
        self.pages.push(Page::new(seq));
        Ok(())
    }

    fn header(ns: u8, ty: u8, span: u8, key: &str) -> Result<[u8; ENTRY], NvsError> {
        if key.len() > MAX_KEY {
            return Err(NvsError::KeyTooLong(key.to_string()));
        }
        let mut e = [0xFF; ENTRY];
        e[0] = ns;
        e[1] = ty;
        e[2] = span;
        e[3] = CHUNK_ANY;
        e[8..24].fill(0);
        e[8..8 + key.len()].copy_from_slice(key.as_bytes());
        Ok(e)
    }

    fn seal(e: &mut [u8; ENTRY]) {
        let mut covered = [0u8; 28];
        covered[..4].copy_from_slice(&e[..4]);
        covered[4..].copy_from_slice(&e[8..]);
        let c = crc(&covered);
        e[4..8].copy_from_slice(&c.to_le_bytes());
    }

    /// Write a one-entry item, on a new page when this one has no entry left.
    fn put_entry(&mut self, e: &[u8; ENTRY]) -> Result<(), NvsError> {
        if self.pages.last().is_none_or(|p| p.used >= ENTRIES) {
            self.next_page()?;
        }
        if let Some(p) = self.pages.last_mut() {
            p.put(e, 1);
        }
        Ok(())
    }

    /// Make `name` the namespace of the values that follow (`namespace` rows of the CSV).
    pub fn namespace(&mut self, name: &str) -> Result<(), NvsError> {
        if let Some(idx) = self.namespaces.get(name) {
            self.current_ns = *idx;
            return Ok(());
        }
        let idx = self.namespaces.len() as u8 + 1;
        self.u8_in(0, name, idx)?;
        self.namespaces.insert(name.to_string(), idx);
        self.current_ns = idx;
        Ok(())
    }

    fn u8_in(&mut self, ns: u8, key: &str, value: u8) -> Result<(), NvsError> {
        let mut e = Self::header(ns, TYPE_U8, 1, key)?;
        e[24] = value;
        Self::seal(&mut e);
        self.put_entry(&e)
    }

    /// A `u8` value in the current namespace.
    pub fn u8(&mut self, key: &str, value: u8) -> Result<(), NvsError> {
        self.u8_in(self.current_ns, key, value)
    }

    /// A string in the current namespace (stored with its NUL, as `nvs_set_str` does).
    pub fn string(&mut self, key: &str, value: &str) -> Result<(), NvsError> {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        if data.len() > MAX_STRING {
            return Err(NvsError::ValueTooLong {
                key: key.to_string(),
                len: data.len(),
            });
        }
        let data_entries = data.len().div_ceil(ENTRY);
        let mut e = Self::header(self.current_ns, TYPE_SZ, data_entries as u8 + 1, key)?;
        e[24..26].copy_from_slice(&(data.len() as u16).to_le_bytes());
        e[28..32].copy_from_slice(&crc(&data).to_le_bytes());
        Self::seal(&mut e);
        // The whole chain goes on one page, and the generator keeps one entry spare.
        if self
            .pages
            .last()
            .is_none_or(|p| p.used + data_entries + 1 >= ENTRIES)
        {
            self.next_page()?;
        }
        if let Some(p) = self.pages.last_mut() {
            p.put(&e, 1);
            p.put(&data, data_entries);
        }
        Ok(())
    }

    /// The image: the written pages, then erased ones up to the partition's size.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size);
        for p in &self.pages {
            out.extend_from_slice(&p.buf);
        }
        out.resize(self.size, 0xFF);
        out
    }
}

/// A value read back from an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvsValue {
    U8(u8),
    Str(String),
}

/// Every valid namespace/key → value of an image (written entries whose CRCs match; a later
/// page's value wins, as NVS keeps the newest), as ESP-IDF's `nvs_get_*` would find them.
pub fn read(image: &[u8]) -> HashMap<(String, String), NvsValue> {
    let mut raw: Vec<(u8, String, NvsValue)> = Vec::new();
    let mut pages: Vec<&[u8]> = image.chunks_exact(PAGE).collect();
    let seq = |p: &[u8]| u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
    pages.retain(|p| {
        let state = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let crc_ok = u32::from_le_bytes([p[28], p[29], p[30], p[31]]) == crc(&p[4..28]);
        (state == STATE_ACTIVE || state == STATE_FULL) && crc_ok
    });
    pages.sort_by_key(|p| seq(p));
    for p in pages {
        let written = |i: usize| (p[32 + i * 2 / 8] >> (i * 2 % 8)) & 0b11 == 0b10;
        let mut i = 0;
        while i < ENTRIES {
            let e = &p[FIRST_ENTRY + i * ENTRY..FIRST_ENTRY + (i + 1) * ENTRY];
            let span = usize::from(e[2]).max(1);
            if written(i) {
                if let Some(item) = item(p, i, e) {
                    raw.push(item);
                }
            }
            i += if written(i) { span } else { 1 };
        }
    }
    let names: HashMap<u8, String> = raw
        .iter()
        .filter_map(|(ns, key, v)| match v {
            NvsValue::U8(idx) if *ns == 0 => Some((*idx, key.clone())),
            _ => None,
        })
        .collect();
    raw.into_iter()
        .filter(|(ns, _, _)| *ns != 0)
        .filter_map(|(ns, key, v)| Some(((names.get(&ns)?.clone(), key), v)))
        .collect()
}

/// One written entry at index `i` of page `p`, if its CRCs hold and its type is read here.
fn item(p: &[u8], i: usize, e: &[u8]) -> Option<(u8, String, NvsValue)> {
    let mut covered = [0u8; 28];
    covered[..4].copy_from_slice(&e[..4]);
    covered[4..].copy_from_slice(&e[8..]);
    if u32::from_le_bytes([e[4], e[5], e[6], e[7]]) != crc(&covered) {
        return None;
    }
    let key_len = e[8..24].iter().position(|b| *b == 0).unwrap_or(16);
    let key = std::str::from_utf8(&e[8..8 + key_len]).ok()?.to_string();
    let value = match e[1] {
        TYPE_U8 => NvsValue::U8(e[24]),
        TYPE_SZ => {
            let len = usize::from(u16::from_le_bytes([e[24], e[25]]));
            let start = FIRST_ENTRY + (i + 1) * ENTRY;
            let data = p.get(start..start.checked_add(len)?)?;
            if u32::from_le_bytes([e[28], e[29], e[30], e[31]]) != crc(data) {
                return None;
            }
            let text = data.strip_suffix(&[0]).unwrap_or(data);
            NvsValue::Str(String::from_utf8(text.to_vec()).ok()?)
        }
        _ => return None,
    };
    Some((e[0], key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image `nvs_partition_gen.py generate fixtures/nvs/provisioning.csv … 0x6000`
    /// wrote (see fixtures/nvs/README.md), byte for byte, and read back.
    #[test]
    fn writes_what_nvs_partition_gen_writes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/nvs");
        let want = std::fs::read(dir.join("provisioning.bin")).unwrap();
        let ca = std::fs::read_to_string(dir.join("ca_cert.pem")).unwrap();
        let mut w = NvsWriter::new(0x6000).unwrap();
        w.namespace("otarig").unwrap();
        for (k, v) in [
            ("device", "otarig-devkit-s3-00007"),
            ("broker", "mqtts://10.0.0.2:8883"),
            ("server", "https://10.0.0.2:8443"),
            ("channel", "stable"),
            ("ssid", "bench-wifi"),
            ("password", "correct horse battery staple"),
            ("ca_cert", ca.as_str()),
        ] {
            w.string(k, v).unwrap();
        }
        w.namespace("misc").unwrap();
        w.string("note", &"x".repeat(3000)).unwrap();
        w.u8("count", 7).unwrap();
        w.string("note2", &"y".repeat(3000)).unwrap(); // does not fit page 0
        w.u8("count2", 9).unwrap();
        let got = w.finish();
        assert_eq!(got.len(), want.len());
        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("first difference at byte {at:#x} (page {})", at / PAGE);
        }
        let values = read(&want);
        let get = |ns: &str, k: &str| values.get(&(ns.to_string(), k.to_string())).cloned();
        assert_eq!(get("otarig", "ca_cert"), Some(NvsValue::Str(ca)));
        assert_eq!(get("misc", "count"), Some(NvsValue::U8(7)));
        assert_eq!(get("misc", "note").map(|_| ()), Some(()));
        assert_eq!(get("misc", "count2"), Some(NvsValue::U8(9)));
        assert_eq!(get("misc", "note2"), Some(NvsValue::Str("y".repeat(3000))));
        assert_eq!(get("otarig", "count"), None);
    }

    #[test]
    fn limits_are_errors() {
        assert_eq!(NvsWriter::new(0x2000).err(), Some(NvsError::Size(0x2000)));
        let mut w = NvsWriter::new(0x3000).unwrap();
        w.namespace("n").unwrap();
        assert!(matches!(
            w.string("a-key-of-sixteen", "v"),
            Err(NvsError::KeyTooLong(_))
        ));
        assert!(matches!(
            w.string("big", &"y".repeat(4000)),
            Err(NvsError::ValueTooLong { .. })
        ));
        // 0x3000: two pages of data; a third string of 3000 bytes needs a third page.
        w.string("a", &"z".repeat(3000)).unwrap();
        w.string("b", &"z".repeat(3000)).unwrap();
        assert_eq!(w.string("c", &"z".repeat(3000)), Err(NvsError::Full));
    }
}
