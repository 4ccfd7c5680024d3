//! Building ESP-IDF app images for simulated firmware.
//!
//! The images are the real format (see `otarig_agent::image`): header, three segments (DROM
//! with `esp_app_desc_t` first, IROM, DRAM), padding, XOR checksum, appended SHA-256. What the
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

/// Smallest image the builder makes (header, descriptor, behaviour, three segments).
pub const MIN_SIZE: u32 = 1024;

/// Build the image bytes.
pub fn build(spec: &AppSpec) -> Vec<u8> {
    let size = spec.size.max(MIN_SIZE);
    // Fixed overhead: header, three segment headers, checksum (+ up to 15 padding), hash.
    let overhead = HEADER_LEN as u32 + 3 * SEGMENT_HEADER_LEN as u32 + 16 + 32;
    let payload = (size - overhead) & !3;
    let dram_len = 64u32;
    let drom_len = ((payload - dram_len) / 4) & !3;
    let irom_len = payload - dram_len - drom_len;

    let mut drom = vec![0u8; drom_len as usize];
    drom[..APP_DESC_LEN].copy_from_slice(&app_desc(spec));
    let beh = serde_json::to_vec(&spec.behaviour).unwrap_or_default();
    let at = APP_DESC_LEN;
    drom[at..at + 8].copy_from_slice(BEHAVIOUR_MAGIC);
    drom[at + 8..at + 10].copy_from_slice(&(beh.len() as u16).to_le_bytes());
    drom[at + 10..at + 10 + beh.len()].copy_from_slice(&beh);
    let fill_from = at + 10 + beh.len();
    filler(spec, 1, &mut drom[fill_from..]);
    let mut irom = vec![0u8; irom_len as usize];
    filler(spec, 2, &mut irom);
    let mut dram = vec![0u8; dram_len as usize];
    filler(spec, 3, &mut dram);

    let mut out = Vec::with_capacity(size as usize);
    out.push(IMAGE_MAGIC);
    out.push(3); // segment count
    out.push(2); // spi_mode DIO
    out.push(0x20); // spi_speed 40 MHz, spi_size 4 MB
    out.extend_from_slice(&0x4037_5a8cu32.to_le_bytes()); // entry_addr (IRAM)
    out.push(0xEE); // wp_pin: disabled
    out.extend_from_slice(&[0, 0, 0]); // spi_pin_drv
    out.extend_from_slice(&spec.chip_id.to_le_bytes());
    out.push(0); // min_chip_rev (deprecated)
    out.extend_from_slice(&0u16.to_le_bytes()); // min_chip_rev_full
    out.extend_from_slice(&99u16.to_le_bytes()); // max_chip_rev_full (v0.99)
    out.extend_from_slice(&[0; 4]);
    out.push(1); // hash_appended
    debug_assert_eq!(out.len(), HEADER_LEN);

    let mut checksum = CHECKSUM_SEED;
    for (load_addr, data) in [
        (0x3C00_0020u32, &drom),
        (0x4200_0020, &irom),
        (0x3FC8_8000, &dram),
    ] {
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
        assert_eq!(info.desc.version.as_str(), "2.1.0");
        assert_eq!(info.desc.secure_version, 3);
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
