//! TLS configurations from the fleet's PKI files ([`crate::pki`]): the firmware server's
//! (HTTPS, optionally requiring a client certificate checked against the CA and its CRL) and a
//! board's (the CA that verifies servers, and its own certificate).
//!
//! rustls with ring as the one crypto provider, passed explicitly: with more than one provider
//! compiled into a process, rustls will not pick one by itself.

mod client_chain;

use std::sync::Arc;

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM text (a chain: leaf first).
pub fn certs(pem: &str, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} is not PEM certificates"))?;
    if certs.is_empty() {
        anyhow::bail!("{what} holds no certificate (-----BEGIN CERTIFICATE-----)");
    }
    Ok(certs)
}

fn key(pem: &str, what: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .with_context(|| format!("{what} is not a PEM private key (PKCS#8, SEC1 or PKCS#1)"))
}

fn roots(ca_pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "the CA file")? {
        roots.add(c).context("a CA certificate rustls cannot use")?;
    }
    Ok(roots)
}

/// Who may connect to a TLS server, besides anyone who can reach it.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    /// The CA bundle (PEM) a client certificate must chain to, as in OpenSSL's `cafile`:
    /// its self-signed certificates are the roots, and the others (an intermediate) complete
    /// the chain of a client that sends its certificate alone (`otarig pki`'s
    /// `client_ca.pem`).
    pub ca_pem: String,
    /// Revoked certificates (a PEM CRL from `otarig pki revoke`).
    pub crl_pem: Option<String>,
}

/// The server's TLS configuration: its chain and key (PEM), and with `client_auth` a client
/// certificate from that CA, not on its CRL, is required.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_auth: Option<&ClientAuth>,
) -> anyhow::Result<Arc<ServerConfig>> {
    server_config_with(rustls::DEFAULT_VERSIONS, chain_pem, key_pem, client_auth)
}

/// [`server_config`] offering only `versions`: `&[&rustls::version::TLS13]` is the hardened
/// server that stock boards (TLS 1.2 only, [`Client::Board`]) cannot reach.
pub fn server_config_with(
    versions: &[&'static rustls::SupportedProtocolVersion],
    chain_pem: &str,
    key_pem: &str,
    client_auth: Option<&ClientAuth>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let crls = match &auth.crl_pem {
                Some(pem) => CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .context("the CRL is not PEM")?,
                None => Vec::new(),
            };
            let bundle = ClientCaBundle::parse(&auth.ca_pem)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(bundle.roots), provider())
                    .with_crls(crls)
                    // The CRL is the issuing CA's and lists device certificates; nothing revokes
                    // the intermediate itself (a compromised intermediate means a new PKI).
                    .only_check_end_entity_revocation()
                    .build()
                    .context("the client CA or CRL cannot be used")?;
            builder.with_client_cert_verifier(Arc::new(client_chain::Completing {
                inner: verifier,
                intermediates: bundle.intermediates,
            }))
        }
    };
    let mut cfg = builder
        .with_single_cert(
            certs(chain_pem, "the server chain")?,
            key(key_pem, "the server key")?,
        )
        .context("the server key does not match its certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client CA bundle split the way OpenSSL uses a `cafile`: roots to end a chain at, and
/// intermediates to build one through.
struct ClientCaBundle {
    roots: RootCertStore,
    intermediates: Vec<CertificateDer<'static>>,
}

impl ClientCaBundle {
    fn parse(pem: &str) -> anyhow::Result<ClientCaBundle> {
        let mut bundle = ClientCaBundle {
            roots: RootCertStore::empty(),
            intermediates: Vec::new(),
        };
        for (n, c) in certs(pem, "the client CA file")?.into_iter().enumerate() {
            let (_, parsed) = x509_parser::parse_x509_certificate(&c)
                .map_err(|e| anyhow::anyhow!("certificate {} of the client CA file: {e}", n + 1))?;
            if parsed.subject().as_raw() == parsed.issuer().as_raw() {
                bundle
                    .roots
                    .add(c)
                    .context("a CA certificate rustls cannot use")?;
            } else {
                bundle.intermediates.push(c);
            }
        }
        if bundle.roots.is_empty() {
            anyhow::bail!(
                "the client CA file holds no root (self-signed) certificate: give the root and any intermediates (`otarig pki` writes client_ca.pem)"
            );
        }
        Ok(bundle)
    }
}

/// A new device certificate from `pki` (CN = `id`, valid `days`) and the TLS configuration
/// that presents it (alone: see [`crate::pki`]) and trusts `pki`'s root, for `who`.
pub fn device_client(
    pki: &crate::pki::Pki,
    id: &str,
    days: u32,
    who: Client,
) -> anyhow::Result<Arc<ClientConfig>> {
    let d = pki.device(id, days)?;
    client_config(who, pki.root_pem(), Some((&d.cert_pem, &d.key_pem)))
}

/// Who a client configuration is for: the TLS versions it offers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// A stock ESP-IDF board: mbedTLS with its default configuration, TLS 1.2 only.
    /// `CONFIG_MBEDTLS_SSL_PROTO_TLS1_3` is off unless a project turns it on
    /// (components/mbedtls/Kconfig), so esp-tls, esp_http_client, esp_https_ota and esp-mqtt
    /// all negotiate TLS 1.2, and a server or broker that dropped 1.2 locks the board out.
    Board,
    /// A tool on a host (the operator's MQTT client, test attackers): TLS 1.3 or 1.2.
    Host,
}

/// A client's TLS configuration: servers must chain to `ca_pem`; with `identity`
/// (certificate and key, PEM) it authenticates itself.
///
/// It keeps no session to resume: esp-tls offers none unless built with
/// `CONFIG_ESP_TLS_CLIENT_SESSION_TICKETS` and handed one (`esp_tls_get_client_session`),
/// and nothing survives a reboot in RAM. rustls would keep tickets in the configuration,
/// which outlives a simulated board's reboots, and the server and broker would then skip the
/// certificate checks and signatures a real board makes them pay for.
pub fn client_config(
    who: Client,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let versions: &[&rustls::SupportedProtocolVersion] = match who {
        Client::Board => &[&rustls::version::TLS12],
        Client::Host => rustls::DEFAULT_VERSIONS,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, k)) => builder
            .with_client_auth_cert(
                certs(cert, "the device certificate")?,
                key(k, "the device key")?,
            )
            .context("the device key does not match its certificate")?,
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}
