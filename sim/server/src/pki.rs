//! The fleet's own PKI (`otarig pki`): a root CA, an optional intermediate, server
//! certificates and one device certificate per board, and revocation.
//!
//! Files, in the layouts ESP-IDF projects and brokers already use:
//!
//! ```text
//! DIR/ca_cert.pem, ca_key.pem                       the root (its key 0600: keep it offline)
//! DIR/intermediate_cert.pem, intermediate_key.pem   the issuing CA, when there is one
//! DIR/client_ca.pem                                the root + the intermediate: what verifies
//!                                                   device certificates (a broker's cafile)
//! DIR/server/server.crt, server.key, server_chain.pem   leaf, key, leaf + intermediate
//! DIR/devices/ID/device.crt, device.key, ca_cert.pem     CN = ID (alone); the root
//! DIR/revoked.txt                                   revoked serials (hex) and their CN
//! DIR/crl.pem                                       a CRL of them, signed by the issuing CA
//! ```
//!
//! A server sends its chain (boards hold the root alone); a device sends its certificate
//! alone, as ESP-IDF's mutual-TLS examples provision one (esp-mqtt's `client_cert_pem`), and
//! the broker and the firmware server complete its chain from `client_ca.pem`, as OpenSSL
//! does from a `cafile` holding the intermediate. That keeps one certificate out of every
//! board handshake: Mosquitto (OpenSSL 3.0) decodes each certificate a client sends, and the
//! intermediate was a sixth of its time per handshake (README, "Scale").
//!
//! Keys are ECDSA P-256 (what rcgen makes, and what mbedTLS on the ESP32-S3 accelerates);
//! every private key is written 0600. Nothing here writes ASN.1 by hand: rcgen does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::keys::write_private;

/// A device or server certificate with its key, as PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
}

/// An opened PKI directory: the CA that issues leaves (the intermediate, if any, else the root).
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate when it is an intermediate (servers send it with their
    /// leaf; boards hold only the root).
    intermediate_pem: Option<String>,
    /// The root certificate, PEM (read once: every device's files and TLS setup need it).
    root_pem: String,
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (is this a directory made by `otarig pki init`?)",
            path.display()
        )
    })
}

/// A random positive serial of 16 bytes (RFC 5280 allows up to 20).
fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7F;
    b[0] |= 0x01; // no leading zero byte: the hex form is the DER form
    SerialNumber::from_slice(&b)
}

/// Valid from an hour ago (clock skew) for `days`; 0 days makes a certificate that expired a
/// minute ago (for the expired-certificate scenarios).
fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = match days {
        0 => now - Duration::minutes(1),
        d => now + Duration::days(i64::from(d)),
    };
}

fn ca_params(cn: &str, days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "otarig");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial());
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    p
}

impl Pki {
    /// Make a root CA (valid `days`), and an intermediate signed by it when asked, in `dir`.
    /// Refuses a directory that already holds a CA: replacing it would orphan every
    /// certificate it issued.
    pub fn init(dir: &Path, intermediate: bool, days: u32) -> anyhow::Result<Pki> {
        if dir.join("ca_cert.pem").exists() {
            bail!(
                "{} already holds a CA (ca_cert.pem); issue from it, or choose another directory",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let root_key = KeyPair::generate()?;
        let root_params = ca_params("otarig root CA", days);
        let root = root_params.self_signed(&root_key)?;
        write_private(&dir.join("ca_key.pem"), root_key.serialize_pem().as_bytes())?;
        write_public(&dir.join("ca_cert.pem"), &root.pem())?;
        if intermediate {
            let root_issuer = Issuer::new(root_params, root_key);
            let key = KeyPair::generate()?;
            let cert = ca_params("otarig intermediate CA", days).signed_by(&key, &root_issuer)?;
            write_private(
                &dir.join("intermediate_key.pem"),
                key.serialize_pem().as_bytes(),
            )?;
            write_public(&dir.join("intermediate_cert.pem"), &cert.pem())?;
        }
        Pki::open(dir)
    }

    /// Open a PKI directory made by [`Pki::init`]. Writes its `client_ca.pem` if missing (a
    /// directory made before there was one): device certificates issued now need it.
    pub fn open(dir: &Path) -> anyhow::Result<Pki> {
        let (cert, key, intermediate_pem) = if dir.join("intermediate_cert.pem").exists() {
            let cert = read(&dir.join("intermediate_cert.pem"))?;
            let key = read(&dir.join("intermediate_key.pem"))?;
            (cert.clone(), key, Some(cert))
        } else {
            (
                read(&dir.join("ca_cert.pem"))?,
                read(&dir.join("ca_key.pem"))?,
                None,
            )
        };
        let key = KeyPair::from_pem(&key).context("the CA key is not a PEM key pair")?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .context("the CA certificate cannot be read back")?;
        let pki = Pki {
            root_pem: read(&dir.join("ca_cert.pem"))?,
            dir: dir.to_path_buf(),
            issuer,
            intermediate_pem,
        };
        let bundle = dir.join("client_ca.pem");
        if !bundle.exists() {
            write_public(&bundle, &pki.client_ca_pem())?;
        }
        Ok(pki)
    }

    /// The root certificate, PEM: what boards embed to verify servers.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root and the intermediate (if any), PEM: what a broker or server that verifies
    /// device certificates holds (`client_ca.pem`), since a device sends its certificate
    /// alone.
    pub fn client_ca_pem(&self) -> String {
        then_intermediate(&self.root_pem, self.intermediate_pem.as_deref())
    }

    /// A leaf issued by the issuing CA.
    fn leaf(&self, mut params: CertificateParams, cn: &str, days: u32) -> anyhow::Result<Issued> {
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let serial = serial();
        params.serial_number = Some(serial.clone());
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: hex::encode(serial.to_bytes()),
        })
    }

    /// A server certificate for `names` (DNS names and IP addresses: `localhost`,
    /// `127.0.0.1`, the bench host), valid `days`.
    pub fn server(&self, names: &[String], days: u32) -> anyhow::Result<Issued> {
        if names.is_empty() {
            bail!("a server certificate needs at least one name (e.g. localhost, 127.0.0.1)");
        }
        let mut params = CertificateParams::new(names.to_vec())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(params, &names[0], days)
    }

    /// A device certificate: CN = `device_id`, for client authentication, valid `days`.
    pub fn device(&self, device_id: &str, days: u32) -> anyhow::Result<Issued> {
        crate::release_store::check_name("device id", device_id)?;
        let mut params = CertificateParams::default();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(params, device_id, days)
    }

    /// The leaf and the intermediate, as a server presents them.
    pub fn chain_pem(&self, leaf: &Issued) -> String {
        then_intermediate(&leaf.cert_pem, self.intermediate_pem.as_deref())
    }

    /// Write a server certificate: `server/server.crt`, `server.key`, `server_chain.pem`.
    pub fn write_server(&self, s: &Issued) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("server");
        write_public(&dir.join("server.crt"), &s.cert_pem)?;
        write_private(&dir.join("server.key"), s.key_pem.as_bytes())?;
        write_public(&dir.join("server_chain.pem"), &self.chain_pem(s))?;
        Ok(dir)
    }

    /// Write a device's files: `devices/ID/device.crt` (its certificate alone, what it
    /// presents: brokers and servers hold the intermediate, `client_ca.pem`), `device.key`,
    /// `ca_cert.pem` (the root, which verifies servers).
    pub fn write_device(&self, device_id: &str, d: &Issued) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("devices").join(device_id);
        write_public(&dir.join("device.crt"), &d.cert_pem)?;
        write_private(&dir.join("device.key"), d.key_pem.as_bytes())?;
        write_public(&dir.join("ca_cert.pem"), self.root_pem())?;
        Ok(dir)
    }

    /// Revoke the certificate with this serial (hex): add it to `revoked.txt` and sign a new
    /// `crl.pem`. Returns the CRL.
    pub fn revoke(&self, serial_hex: &str, label: &str) -> anyhow::Result<String> {
        let serial = hex::decode(serial_hex.trim())
            .ok()
            .filter(|b| !b.is_empty() && b.len() <= 20)
            .with_context(|| format!("serial '{serial_hex}' is not 1 to 20 bytes of hex"))?;
        let mut revoked = self.revoked()?;
        if !revoked.iter().any(|(s, _)| *s == hex::encode(&serial)) {
            revoked.push((hex::encode(&serial), label.to_string()));
        }
        let text: String = revoked.iter().map(|(s, l)| format!("{s} {l}\n")).collect();
        write_public(&self.dir.join("revoked.txt"), &text)?;
        let crl = self.crl(&revoked)?;
        write_public(&self.dir.join("crl.pem"), &crl)?;
        Ok(crl)
    }

    /// Revoke a device's certificate by its id (read from `devices/ID/device.crt`).
    pub fn revoke_device(&self, device_id: &str) -> anyhow::Result<String> {
        let pem = read(&self.dir.join("devices").join(device_id).join("device.crt"))?;
        self.revoke(&serial_of(&pem)?, device_id)
    }

    /// The serials in `revoked.txt`, with their labels.
    pub fn revoked(&self) -> anyhow::Result<Vec<(String, String)>> {
        let path = self.dir.join("revoked.txt");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(2, ' ');
                let s = parts.next()?.trim();
                (!s.is_empty()).then(|| (s.to_string(), parts.next().unwrap_or("").to_string()))
            })
            .collect())
    }

    /// A CRL of `revoked`, valid a week, signed by the issuing CA.
    fn crl(&self, revoked: &[(String, String)]) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .filter_map(|(s, _)| hex::decode(s).ok())
            .map(|b| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&b),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from_slice(&(now.unix_timestamp() as u64).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Write `dir/client_ca.pem` from the directory's public files (the root, and the
/// intermediate if there is one), for a broker host that holds no CA key. Returns its path.
pub fn write_client_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    let intermediate = dir.join("intermediate_cert.pem");
    let intermediate = intermediate
        .exists()
        .then(|| read(&intermediate))
        .transpose()?;
    let bundle = then_intermediate(&read(&dir.join("ca_cert.pem"))?, intermediate.as_deref());
    let path = dir.join("client_ca.pem");
    write_public(&path, &bundle)?;
    Ok(path)
}

/// `first` (PEM), followed by the intermediate when the PKI has one: a server's chain, or the
/// CA bundle that verifies devices.
fn then_intermediate(first: &str, intermediate: Option<&str>) -> String {
    let mut pem = first.to_string();
    pem.push_str(intermediate.unwrap_or_default());
    pem
}

/// The serial number (hex) of a PEM certificate.
pub fn serial_of(cert_pem: &str) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("not a PEM certificate")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).context("not an X.509 certificate")?;
    Ok(hex::encode(cert.raw_serial()))
}

/// The subject CN of a DER certificate (a device's id).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
