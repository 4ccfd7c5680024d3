//! Encrypting release images, the release side of [`otarig_agent::cipher`]: AES-256-CBC
//! with PKCS#7 padding and a fresh IV per release, and ESP-IDF's `esp_encrypted_img` format
//! (as its `tools/esp_enc_img_gen.py encrypt` writes it: a fresh AES-256-GCM key wrapped for
//! the board's RSA-3072 key with PKCS#1 v1.5, a 16-byte IV, no associated data).

use std::path::Path;

use aes::Aes256;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use anyhow::{bail, Context};
use cbc::cipher::{block_padding::Pkcs7, BlockEncryptMut, KeyIvInit};
use otarig_agent::cipher::{self, esp_img, Encryption, Scheme};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::rand_core::CryptoRngCore;
use rsa::traits::PublicKeyParts;

/// The key a release is encrypted for.
#[derive(Clone, Debug)]
pub enum ImageKey {
    /// The fleet's AES-256 key ([`Scheme::Aes256Cbc`]).
    Aes256([u8; 32]),
    /// The boards' RSA-3072 public key ([`Scheme::EspEncryptedImg`]).
    Rsa(rsa::RsaPublicKey),
}

impl ImageKey {
    /// Read a key file: 64 hex digits (AES-256), or an RSA key in PEM (public or private,
    /// PKCS#8 or PKCS#1; of a private key only the public half is kept).
    pub fn load(path: &Path) -> anyhow::Result<ImageKey> {
        let text = read_key_file(path)?;
        Self::parse(&text).with_context(|| {
            format!(
                "{}: not an image key (64 hex digits for AES-256, or an RSA-3072 key in PEM; `otarig keys image` makes both)",
                path.display()
            )
        })
    }

    fn parse(text: &str) -> anyhow::Result<ImageKey> {
        let t = text.trim();
        if !t.starts_with("-----BEGIN") {
            let mut key = [0u8; 32];
            hex::decode_to_slice(t, &mut key).context("not 64 hex digits")?;
            return Ok(ImageKey::Aes256(key));
        }
        let public = rsa::RsaPublicKey::from_public_key_pem(t)
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(t))
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(t).map(|k| k.to_public_key()))
            .or_else(|_| {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                rsa::RsaPrivateKey::from_pkcs1_pem(t).map(|k| k.to_public_key())
            })
            .map_err(|_| anyhow::anyhow!("not an RSA key in PEM"))?;
        if public.size() * 8 != esp_img::RSA_BITS {
            bail!(
                "an RSA-{} key; esp_encrypted_img's RSA scheme uses RSA-{}",
                public.size() * 8,
                esp_img::RSA_BITS
            );
        }
        Ok(ImageKey::Rsa(public))
    }

    /// The scheme this key encrypts with.
    pub fn scheme(&self) -> Scheme {
        match self {
            ImageKey::Aes256(_) => Scheme::Aes256Cbc,
            ImageKey::Rsa(_) => Scheme::EspEncryptedImg,
        }
    }

    /// The id manifests name this key by.
    pub fn key_id(&self) -> String {
        match self {
            ImageKey::Aes256(k) => cipher::aes256_key_id(k),
            ImageKey::Rsa(k) => cipher::rsa_key_id(k),
        }
    }
}

/// Key files are a few KiB: anything past this is not one, and is not read whole.
const MAX_KEY_FILE: u64 = 64 * 1024;

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .with_context(|| format!("reading image key {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading image key {} (not UTF-8 text?)", path.display()))?;
    if text.len() as u64 > MAX_KEY_FILE {
        bail!(
            "{} is over {} KiB: not an image key (64 hex digits, or an RSA key in PEM)",
            path.display(),
            MAX_KEY_FILE / 1024
        );
    }
    Ok(text)
}

/// A board's esp_encrypted_img key (PKCS#8 or PKCS#1 PEM, as ESP-IDF's
/// `rsa_key/private.pem`).
pub fn load_board_rsa(path: &Path) -> anyhow::Result<rsa::RsaPrivateKey> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    let pem = read_key_file(path)?;
    rsa::RsaPrivateKey::from_pkcs8_pem(&pem)
        .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(&pem))
        .map_err(|_| anyhow::anyhow!("{} is not an RSA private key in PEM", path.display()))
}

/// New image key files: `(private, public)` contents. AES-256: 64 hex digits, the same in
/// both (the fleet key is symmetric). RSA-3072: PKCS#8 PEM for the boards (NVS or flash) and
/// the public key in PEM for the release host, which never needs the private half.
pub fn generate(scheme: Scheme) -> anyhow::Result<(String, String)> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::rand_core::RngCore;
    match scheme {
        Scheme::Aes256Cbc => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let hex = format!("{}\n", hex::encode(key));
            Ok((hex.clone(), hex))
        }
        Scheme::EspEncryptedImg => {
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, esp_img::RSA_BITS)?;
            let private = key.to_pkcs8_pem(LineEnding::LF)?.to_string();
            let public = key.to_public_key().to_public_key_pem(LineEnding::LF)?;
            Ok((private, public))
        }
    }
}

/// An encrypted image and the manifest entry that describes it.
pub struct Encrypted {
    pub ciphertext: Vec<u8>,
    pub entry: Encryption,
}

/// Encrypt `plain` for `key` in the key's scheme.
pub fn encrypt(
    key: &ImageKey,
    plain: &[u8],
    rng: &mut impl CryptoRngCore,
) -> anyhow::Result<Encrypted> {
    if u32::try_from(plain.len()).is_err() {
        bail!("the image is {} bytes, more than 4 GiB", plain.len());
    }
    let mut iv = [0u8; cipher::BLOCK];
    rng.fill_bytes(&mut iv);
    let ciphertext = match key {
        ImageKey::Aes256(k) => cbc::Encryptor::<Aes256>::new(k.into(), (&iv).into())
            .encrypt_padded_vec_mut::<Pkcs7>(plain),
        ImageKey::Rsa(public) => esp_encrypted_img(public, &iv, plain, rng)?,
    };
    let entry = Encryption {
        scheme: key.scheme(),
        key_id: key.key_id(),
        sha256: hex::encode(crate::store::sha256(&ciphertext)),
        size: u32::try_from(ciphertext.len()).context("the ciphertext is over 4 GiB")?,
        iv: matches!(key, ImageKey::Aes256(_)).then(|| hex::encode(iv)),
    };
    Ok(Encrypted { ciphertext, entry })
}

/// `esp_enc_img_gen.py encrypt` with an RSA key: header, then the GCM ciphertext.
fn esp_encrypted_img(
    public: &rsa::RsaPublicKey,
    iv: &[u8; cipher::BLOCK],
    plain: &[u8],
    rng: &mut impl CryptoRngCore,
) -> anyhow::Result<Vec<u8>> {
    type Gcm16 = aes_gcm::AesGcm<Aes256, aes_gcm::aead::consts::U16>;
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let wrapped = public
        .encrypt(rng, rsa::Pkcs1v15Encrypt, &key)
        .context("wrapping the AES key")?;
    let mut out = Vec::with_capacity(esp_img::HEADER_LEN + plain.len());
    out.extend_from_slice(&esp_img::MAGIC.to_le_bytes());
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(iv);
    out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    out.resize(esp_img::HEADER_LEN, 0);
    out.extend_from_slice(plain);
    let tag = Gcm16::new((&key).into())
        .encrypt_in_place_detached(iv.into(), b"", &mut out[esp_img::HEADER_LEN..])
        .map_err(|_| anyhow::anyhow!("AES-GCM refused to seal the image"))?;
    out[esp_img::TAG].copy_from_slice(&tag);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use otarig_agent::cipher::{Decryptor, ImageKeys};
    use rand::SeedableRng;

    fn decrypt(enc: &Encrypted, size: u32, keys: &ImageKeys) -> Vec<u8> {
        let mut d = Decryptor::new(&enc.entry, size, keys, 0).unwrap();
        let mut out = Vec::new();
        let mut sink = |p: &[u8]| -> Result<(), ()> {
            out.extend_from_slice(p);
            Ok(())
        };
        d.feed(&enc.ciphertext, &mut sink).unwrap();
        d.finish(&mut sink).unwrap();
        out
    }

    #[test]
    fn what_the_server_encrypts_the_agent_decrypts() {
        let dir = crate::keys::fixture_dir();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let plain: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let aes = ImageKey::load(&dir.join("aes-256-image.hex")).unwrap();
        let rsa_pub = ImageKey::load(&dir.join("rsa-3072-image.pem")).unwrap();
        let pem = std::fs::read_to_string(dir.join("rsa-3072-image.pem")).unwrap();
        let ImageKey::Aes256(k) = aes else {
            panic!("an AES key")
        };
        let keys = ImageKeys::default()
            .with_aes256(k)
            .with_rsa(rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap());
        for key in [&aes, &rsa_pub] {
            let enc = encrypt(key, &plain, &mut rng).unwrap();
            assert_eq!(enc.entry.scheme, key.scheme());
            assert_ne!(&enc.ciphertext[600..700], &plain[100..200]);
            assert_eq!(decrypt(&enc, plain.len() as u32, &keys), plain);
        }
    }

    #[test]
    fn a_key_file_that_is_not_one_says_what_it_should_be() {
        let err = ImageKey::parse("12ab").unwrap_err();
        assert!(format!("{err:#}").contains("hex"), "{err:#}");
        let rsa2048 =
            std::fs::read_to_string(crate::keys::fixture_dir().join("rsa-test.pem")).unwrap();
        let err = ImageKey::parse(&rsa2048).unwrap_err();
        assert!(format!("{err:#}").contains("RSA-3072"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let huge = dir.path().join("huge.hex");
        std::fs::write(&huge, "0".repeat(70_000)).unwrap();
        let err = ImageKey::load(&huge).unwrap_err();
        assert!(format!("{err:#}").contains("over 64 KiB"), "{err:#}");
    }
}
