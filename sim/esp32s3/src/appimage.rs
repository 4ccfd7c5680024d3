//! Building ESP-IDF app images for simulated firmware.
//!
//! The images are the real format (see `otarig_agent::image`), laid out the way esptool's
//! `elf2image` lays out an ESP-IDF ELF for the ESP32-S3: the DROM segment first (its data,
//! starting with `esp_app_desc_t`, at image offset 0x20 and load address `0x3C..0020`), the
//! DRAM segment, then RAM code (IRAM) filling the gap that esptool's
//! `get_alignment_data_needed` computes so that the IROM segment's data lands at an offset
//! congruent to its load address `0x42000020` modulo the 64 KiB MMU page (elf2image splits
//! RAM segments into that gap before it falls back to zero padding), then the IROM segment;
//! then padding, the XOR checksum and the appended SHA-256. Images too small to reach the
//! second MMU page carry no IROM segment. What the
//! app *does* when it boots is a [`Behaviour`] record stored in the DROM segment right after
//! the app descriptor, so it survives signing, delta patching and download byte for byte, as
//! real firmware behaviour would; the simulated CPU reads it from flash at boot.
//!
//! Segment contents are deterministic filler derived from the project name, with a few bytes
//! per 4 KiB changed by the version: two versions of one project differ the way two builds of
//! one codebase do, which is what delta updates rely on.

use otarig_agent::image::{
    self, heapless_str::Str32, APP_DESC_LEN, APP_DESC_MAGIC, CHECKSUM_SEED, CHIP_ID_ESP32S3,
    HEADER_LEN, IMAGE_MAGIC, SEGMENT_HEADER_LEN,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const BEHAVIOUR_MAGIC: &[u8; 8] = b"OTRGBHV1";

/// What the simulated app does at boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Behaviour {
    #[serde(default)]
    pub self_test: SelfTest,
    #[serde(default)]
    pub boot: BootBehaviour,
    #[serde(default)]
    pub network: NetworkBehaviour,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelfTest {
    #[default]
    Pass,
    Fail,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootBehaviour {
    #[default]
    Ok,
    /// Panics before the update agent starts (the chip resets, again and again).
    Crash,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkBehaviour {
    #[default]
    Ok,
    /// Never reaches Wi-Fi/broker/server (e.g. a broken network stack).
    Never,
}

/// Everything that defines one firmware build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppSpec {
    pub project: String,
    pub version: String,
    pub secure_version: u32,
    /// Approximate total image size in bytes (the result is within 16 bytes of it).
    pub size: u32,
    pub behaviour: Behaviour,
    pub chip_id: u16,
}

impl AppSpec {
    pub fn new(project: &str, version: &str, size: u32) -> AppSpec {
        AppSpec {
            project: project.to_string(),
            version: version.to_string(),
            secure_version: 0,
            size,
            behaviour: Behaviour::default(),
            chip_id: CHIP_ID_ESP32S3,
        }
    }
}

/// Smallest image the builder makes (header, descriptor, behaviour, DROM and DRAM).
pub const MIN_SIZE: u32 = 1024;
/// Largest image the builder makes: 16 MiB, the largest flash an ESP32-S3 module carries.
pub const MAX_SIZE: u32 = 16 * 1024 * 1024;

const MMU_PAGE: u32 = image::MMU_PAGE_SIZE;
const SEG_HDR: u32 = SEGMENT_HEADER_LEN as u32;
const DROM_BASE: u32 = 0x3C00_0000;
/// Where ESP-IDF's S3 linker script starts flash text (`irom_seg`).
const IROM_LOAD: u32 = 0x4200_0020;
const DRAM_LOAD: u32 = 0x3FC8_8000;
/// RAM code (`iram0_0_seg`), which elf2image uses to fill the gap before IROM.
const IRAM_LOAD: u32 = 0x4037_4000;
const DRAM_LEN: u32 = 64;
/// Checksum padding (at most 15 bytes), the checksum byte and the appended SHA-256.
const TAIL_MAX: u32 = 16 + 32;
/// The least IROM worth building: below this the image has none.
const MIN_IROM: u32 = 4096;

/// Why an image cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("image size {0} is outside {MIN_SIZE}..={MAX_SIZE} bytes")]
    Size(u32),
}

/// Check a requested size before building (`build` itself clamps into the range).
pub fn check_size(size: u32) -> Result<(), BuildError> {
    if (MIN_SIZE..=MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(BuildError::Size(size))
    }
}

/// esptool's `get_alignment_data_needed` (bin_image.py): the data length of a segment
/// written at image offset `at` to pad, so that the data of the next segment, after the
/// padding's header and its own, starts congruent to `load_addr` modulo the MMU page. 0: no
/// padding needed.
fn alignment_padding(at: u32, load_addr: u32) -> u32 {
    let page = MMU_PAGE as i64;
    let align_past = (load_addr % MMU_PAGE) as i64 - SEG_HDR as i64;
    let mut pad = (page - at as i64 % page) + align_past;
    if pad == 0 || pad == page {
        return 0;
    }
    pad -= SEG_HDR as i64; // the padding segment has a header too
    if pad < 0 {
        pad += page;
    }
    pad as u32
}

/// The segments of an image of about `size` bytes: (load address, data length).
fn layout(size: u32) -> Vec<(u32, u32)> {
    let head = HEADER_LEN as u32;
    // Without IROM: DROM and DRAM fill the image.
    let small_drom = (size - head - 2 * SEG_HDR - DRAM_LEN - TAIL_MAX) & !3;
    let drom_len = ((size - head - TAIL_MAX) / 4) & !3;
    let after_dram = head + SEG_HDR + drom_len + SEG_HDR + DRAM_LEN;
    let pad = alignment_padding(after_dram, IROM_LOAD);
    let irom_at = after_dram + if pad > 0 { SEG_HDR + pad } else { 0 } + SEG_HDR;
    let room = size.saturating_sub(irom_at + TAIL_MAX) & !3;
    if room < MIN_IROM {
        return vec![(DROM_BASE + 0x20, small_drom), (DRAM_LOAD, DRAM_LEN)];
    }
    // The linker puts rodata's virtual pages after the pages flash text uses.
    let irom_pages = (IROM_LOAD % MMU_PAGE + room).div_ceil(MMU_PAGE);
    let mut segments = vec![
        (DROM_BASE + irom_pages * MMU_PAGE + 0x20, drom_len),
        (DRAM_LOAD, DRAM_LEN),
    ];
    if pad > 0 {
        segments.push((IRAM_LOAD, pad));
    }
    segments.push((IROM_LOAD, room));
    segments
}

/// Build the image bytes. The size is clamped into [`MIN_SIZE`]`..=`[`MAX_SIZE`]; the
/// result is within 16 bytes of it.
pub fn build(spec: &AppSpec) -> Vec<u8> {
    let size = spec.size.clamp(MIN_SIZE, MAX_SIZE);
    let segments: Vec<(u32, Vec<u8>)> = layout(size)
        .into_iter()
        .enumerate()
        .map(|(i, (load, len))| (load, segment_data(spec, i, len)))
        .collect();
    let mut out = Vec::with_capacity(size as usize);
    out.push(IMAGE_MAGIC);
    out.push(segments.len() as u8);
    out.push(2); // spi_mode DIO
    out.push(0x20); // spi_speed 40 MHz, spi_size 4 MB
    out.extend_from_slice(&0x4037_5a8cu32.to_le_bytes()); // entry_addr (IRAM)
    out.push(0xEE); // wp_pin: disabled
    out.extend_from_slice(&[0, 0, 0]); // spi_pin_drv
    out.extend_from_slice(&spec.chip_id.to_le_bytes());
    out.push(0); // min_chip_rev (deprecated)
    out.extend_from_slice(&0u16.to_le_bytes()); // min_chip_rev_full (CONFIG_ESP32S3_REV_MIN_FULL)
    out.extend_from_slice(&99u16.to_le_bytes()); // max_chip_rev_full (v0.99)
    out.extend_from_slice(&[0; 4]);
    out.push(1); // hash_appended
    debug_assert_eq!(out.len(), HEADER_LEN);

    let mut checksum = CHECKSUM_SEED;
    for (load_addr, data) in &segments {
        out.extend_from_slice(&load_addr.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        checksum = data.iter().fold(checksum, |c, b| c ^ b);
    }
    let pad = 15 - out.len() % 16;
    out.extend(std::iter::repeat_n(0u8, pad));
    out.push(checksum);
    let hash: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&hash);
    out
}

/// The data of segment `index`: the DROM starts with the app descriptor and the behaviour
/// record; the rest is filler that changes a little between versions, as code does.
fn segment_data(spec: &AppSpec, index: usize, len: u32) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    if index > 0 {
        filler(spec, index as u64 + 1, &mut data);
        return data;
    }
    data[..APP_DESC_LEN].copy_from_slice(&app_desc(spec));
    let beh = serde_json::to_vec(&spec.behaviour).unwrap_or_default();
    let at = APP_DESC_LEN;
    data[at..at + 8].copy_from_slice(BEHAVIOUR_MAGIC);
    data[at + 8..at + 10].copy_from_slice(&(beh.len() as u16).to_le_bytes());
    data[at + 10..at + 10 + beh.len()].copy_from_slice(&beh);
    let fill_from = at + 10 + beh.len();
    filler(spec, 1, &mut data[fill_from..]);
    data
}

fn app_desc(spec: &AppSpec) -> [u8; APP_DESC_LEN] {
    let mut d = [0u8; APP_DESC_LEN];
    d[0..4].copy_from_slice(&APP_DESC_MAGIC.to_le_bytes());
    d[4..8].copy_from_slice(&spec.secure_version.to_le_bytes());
    d[16..48].copy_from_slice(&Str32::new(&spec.version).field());
    d[48..80].copy_from_slice(&Str32::new(&spec.project).field());
    d[80..96].copy_from_slice(&str_field::<16>("00:00:00"));
    d[96..112].copy_from_slice(&str_field::<16>("Jan  1 2026"));
    d[112..144].copy_from_slice(&Str32::new("v5.5").field());
    let elf: [u8; 32] = Sha256::digest(format!("{}@{}", spec.project, spec.version)).into();
    d[144..176].copy_from_slice(&elf);
    // min/max_efuse_blk_rev_full: CONFIG_ESP_EFUSE_BLOCK_REV_MIN_FULL 0 (no minimum) and
    // CONFIG_ESP_EFUSE_BLOCK_REV_MAX_FULL 199 (v1.99) for the ESP32-S3.
    d[176..178].copy_from_slice(&0u16.to_le_bytes());
    d[178..180].copy_from_slice(&199u16.to_le_bytes());
    d[180] = 16; // mmu_page_size, log2: 64 KiB
    d
}

fn str_field<const N: usize>(s: &str) -> [u8; N] {
    let mut f = [0u8; N];
    let n = s.len().min(N - 1);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
    f
}

fn filler(spec: &AppSpec, segment: u64, out: &mut [u8]) {
    let seed = u64::from_le_bytes(
        Sha256::digest(format!("{}#{segment}", spec.project))[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(out);
    // A build of another version changes a little in every 4 KiB: a few patched words.
    let vseed = Sha256::digest(format!("{}@{}#{segment}", spec.project, spec.version));
    let mut rng =
        ChaCha8Rng::seed_from_u64(u64::from_le_bytes(vseed[..8].try_into().unwrap_or([0; 8])));
    for block in out.chunks_mut(4096) {
        let at = (rng.next_u32() as usize) % block.len().max(1);
        let end = (at + 16).min(block.len());
        rng.fill_bytes(&mut block[at..end]);
    }
}

/// Read the behaviour record of an image in flash (the simulated CPU running it).
pub fn behaviour<R>(mut read: R) -> Behaviour
where
    R: FnMut(u32, &mut [u8]) -> bool,
{
    let at = (image::APP_DESC_OFFSET + APP_DESC_LEN) as u32;
    let mut head = [0u8; 10];
    if !read(at, &mut head) || &head[..8] != BEHAVIOUR_MAGIC {
        return Behaviour::default();
    }
    let len = u16::from_le_bytes([head[8], head[9]]) as usize;
    let mut body = vec![0u8; len.min(1024)];
    if !read(at + 10, &mut body) {
        return Behaviour::default();
    }
    serde_json::from_slice(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(bytes: &[u8]) -> Result<image::ImageInfo, image::ImageError> {
        image::verify(bytes.len() as u32 + 4096, |off, buf| {
            let off = off as usize;
            let avail = bytes.len().saturating_sub(off).min(buf.len());
            buf[..avail].copy_from_slice(&bytes[off..off + avail]);
            buf[avail..].fill(0xFF);
            Ok(())
        })
    }

    #[test]
    fn built_images_verify_and_carry_their_descriptor() {
        let mut spec = AppSpec::new("demo", "2.1.0", 100_000);
        spec.secure_version = 3;
        spec.behaviour.self_test = SelfTest::Fail;
        let img = build(&spec);
        assert!(img.len().abs_diff(100_000) <= 16, "size {}", img.len());
        let info = verify(&img).unwrap();
        assert_eq!(info.version(), "2.1.0");
        assert_eq!(info.secure_version(), Some(3));
        assert_eq!(info.len as usize, img.len());
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&img)));
        let beh = behaviour(|off, buf| {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            true
        });
        assert_eq!(beh.self_test, SelfTest::Fail);
    }

    #[test]
    fn corruption_is_caught_where_esp_idf_catches_it() {
        let img = build(&AppSpec::new("demo", "1.0.0", 20_000));
        let mut bad = img.clone();
        bad[5000] ^= 0x01;
        assert!(matches!(
            verify(&bad),
            Err(image::ImageError::Checksum { .. })
        ));
        let mut chip = img.clone();
        chip[12] = 0; // esp32
        assert_eq!(
            verify(&chip),
            Err(image::ImageError::WrongChip { found: 0 })
        );
        let truncated = &img[..img.len() / 2];
        assert!(verify(truncated).is_err());
        let mut hash = img.clone();
        let n = hash.len();
        hash[n - 1] ^= 0xFF;
        assert_eq!(verify(&hash), Err(image::ImageError::HashMismatch));
    }

    /// The segments' (load address, data offset, length).
    fn segments(img: &[u8]) -> Vec<(u32, u32, u32)> {
        let mut at = HEADER_LEN;
        (0..img[1])
            .map(|_| {
                let word = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
                let (load, len) = (word(at), word(at + 4));
                at += SEGMENT_HEADER_LEN + len as usize;
                (load, (at - len as usize) as u32, len)
            })
            .collect()
    }

    /// Recompute the appended SHA-256 after editing headers (the checksum covers data only).
    fn rehash(img: &mut [u8]) {
        let n = img.len() - 32;
        let hash: [u8; 32] = Sha256::digest(&img[..n]).into();
        img[n..].copy_from_slice(&hash);
    }

    fn verify_on_s3(bytes: &[u8]) -> Result<image::ImageInfo, image::ImageError> {
        image::verify_on(
            image::ChipRevision::ESP32S3_V0_2,
            bytes.len() as u32,
            |off, buf| {
                buf.copy_from_slice(&bytes[off as usize..off as usize + buf.len()]);
                Ok(())
            },
        )
    }

    #[test]
    fn the_smallest_documented_size_builds_and_verifies() {
        let img = build(&AppSpec::new("tiny", "1.0.0", MIN_SIZE));
        assert!(img.len().abs_diff(MIN_SIZE as usize) <= 16, "{}", img.len());
        assert_eq!(verify_on_s3(&img).unwrap().version(), "1.0.0");
        assert!(check_size(MIN_SIZE - 1).is_err() && check_size(MAX_SIZE + 1).is_err());
    }

    #[test]
    fn mapped_segments_sit_where_elf2image_puts_them() {
        for size in [MIN_SIZE, 40_000, 70_000, 100_000, 256 * 1024, 1024 * 1024] {
            let img = build(&AppSpec::new("layout", "1.0.0", size));
            assert!(
                img.len().abs_diff(size as usize) <= 16,
                "size {size}: {}",
                img.len()
            );
            let segs = segments(&img);
            assert_eq!(
                segs[0].1, 0x20,
                "DROM data, with the app descriptor, at 0x20"
            );
            for (load, offset, _) in &segs {
                if image::IROM.contains(load) || image::DROM.contains(load) {
                    assert_eq!(offset % 0x10000, load % 0x10000, "size {size}: {segs:x?}");
                }
            }
            let irom = segs.iter().find(|(load, ..)| *load == IROM_LOAD);
            assert_eq!(irom.is_some(), size >= 70_000, "size {size}: {segs:x?}");
            verify_on_s3(&img).unwrap();
        }
    }

    #[test]
    fn an_image_whose_irom_moved_by_4_bytes_is_refused() {
        let mut img = build(&AppSpec::new("moved", "1.0.0", 256 * 1024));
        let at = HEADER_LEN
            + segments(&img)
                .iter()
                .take_while(|(load, ..)| *load != IROM_LOAD)
                .map(|(.., len)| SEGMENT_HEADER_LEN + *len as usize)
                .sum::<usize>();
        img[at..at + 4].copy_from_slice(&(IROM_LOAD + 4).to_le_bytes());
        rehash(&mut img);
        assert!(
            matches!(
                verify_on_s3(&img),
                Err(image::ImageError::MappedSegmentMisplaced { load_addr, .. }) if load_addr == IROM_LOAD + 4
            ),
            "{:?}",
            verify_on_s3(&img)
        );
    }

    #[test]
    fn chip_and_efuse_block_revisions_are_checked_as_esp_idf_does() {
        let img = build(&AppSpec::new("rev", "1.0.0", 8_000));
        let edited = |at: usize, value: u16| {
            let mut b = img.clone();
            b[at..at + 2].copy_from_slice(&value.to_le_bytes());
            rehash(&mut b);
            b
        };
        let chip = |e| matches!(e, Err(image::ImageError::ChipRevision { .. }));
        assert!(
            chip(verify_on_s3(&edited(15, 3))),
            "needs v0.3, chip is v0.2"
        );
        assert!(chip(verify_on_s3(&edited(17, 1))), "at most v0.1");
        verify_on_s3(&edited(17, 0xFFFF)).expect("0xFFFF: no maximum");
        // The descriptor's eFuse block range is in the DROM data: the checksum changes too.
        let desc = image::APP_DESC_OFFSET;
        let mut blk = img.clone();
        blk[desc + 176..desc + 178].copy_from_slice(&200u16.to_le_bytes());
        let n = blk.len() - 33;
        blk[n] ^= 200; // the checksum over segment data, which changed by 0 ^ 200
        rehash(&mut blk);
        assert!(matches!(
            verify_on_s3(&blk),
            Err(image::ImageError::EfuseBlockRevision { min: 200, .. })
        ));
        // What ESP-IDF accepts: any non-zero hash_appended.
        let mut two = img.clone();
        two[23] = 2;
        rehash(&mut two);
        verify_on_s3(&two).expect("hash_appended = 2 is a C true");
    }

    #[test]
    fn an_image_without_an_app_descriptor_verifies_but_describes_nothing() {
        let mut img = build(&AppSpec::new("nodesc", "1.0.0", 8_000));
        let desc = image::APP_DESC_OFFSET;
        img[desc] ^= 0xFF; // magic broken: checksum byte follows
        let n = img.len() - 33;
        img[n] ^= 0xFF;
        rehash(&mut img);
        let info = verify_on_s3(&img).unwrap();
        assert!(info.desc.is_none() && info.secure_version().is_none());
    }

    #[test]
    fn two_versions_differ_a_little() {
        let a = build(&AppSpec::new("demo", "1.0.0", 64_000));
        let b = build(&AppSpec::new("demo", "1.0.1", 64_000));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(
            same * 100 / a.len() > 90,
            "only {same} of {} bytes equal",
            a.len()
        );
    }
}
