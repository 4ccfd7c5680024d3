//! Signing keys for releases, and the public halves compiled into simulated firmware.
//!
//! Keys are PKCS#8 PEM files; a key's id is its file name without `.pem`. The keys in
//! `fixtures/keys/` are TEST ONLY: they are public, and anyone can sign with them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use otarig_agent::manifest::{self, Alg, Manifest};
use otarig_agent::protocol::{self, CommandBody};
use otarig_agent::{PublicKey, TrustedKey};
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::LineEnding;
use rsa::signature::{SignatureEncoding, Signer};

/// A private key that signs manifests.
#[derive(Clone)]
pub enum SigningKey {
    Ed25519(Box<ed25519_dalek::SigningKey>),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// A named signing key.
#[derive(Clone)]
pub struct NamedKey {
    pub id: String,
    pub key: SigningKey,
}

impl std::fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamedKey({})", self.id)
    }
}

/// The fixture key directory shipped with the repository (as a plain path for messages:
/// `fixtures/keys`, not `sim/server/../../fixtures/keys`).
pub fn fixture_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/keys");
    dir.canonicalize().unwrap_or(dir)
}

impl NamedKey {
    /// Load `DIR/ID.pem` (Ed25519 or RSA, PKCS#8).
    pub fn load(dir: &Path, id: &str) -> anyhow::Result<NamedKey> {
        let path = dir.join(format!("{id}.pem"));
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading signing key {}", path.display()))?;
        Self::from_pem(id, &pem).with_context(|| {
            format!(
                "{} is not a PKCS#8 Ed25519 or RSA-2048 private key",
                path.display()
            )
        })
    }

    pub fn from_pem(id: &str, pem: &str) -> anyhow::Result<NamedKey> {
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(NamedKey {
                id: id.to_string(),
                key: SigningKey::Ed25519(Box::new(k)),
            });
        }
        use rsa::pkcs8::DecodePrivateKey as _;
        let k = rsa::RsaPrivateKey::from_pkcs8_pem(pem)?;
        use rsa::traits::PublicKeyParts;
        if k.size() != 256 {
            bail!("RSA key is {} bits; manifests use RSA-2048", k.size() * 8);
        }
        Ok(NamedKey {
            id: id.to_string(),
            key: SigningKey::Rsa(Box::new(k)),
        })
    }

    pub fn generate_ed25519(id: &str) -> NamedKey {
        let k = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        NamedKey {
            id: id.to_string(),
            key: SigningKey::Ed25519(Box::new(k)),
        }
    }

    pub fn generate_rsa(id: &str) -> anyhow::Result<NamedKey> {
        let k = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)?;
        Ok(NamedKey {
            id: id.to_string(),
            key: SigningKey::Rsa(Box::new(k)),
        })
    }

    pub fn to_pem(&self) -> anyhow::Result<String> {
        Ok(match &self.key {
            SigningKey::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF)?.to_string(),
            SigningKey::Rsa(k) => {
                use rsa::pkcs8::EncodePrivateKey as _;
                k.to_pkcs8_pem(LineEnding::LF)?.to_string()
            }
        })
    }

    pub fn alg(&self) -> Alg {
        match self.key {
            SigningKey::Ed25519(_) => Alg::Ed25519,
            SigningKey::Rsa(_) => Alg::RsaPkcs1v15Sha256,
        }
    }

    /// The public half, as the firmware embeds it.
    pub fn trusted(&self) -> anyhow::Result<TrustedKey> {
        let key = match &self.key {
            SigningKey::Ed25519(k) => PublicKey::ed25519(&k.verifying_key().to_bytes())?,
            SigningKey::Rsa(k) => {
                let der = rsa::RsaPublicKey::from(k.as_ref()).to_pkcs1_der()?;
                PublicKey::rsa_pkcs1_der(der.as_bytes())?
            }
        };
        Ok(TrustedKey {
            id: self.id.clone(),
            key,
        })
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match &self.key {
            SigningKey::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
            SigningKey::Rsa(k) => {
                let sk = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.as_ref().clone());
                sk.sign(msg).to_vec()
            }
        }
    }

    /// Sign `body` for `ctx` into an envelope (the JSON bytes that are published or logged).
    pub fn sign_envelope(&self, ctx: manifest::Context, body: &[u8]) -> Vec<u8> {
        let sig = self.sign(&ctx.message(body));
        let env = manifest::envelope(body, &self.id, self.alg(), &sig);
        serde_json::to_vec(&env).unwrap_or_default()
    }

    /// Sign a manifest: the envelope's JSON bytes, as published.
    pub fn sign_manifest(&self, m: &Manifest) -> Vec<u8> {
        self.sign_envelope(
            manifest::Context::Manifest,
            &serde_json::to_vec(m).unwrap_or_default(),
        )
    }

    /// Sign a command: the payload for the board's `cmd` topic.
    pub fn sign_command(&self, body: &CommandBody) -> String {
        let env = self.sign_envelope(
            manifest::Context::Command,
            &serde_json::to_vec(body).unwrap_or_default(),
        );
        protocol::signed_payload(&env).unwrap_or_default()
    }
}

/// Write a private key so that only its owner can read it: created with mode 0600 (not
/// created 0644 and narrowed after, which leaves a window), and narrowed when `--force`
/// replaces a key that had wider permissions.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("narrowing {} to mode 0600", path.display()))?;
        }
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
