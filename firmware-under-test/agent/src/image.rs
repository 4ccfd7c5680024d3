//! The ESP-IDF application image format, as the bootloader and `esp_image_verify` read it.
//!
//! Layout (ESP-IDF `esp_app_format.h` / `esp_image_format.h`):
//!
//! ```text
//! esp_image_header_t            24 bytes: magic 0xE9, segment_count, spi_mode, spi speed/size,
//!                                          entry_addr u32, wp_pin, spi_pin_drv[3], chip_id u16 (@12),
//!                                          min_chip_rev, min/max_chip_rev_full u16, reserved[4],
//!                                          hash_appended (@23)
//! segment × segment_count       esp_image_segment_header_t { load_addr u32, data_len u32 } + data
//! padding                       0x00 up to the byte before a 16-byte boundary
//! checksum                      1 byte: 0xEF XOR every byte of every segment's data
//! SHA-256                       32 bytes over everything before it, when hash_appended == 1
//! ```
//!
//! The first segment starts with `esp_app_desc_t` (256 bytes, magic 0xABCD5432), which is where
//! `esp_ota_get_partition_description` reads version and `secure_version` from: offset 32.
//!
//! Everything here reads through a caller-supplied closure so it works on a slot in flash
//! (`esp_partition_read`) without holding the image in memory.

use core::fmt;
use sha2::{Digest, Sha256};

pub const IMAGE_MAGIC: u8 = 0xE9;
pub const HEADER_LEN: usize = 24;
pub const SEGMENT_HEADER_LEN: usize = 8;
pub const APP_DESC_MAGIC: u32 = 0xABCD_5432;
pub const APP_DESC_LEN: usize = 256;
/// `esp_app_desc_t` sits right after the image header and the first segment header.
pub const APP_DESC_OFFSET: usize = HEADER_LEN + SEGMENT_HEADER_LEN;
/// `ESP_CHIP_ID_ESP32S3`.
pub const CHIP_ID_ESP32S3: u16 = 9;
/// `ESP_IMAGE_MAX_SEGMENTS`.
pub const MAX_SEGMENTS: u8 = 16;
/// `SPI_FLASH_MMU_PAGE_SIZE` on the ESP32-S3: the cache maps flash in 64 KiB pages.
pub const MMU_PAGE_SIZE: u32 = 0x1_0000;
/// `SOC_IROM_LOW..SOC_IROM_HIGH` and `SOC_DROM_LOW..SOC_DROM_HIGH` on the ESP32-S3: load
/// addresses the cache maps from flash instead of loading into RAM.
pub const IROM: core::ops::Range<u32> = 0x4200_0000..0x4400_0000;
pub const DROM: core::ops::Range<u32> = 0x3C00_0000..0x3E00_0000;
/// Offsets in `esp_app_desc_t` of `min_efuse_blk_rev_full` and `max_efuse_blk_rev_full`.
const DESC_MIN_EFUSE_BLK_REV: usize = 176;
const DESC_MAX_EFUSE_BLK_REV: usize = 178;

/// A chip's revisions as ESP-IDF's loader checks images against them, each in the "full"
/// format `major * 100 + minor` (`efuse_hal_chip_revision`, `efuse_hal_blk_version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChipRevision {
    pub chip: u16,
    pub efuse_block: u16,
}

impl ChipRevision {
    /// An ESP32-S3 v0.2 with eFuse block version v1.3, as on current modules.
    pub const ESP32S3_V0_2: ChipRevision = ChipRevision {
        chip: 2,
        efuse_block: 103,
    };
}

/// `IS_FIELD_SET` of bootloader_common_loader.c: 0 and 0xFFFF mean "no limit".
fn is_field_set(rev_full: u16) -> bool {
    rev_full != 0xFFFF && rev_full != 0
}
/// Seed of the XOR checksum (`ESP_ROM_CHECKSUM_INITIAL`).
pub const CHECKSUM_SEED: u8 = 0xEF;

/// The fields of `esp_app_desc_t` the update logic needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppDesc {
    pub secure_version: u32,
    pub version: heapless_str::Str32,
    pub project_name: heapless_str::Str32,
}

/// What `esp_image_verify` found in a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub chip_id: u16,
    pub segment_count: u8,
    pub entry_addr: u32,
    /// Total length in bytes, appended hash included: the length of the file that was flashed.
    pub len: u32,
    /// The app descriptor at the start of the first segment, when its magic is right. ESP-IDF
    /// boots an image without one; `esp_ota_get_partition_description` then fails
    /// (`ESP_ERR_NOT_SUPPORTED`), and anti-rollback cannot accept it.
    pub desc: Option<AppDesc>,
    /// SHA-256 of all `len` bytes: the content address under which a release store keeps it.
    pub sha256: [u8; 32],
}

impl ImageInfo {
    /// The app version from its descriptor; empty without one.
    pub fn version(&self) -> &str {
        self.desc.as_ref().map_or("", |d| d.version.as_str())
    }

    /// The descriptor's `secure_version`; `None` without a descriptor, which anti-rollback
    /// refuses (`bootloader_common_get_partition_description` fails).
    pub fn secure_version(&self) -> Option<u32> {
        self.desc.as_ref().map(|d| d.secure_version)
    }
}

/// Why an image is not bootable. Each variant names the check ESP-IDF's loader would fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Reading the slot failed (a flash error; on the simulator also a power cut).
    Read,
    BadMagic(u8),
    WrongChip {
        found: u16,
    },
    TooManySegments(u8),
    SegmentOutOfBounds {
        index: u8,
        offset: u32,
    },
    SegmentNotAligned {
        index: u8,
        len: u32,
    },
    /// `verify_segment_header`: a segment the cache maps must sit at a flash offset
    /// congruent to its load address modulo the 64 KiB MMU page.
    MappedSegmentMisplaced {
        index: u8,
        load_addr: u32,
        offset: u32,
    },
    /// `bootloader_common_check_chip_revision_validity`.
    ChipRevision {
        min: u16,
        max: u16,
        chip: u16,
    },
    /// `bootloader_common_check_efuse_blk_validity` on the first segment's app descriptor.
    EfuseBlockRevision {
        min: u16,
        max: u16,
        chip: u16,
    },
    BadAppDescMagic(u32),
    Checksum {
        expected: u8,
        computed: u8,
    },
    HashNotAppended,
    HashMismatch,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Read => write!(f, "flash read failed while verifying the image"),
            ImageError::BadMagic(m) => {
                write!(f, "image has invalid magic byte (expected 0xE9, saw 0x{m:02x})")
            }
            ImageError::WrongChip { found } => write!(
                f,
                "image is built for chip id {found}, this is an ESP32-S3 (chip id {CHIP_ID_ESP32S3})"
            ),
            ImageError::TooManySegments(n) => write!(f, "image declares {n} segments (max 16)"),
            ImageError::SegmentOutOfBounds { index, offset } => write!(
                f,
                "segment {index} at image offset {offset} runs past the end of the partition"
            ),
            ImageError::SegmentNotAligned { index, len } => {
                write!(f, "segment {index} length {len} is not 4-byte aligned")
            }
            ImageError::MappedSegmentMisplaced {
                index,
                load_addr,
                offset,
            } => write!(
                f,
                "segment {index} load address 0x{load_addr:08x} doesn't match data 0x{offset:08x} (a mapped segment's offset must equal its load address modulo 64 KiB)"
            ),
            ImageError::ChipRevision { min, max, chip } => {
                revision_range(f, "chip rev", *min, *max, *chip)
            }
            ImageError::EfuseBlockRevision { min, max, chip } => {
                revision_range(f, "efuse blk rev", *min, *max, *chip)
            }
            ImageError::BadAppDescMagic(m) => write!(
                f,
                "app descriptor magic is 0x{m:08x}, expected 0x{APP_DESC_MAGIC:08x} (not an app image)"
            ),
            ImageError::Checksum { expected, computed } => write!(
                f,
                "image checksum mismatch (stored 0x{expected:02x}, computed 0x{computed:02x})"
            ),
            ImageError::HashNotAppended => write!(f, "image has no appended SHA-256"),
            ImageError::HashMismatch => write!(f, "appended SHA-256 does not match the image"),
        }
    }
}

/// "image requires WHAT vA.B to vC.D, but chip is vE.F", revisions in the `major * 100 + minor`
/// format.
fn revision_range(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    min: u16,
    max: u16,
    chip: u16,
) -> fmt::Result {
    let v = |r: u16| (r / 100, r % 100);
    let ((a, b), (c, d), (e, g)) = (v(min), v(max), v(chip));
    write!(
        f,
        "image requires {what} v{a}.{b} to v{c}.{d}, but chip is v{e}.{g}"
    )
}

/// SHA-256 of the first `len` bytes read through `read(offset, buf)`, 1 KiB at a time (a
/// board's stack holds no more).
pub fn sha256_of<E>(
    len: u32,
    mut read: impl FnMut(u32, &mut [u8]) -> Result<(), E>,
) -> Result<[u8; 32], E> {
    let mut h = Sha256::new();
    let mut buf = [0u8; 1024];
    let mut off = 0;
    while off < len {
        let n = core::cmp::min(buf.len() as u32, len - off) as usize;
        read(off, &mut buf[..n])?;
        h.update(&buf[..n]);
        off += n as u32;
    }
    Ok(h.finalize().into())
}

/// Verify an app image the way `esp_image_verify(ESP_IMAGE_VERIFY, …)` does, reading through
/// `read(offset, buf)` within a partition of `part_size` bytes, without the checks that
/// depend on the chip's revisions (see [`verify_on`]).
pub fn verify<R>(part_size: u32, read: R) -> Result<ImageInfo, ImageError>
where
    R: FnMut(u32, &mut [u8]) -> Result<(), ()>,
{
    verify_image(None, part_size, read)
}

/// [`verify`] on a chip of the given revisions, as its bootloader and `esp_ota_end` do:
/// the image's chip revision range (`bootloader_common_check_chip_validity`) and its app
/// descriptor's eFuse block revision range (`bootloader_common_check_efuse_blk_validity`)
/// must admit the chip.
pub fn verify_on<R>(chip: ChipRevision, part_size: u32, read: R) -> Result<ImageInfo, ImageError>
where
    R: FnMut(u32, &mut [u8]) -> Result<(), ()>,
{
    verify_image(Some(chip), part_size, read)
}

/// Checks, in `esp_image_verify`'s order (esp_image_format.c): header magic, chip id and
/// revision (`verify_image_header`); each segment inside the partition, 4-byte aligned and,
/// when mapped, at a flash offset congruent to its load address (`verify_segment_header`);
/// the first segment's app descriptor eFuse block range (`process_segment`); XOR checksum;
/// appended SHA-256 when `hash_appended` is non-zero. Also computes the SHA-256 of the whole
/// image (the release store's content address).
///
/// Offsets are relative to the image start: app partitions are 64 KiB-aligned
/// (`gen_esp32part.py`), so the congruence is the same as ESP-IDF's on absolute addresses.
fn verify_image<R>(
    chip: Option<ChipRevision>,
    part_size: u32,
    mut read: R,
) -> Result<ImageInfo, ImageError>
where
    R: FnMut(u32, &mut [u8]) -> Result<(), ()>,
{
    let mut header = [0u8; HEADER_LEN];
    read(0, &mut header).map_err(|_| ImageError::Read)?;
    let h = Header::parse(&header)?;
    if let Some(c) = chip {
        h.check_chip_revision(c.chip)?;
    }
    // One pass of SHA-256: the whole image's hash (the store's content address) is the image
    // hash's state continued over the appended digest, forked off just before finalizing.
    let mut image_hash = Sha256::new();
    image_hash.update(header);
    let mut checksum = CHECKSUM_SEED;
    let mut pos = HEADER_LEN as u32;
    let mut buf = [0u8; 512];
    let mut desc = None;

    for index in 0..h.segment_count {
        let (load_addr, len) = read_segment_header(&mut read, index, pos, part_size)?;
        image_hash.update(load_addr.to_le_bytes());
        image_hash.update(len.to_le_bytes());
        pos += SEGMENT_HEADER_LEN as u32;
        check_segment(index, load_addr, len, pos, part_size)?;
        let mut done = 0u32;
        while done < len {
            let n = core::cmp::min(buf.len() as u32, len - done) as usize;
            read(pos + done, &mut buf[..n]).map_err(|_| ImageError::Read)?;
            if index == 0 && done == 0 {
                if let Some(c) = chip {
                    check_efuse_block_revision(&buf[..n], c.efuse_block)?;
                }
                desc = parse_app_desc(&buf[..n]).ok();
            }
            for b in &buf[..n] {
                checksum ^= *b;
            }
            image_hash.update(&buf[..n]);
            done += n as u32;
        }
        pos += len;
    }

    // Padding to the byte before a 16-byte boundary, then the checksum byte.
    let pad = 15 - (pos % 16);
    let mut tail = [0u8; 16];
    let tail_len = pad as usize + 1;
    if pos + tail_len as u32 > part_size {
        return Err(ImageError::SegmentOutOfBounds {
            index: h.segment_count,
            offset: pos,
        });
    }
    read(pos, &mut tail[..tail_len]).map_err(|_| ImageError::Read)?;
    image_hash.update(&tail[..tail_len]);
    pos += tail_len as u32;
    let stored = tail[tail_len - 1];
    if stored != checksum {
        return Err(ImageError::Checksum {
            expected: stored,
            computed: checksum,
        });
    }
    if !h.hash_appended {
        // ESP-IDF accepts images without an appended hash when secure boot is off; we insist,
        // because the appended hash is what catches a torn write in the middle of a segment.
        return Err(ImageError::HashNotAppended);
    }
    let mut appended = [0u8; 32];
    if pos + 32 > part_size {
        return Err(ImageError::SegmentOutOfBounds {
            index: h.segment_count,
            offset: pos,
        });
    }
    read(pos, &mut appended).map_err(|_| ImageError::Read)?;
    let mut whole_hash = image_hash.clone();
    let computed: [u8; 32] = image_hash.finalize().into();
    if computed != appended {
        return Err(ImageError::HashMismatch);
    }
    whole_hash.update(appended);
    pos += 32;
    Ok(ImageInfo {
        chip_id: h.chip_id,
        segment_count: h.segment_count,
        entry_addr: h.entry_addr,
        len: pos,
        desc,
        sha256: whole_hash.finalize().into(),
    })
}

/// The fields of `esp_image_header_t` the checks use.
struct Header {
    segment_count: u8,
    entry_addr: u32,
    chip_id: u16,
    min_chip_rev_full: u16,
    max_chip_rev_full: u16,
    hash_appended: bool,
}

impl Header {
    /// `verify_image_header`: magic, chip id, segment count.
    fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, ImageError> {
        if b[0] != IMAGE_MAGIC {
            return Err(ImageError::BadMagic(b[0]));
        }
        let h = Header {
            segment_count: b[1],
            entry_addr: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            chip_id: u16::from_le_bytes([b[12], b[13]]),
            min_chip_rev_full: u16::from_le_bytes([b[15], b[16]]),
            max_chip_rev_full: u16::from_le_bytes([b[17], b[18]]),
            // A C `bool` in ESP-IDF: any non-zero value means appended.
            hash_appended: b[23] != 0,
        };
        if h.chip_id != CHIP_ID_ESP32S3 {
            return Err(ImageError::WrongChip { found: h.chip_id });
        }
        if h.segment_count > MAX_SEGMENTS {
            return Err(ImageError::TooManySegments(h.segment_count));
        }
        Ok(h)
    }

    /// `bootloader_common_check_chip_revision_validity(img_hdr, true)`.
    fn check_chip_revision(&self, chip: u16) -> Result<(), ImageError> {
        let (min, max) = (self.min_chip_rev_full, self.max_chip_rev_full);
        if chip < min || (is_field_set(max) && chip > max) {
            return Err(ImageError::ChipRevision { min, max, chip });
        }
        Ok(())
    }
}

fn read_segment_header<R>(
    read: &mut R,
    index: u8,
    pos: u32,
    part_size: u32,
) -> Result<(u32, u32), ImageError>
where
    R: FnMut(u32, &mut [u8]) -> Result<(), ()>,
{
    if pos
        .checked_add(SEGMENT_HEADER_LEN as u32)
        .is_none_or(|end| end > part_size)
    {
        return Err(ImageError::SegmentOutOfBounds { index, offset: pos });
    }
    let mut seg = [0u8; SEGMENT_HEADER_LEN];
    read(pos, &mut seg).map_err(|_| ImageError::Read)?;
    Ok((
        u32::from_le_bytes([seg[0], seg[1], seg[2], seg[3]]),
        u32::from_le_bytes([seg[4], seg[5], seg[6], seg[7]]),
    ))
}

/// `verify_segment_header` for the segment whose data starts at image offset `data_at`.
fn check_segment(
    index: u8,
    load_addr: u32,
    len: u32,
    data_at: u32,
    part_size: u32,
) -> Result<(), ImageError> {
    if !len.is_multiple_of(4) {
        return Err(ImageError::SegmentNotAligned { index, len });
    }
    if data_at.checked_add(len).is_none_or(|end| end > part_size) {
        return Err(ImageError::SegmentOutOfBounds {
            index,
            offset: data_at,
        });
    }
    let mapped = IROM.contains(&load_addr) || DROM.contains(&load_addr);
    if mapped && data_at % MMU_PAGE_SIZE != load_addr % MMU_PAGE_SIZE {
        return Err(ImageError::MappedSegmentMisplaced {
            index,
            load_addr,
            offset: data_at,
        });
    }
    Ok(())
}

/// `process_segment` on segment 0 (not on the original ESP32): its first bytes are read as
/// `esp_app_desc_t`, magic or not, and its eFuse block range must admit the chip.
fn check_efuse_block_revision(first: &[u8], chip: u16) -> Result<(), ImageError> {
    let field = |at: usize| {
        first
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    let (min, max) = (field(DESC_MIN_EFUSE_BLK_REV), field(DESC_MAX_EFUSE_BLK_REV));
    if (is_field_set(min) && chip < min) || (is_field_set(max) && chip > max) {
        return Err(ImageError::EfuseBlockRevision { min, max, chip });
    }
    Ok(())
}

/// Parse `esp_app_desc_t` from the start of the first segment.
pub fn parse_app_desc(bytes: &[u8]) -> Result<AppDesc, ImageError> {
    if bytes.len() < 80 {
        return Err(ImageError::BadAppDescMagic(0));
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != APP_DESC_MAGIC {
        return Err(ImageError::BadAppDescMagic(magic));
    }
    Ok(AppDesc {
        secure_version: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        version: heapless_str::Str32::from_c(&bytes[16..48]),
        project_name: heapless_str::Str32::from_c(&bytes[48..80]),
    })
}

/// Fixed-capacity strings for the `char[32]` fields of `esp_app_desc_t`.
pub mod heapless_str {
    use core::fmt;

    /// A NUL-padded `char[32]`, kept as bytes so it needs no allocation.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Str32 {
        bytes: [u8; 32],
        len: u8,
    }

    impl Str32 {
        /// Read a C string field (stops at the first NUL; invalid UTF-8 is kept lossily).
        pub fn from_c(field: &[u8]) -> Self {
            let mut bytes = [0u8; 32];
            let len = field
                .iter()
                .take(32)
                .position(|b| *b == 0)
                .unwrap_or(field.len().min(32));
            bytes[..len].copy_from_slice(&field[..len]);
            Str32 {
                bytes,
                len: len as u8,
            }
        }

        /// Truncates to 31 bytes, like ESP-IDF's `strncpy` into `char[32]`.
        pub fn new(s: &str) -> Self {
            let mut end = s.len().min(31);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            Self::from_c(&s.as_bytes()[..end])
        }

        pub fn as_str(&self) -> &str {
            core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("<invalid utf-8>")
        }

        /// The 32-byte NUL-padded field as written into flash.
        pub fn field(&self) -> [u8; 32] {
            self.bytes
        }
    }

    impl fmt::Debug for Str32 {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Debug::fmt(self.as_str(), f)
        }
    }

    impl fmt::Display for Str32 {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }
}
