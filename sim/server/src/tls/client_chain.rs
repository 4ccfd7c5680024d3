//! Client certificates sent without their intermediate.
//!
//! A device sends its certificate alone ([`crate::pki`]); the server knows the intermediate
//! that issued it, as Mosquitto (OpenSSL) finds it in its `cafile`. rustls's
//! [`WebPkiClientVerifier`](rustls::server::WebPkiClientVerifier) builds a chain only from
//! what the client sent, and trusts every certificate in its root store as an anchor, which
//! would skip the intermediate's own checks (validity, its signature by the root). So the
//! server keeps the intermediate out of the roots and hands it to webpki as if the client had
//! sent it: webpki then checks the whole chain to the root, and everything else (signatures,
//! revocation, usages) is still webpki's.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// `inner`, with `intermediates` appended to what each client sends.
#[derive(Debug)]
pub(super) struct Completing {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) intermediates: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for Completing {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if self.intermediates.is_empty() {
            return self
                .inner
                .verify_client_cert(end_entity, intermediates, now);
        }
        // What the client sent first: webpki tries candidates in order.
        let all: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_ref()))
            .chain(
                self.intermediates
                    .iter()
                    .map(|c| CertificateDer::from(c.as_ref())),
            )
            .collect();
        self.inner.verify_client_cert(end_entity, &all, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
